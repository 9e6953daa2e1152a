"""BentoML service: the champion (and the challenger, for canary or shadow traffic) with adaptive batching.

Bento arguments: `model_tag` and batching limits are set by `amaas package` (the label cut-off is in the
model). `amaas serve` sets $AMAAS_ROOT to the project: the server then follows that project's registry
(promote and rollback switch the model within `serve.reload_interval_s`, while requests in flight finish
on the model they started with), checks API keys from its key store, and appends every prediction to its
prediction log. Without $AMAAS_ROOT (a container of the bento alone) it serves the bento's own model, with
keys and log under the working folder. Settings (params.yaml) are read when the server starts, not at
import: the service's __init__ and the gateway's first request load them. Rows are scored through
`pipelines.bundle.ModelBundle`, the same code path as offline evaluation: no training/serving skew.
"""

from __future__ import annotations

import functools
import gc
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import anyio
import bentoml
from pydantic import BaseModel

# Before the models' libraries load OpenMP (its settings are read once, then): its idle threads sleep instead of
# spinning after each parallel region. A spinning thread takes the core the event loop needs: one row through the
# LightGBM student took 11.7 ms (8 ms of CPU) with the default policy and 0.08 ms with this one, on the loaded
# 2-core machine. The environment still wins (setdefault).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pipelines.bundle import ModelBundle  # noqa: E402
from pipelines.config import PARAMS_ENV, ROOT_ENV, Paths, Settings, load_settings  # noqa: E402
from pipelines.registry import Registry  # noqa: E402
from pipelines.serving.cache import ResponseCache, features  # noqa: E402
from pipelines.serving.gateway import (  # noqa: E402
    KEY_NAME,
    REQUEST_ID,
    ROUTE,
    Gateway,
    Rows,
    bound_metric_labels,
    cancelled_timeouts,
)
from pipelines.serving.metrics import PhaseTimes, latest_attribution_drift, with_served_metrics  # noqa: E402
from pipelines.state import Shared, shared  # noqa: E402
from pipelines.state.artifacts import fetch_bento  # noqa: E402
from pipelines.state.limits import RELOAD_LOCK, keep_following, one_at_a_time, server_id  # noqa: E402
from pipelines.state.predlog import GroupCommit, log_entry, now_iso  # noqa: E402

log = logging.getLogger("amaas.service")
CHALLENGER_RETRY_S = 30.0


class ServiceArgs(BaseModel):
    model_tag: str = "amaas:latest"
    batching: bool = True
    max_batch_size: int = 256
    max_latency_ms: int = 20


ARGS = bentoml.use_arguments(ServiceArgs)
PROJECT = os.environ.get(ROOT_ENV)  # baked bento args win over `bentoml serve --arg`, so the root comes this way
PATHS = Paths.from_env()
PARAMS = Path(os.environ.get(PARAMS_ENV) or PATHS.root / "params.yaml") if PROJECT else (
    Path(__file__).parent.parent / "params.yaml")  # the copy inside the bento


@functools.cache
def settings() -> Settings:
    """params.yaml as the server started with it (canary and shadow are re-read by Models.follow)."""
    return load_settings(PARAMS)


@functools.cache
def state() -> Shared:
    """What this server shares with the other workers and replicas: files beside the project, or a fleet's
    PostgreSQL, Redis and artifacts store ($AMAAS_STATE_URL, ...)."""
    return shared(settings(), PATHS)


class Models:
    """The bundles being served, swapped as one reference so a batch never mixes two generations."""

    def __init__(self, champion: ModelBundle) -> None:
        self.current: dict[str, ModelBundle | None] = {"champion": champion, "challenger": None}
        serve = settings().serve
        self.canary_share, self.shadow = serve.canary_share, serve.shadow
        self.cache = ResponseCache(serve.cache.size)  # answers of the models in `current` only
        self._aliases: dict[str, Any] | None = None
        self._params_mtime: float | None = None
        self._failed_at: float | None = None  # when a challenger last failed to load (None: none failed)
        self.explained = 0  # rows this worker answered on /explain (/metrics)

    def routing(self) -> tuple[float, bool]:
        """(canary share, shadow) as they apply now: nothing goes to a challenger that is not loaded."""
        if self.current["challenger"] is None:
            return 0.0, False
        return self.canary_share, self.shadow

    def follow(self, registry: Registry, loading: Callable[[], AbstractContextManager[object]] = nullcontext) -> None:
        """Take up what params.yaml (canary, shadow) and the registry aliases say now, if they changed.

        Bundles load before the swap (inside `loading()`, when there is one to load), so requests never wait for a
        load and never see half a switch.
        """
        mtime = PARAMS.stat().st_mtime if PARAMS.is_file() else None
        configured = (self.canary_share, self.shadow)
        if mtime != self._params_mtime:
            serve = load_settings(PARAMS).serve
            configured, self._params_mtime = (serve.canary_share, serve.shadow), mtime
        routing = state().routing(configured)  # a fleet's published routing wins over the bento's params
        if routing != (self.canary_share, self.shadow):
            self.canary_share, self.shadow = routing
            log.info("canary share %.2f, shadow %s", self.canary_share, self.shadow)
        aliases = registry.aliases()
        # a challenger that did not load is tried again when the aliases change, or after CHALLENGER_RETRY_S (in a
        # fleet its bento may reach the artifacts store after its alias)
        retry = self._failed_at is not None and time.monotonic() - self._failed_at >= CHALLENGER_RETRY_S
        if (aliases == self._aliases and not retry) or aliases["champion"] is None:  # no registry: the bento's model
            return
        wanted = {"champion": aliases["champion"],
                  "challenger": aliases["challenger"] if aliases["challenger"] != aliases["champion"] else None}
        have = {bundle.version: bundle for bundle in self.current.values() if bundle}  # a promoted challenger stays
        loaded = {role: have.get(version) if version else None for role, version in wanted.items()}
        missing = [role for role, version in wanted.items() if version is not None and loaded[role] is None]
        self._failed_at = None
        with loading() if missing else nullcontext():
            for role in missing:
                try:
                    loaded[role] = _load(wanted[role], registry)
                except Exception:
                    if role == "champion":  # nothing to serve instead: keep the current models, retry next time
                        raise
                    # the champion serves everything meanwhile (canary and shadow need a loaded challenger)
                    self._failed_at = time.monotonic()
                    log.exception("challenger %s does not load: the champion answers every request (tried again "
                                  "when the registry changes, or in %.0f s)", wanted[role], CHALLENGER_RETRY_S)
        switched = any(loaded[role] is not self.current[role] for role in loaded)
        self.current, self._aliases = loaded, aliases
        if switched:
            self.cache.clear()
        log.info("serving champion %s, challenger %s", wanted["champion"], wanted["challenger"])


def _load(version: str, registry: Registry) -> ModelBundle:
    """A version from the BentoML model store (where `amaas package` put it); else, in a fleet, from its bento in
    the artifacts store; else from the registry's folder."""
    try:
        return ModelBundle.load(Path(bentoml.models.get(f"amaas:{version}").path))
    except bentoml.exceptions.NotFound:
        pass
    shared_state = state()
    found = registry.store.version(version) if registry.store is not None else None
    if found is not None and found["bento"] and shared_state.cfg.artifacts_url:
        fetch_bento(shared_state.cfg.artifacts_url, found["bento"])
        return ModelBundle.load(Path(bentoml.models.get(f"amaas:{version}").path))
    log.warning("amaas:%s is not in the BentoML store; loading it from the registry", version)
    return registry.load(version)


# every prediction is in the prediction log already; no access-log line per request (522 -> 561 rps measured)
@bentoml.service(name="amaas_service", traffic={"timeout": 30}, logging={"access": {"enabled": False}})
class AmaasService:
    model_ref = bentoml.models.BentoModel(ARGS.model_tag)

    def __init__(self) -> None:
        import torch

        # batches here are small and requests come in parallel: torch's intra-op threads only contend
        # (one row: 23 ms with 2 threads, 3.9 ms with 1, measured under load on 2 cores)
        torch.set_num_threads(1)
        self.settings = settings()
        self.models = MODELS.get(ModelBundle.load(Path(self.model_ref.path)))
        MODELS.answer, MODELS.explain_rows = self.answer, self.explain
        if self.models.cache.size:  # requests whose answers are all cached skip the batch queue
            MODELS.cached_answer = functools.partial(self.answer, cached_only=True)
        self.log = MODELS.log = state().prediction_log()
        schema = self.settings.data_schema
        self.features = [*schema.numeric, *schema.categorical]
        self.id_column = schema.id_column  # None: the table has no id, nothing to join labels by
        self.time_column = schema.time_column  # logged as the row's own time when a client sends it
        if PROJECT:
            registry = Registry(PATHS.registry, state().registry_store)
            self.models.follow(registry)
            threading.Thread(target=self._watch, args=(registry,), daemon=True, name="registry-watch").start()
        # The loaded libraries and models are millions of long-lived objects: without this, each full
        # garbage collection walks them all and stalls requests (~170 ms every ~4 s at 200 rps, measured).
        gc.collect()
        gc.freeze()

    def _watch(self, registry: Registry) -> None:
        """Follow the registry every reload_interval_s, and at once on POST /admin/reload to any worker."""
        loading = functools.partial(one_at_a_time, PATHS.api_keys.with_name(RELOAD_LOCK))  # a rolling switch
        keep_following(lambda: self.models.follow(registry, loading), self.settings.serve.reload_interval_s,
                       state().limits, server_id())

    def __metrics__(self, content: str) -> str:
        """BentoML's hook on /metrics: its text plus the versions served, the canary share, this worker's
        response cache and explanations, and the newest report's attribution drift (amaas_* metrics)."""
        attribution = latest_attribution_drift(PATHS.drift_report, self.settings.report.attribution_drift_threshold
                                               ) if PROJECT else {}
        return with_served_metrics(content, MODELS.versions(), MODELS.cache_stats(),
                                   MODELS.models.explained if MODELS.models else 0, attribution,
                                   MODELS.phases.snapshot())

    # BentoML's batching of this API serves /predict: the gateway hands it the rows it checked (MODELS.predict)
    @bentoml.api(batchable=ARGS.batching, max_batch_size=ARGS.max_batch_size, max_latency_ms=ARGS.max_latency_ms)
    def predict(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """For each row: the label and the probability of each class (binary: also of the positive class),
        or the predicted value; with the model version and the request id."""
        answers = self.answer(rows)
        assert answers is not None
        return answers

    def explain(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """For each row: the answer with its explanation (pipelines.explain), by the model its route picks (a
        shadow row: the champion; nothing is cached, no challenger scores it in the shadow), logged with
        `explained` set."""
        models = self.models.current
        champion, challenger = models["champion"], models["challenger"]
        assert champion is not None
        routes, answered_by = _routed(rows, champion, challenger)
        answers: list[dict[str, Any]] = [{}] * len(rows)
        for bundle in {id(b): b for b in answered_by}.values():
            picked = [i for i, b in enumerate(answered_by) if b is bundle]
            for i, answer in zip(picked, bundle.explained(features(bundle, [rows[i] for i in picked])), strict=True):
                answers[i] = answer
        self.models.explained += len(rows)
        return self._logged(rows, routes, answered_by, answers, {}, None, explained=True)

    def answer(self, rows: list[dict[str, Any]], cached_only: bool = False) -> list[dict[str, Any]] | None:
        """The answers to `rows`, logged: from the response cache where it has them, else from the model. With
        `cached_only` (a request before it queues for a batch), None, nothing logged, unless all are cached."""
        clock = [time.perf_counter()]  # at the end of each batch phase (metrics.BATCH_PHASES)
        models = self.models.current  # one generation for the whole batch
        champion, challenger = models["champion"], models["challenger"]
        assert champion is not None
        cache = self.models.cache  # a hit is what that version answered for the same cleaned row
        find = cache.cached if cached_only else cache.answers
        routes, answered_by = _routed(rows, champion, challenger)
        answers: list[dict[str, Any]] = [{}] * len(rows)
        for bundle in {id(b): b for b in answered_by}.values():
            picked = [i for i, b in enumerate(answered_by) if b is bundle]
            found = find(bundle, [rows[i] for i in picked])
            if found is None:
                return None
            for i, answer in zip(picked, found, strict=True):
                answers[i] = answer
        shadowed = [i for i, route in enumerate(routes) if route == "shadow"] if challenger else []
        shadow: dict[int, dict[str, Any]] = {}
        if shadowed and challenger:
            found = find(challenger, [rows[i] for i in shadowed])
            if found is None:
                return None
            shadow = dict(zip(shadowed, found, strict=True))
        if cached_only:
            cache.count_hits(len(rows) + len(shadow))
        clock.append(time.perf_counter())
        logged = self._logged(rows, routes, answered_by, answers, shadow, challenger)
        clock.append(time.perf_counter())
        MODELS.phases.batch(clock)
        return logged

    def _logged(self, rows: list[dict[str, Any]], routes: list[str], answered_by: list[ModelBundle],
                answers: list[dict[str, Any]], shadow: dict[int, dict[str, Any]], challenger: ModelBundle | None,
                explained: bool = False) -> list[dict[str, Any]]:
        """The answers as sent (with the model version and the request id), written to the prediction log."""
        out, entries, at, id_column, time_column = [], [], now_iso(), self.id_column, self.time_column
        for i, row in enumerate(rows):
            version, request_id = answered_by[i].version, row.get(REQUEST_ID)
            out.append({**answers[i], "model_version": version, "request_id": request_id})
            entries.append(log_entry(
                time=at, answer=answers[i], model_version=version, request_id=request_id, key_name=row.get(KEY_NAME),
                route=routes[i], id=row.get(id_column) if id_column else None,
                row_time=row.get(time_column) if time_column else None, features={f: row.get(f) for f in self.features},
                shadow_model_version=challenger.version if challenger and i in shadow else None, shadow=shadow.get(i),
                explained=explained))
        # cached answers too: the log holds every answer served. Written, not yet durable: the gateway holds each
        # answer until it is (MODELS.durable), so the next batch need not wait for this one's fsync
        self.log.write(entries)
        return out


def _routed(rows: list[dict[str, Any]], champion: ModelBundle, challenger: ModelBundle | None
            ) -> tuple[list[str], list[ModelBundle]]:
    """Each row's route (as the gateway set it) and the model that answers it (a challenger not loaded: the
    champion; a shadow row: the champion)."""
    routes = [row.get(ROUTE, "champion") for row in rows]
    return routes, [challenger if route == "challenger" and challenger else champion for route in routes]


class _Shared:
    """The Models of this server process, shared by the service and the gateway."""

    def __init__(self) -> None:
        self.models: Models | None = None
        self.answer: Callable[[Rows], Rows | None] | None = None  # the service's (AmaasService.answer)
        self.explain_rows: Callable[[Rows], Rows] | None = None  # the service's (AmaasService.explain)
        # the service's answer from the response cache alone; None while the cache is off
        self.cached_answer: Callable[[Rows], Rows | None] | None = None
        self.log: GroupCommit | None = None  # the files of one host, or a fleet's database
        self.phases = PhaseTimes()  # where /predict's time goes in this process (/metrics)
        self._batching: Any = None  # BentoML's app of this worker (its adaptive batching), found on first use
        self._thread = anyio.CapacityLimiter(1)  # batching off: one request at a time on the model's thread

    async def predict(self, scope: dict[str, Any], rows: Rows) -> Rows:
        """The gateway's way to the model: the answers to its checked rows, logged. All from the response cache
        when it has them (no wait for a batch), else through BentoML's adaptive batching of the `predict` API
        (ServiceUnavailable when it sheds them), or with batching off on the model's thread."""
        if self.cached_answer is not None and (found := self.cached_answer(rows)) is not None:
            return found
        if not ARGS.batching:
            assert self.answer is not None, "the service is not initialized"
            answers = await anyio.to_thread.run_sync(self.answer, rows, limiter=self._thread)
            assert answers is not None
            return answers
        if self._batching is None:
            self._batching = _bentoml_app(scope["app"])
        answers = await self._batching.batch_infer("predict", (rows,), {})
        return list(answers)

    async def explain(self, scope: dict[str, Any], rows: Rows) -> Rows:
        """The gateway's way to explanations: the answers to its checked rows with their explanations, logged, on
        the model's thread (off the event loop; not batched: an explanation costs many model calls already)."""
        assert self.explain_rows is not None, "the service is not initialized"
        del scope  # the same signature as predict
        return await anyio.to_thread.run_sync(self.explain_rows, rows, limiter=self._thread)

    async def durable(self) -> None:
        """Return once every answer this process has given so far is in the prediction log on disk."""
        if self.log is not None:
            await self.log.synced()

    def get(self, champion: ModelBundle) -> Models:
        self.models = self.models or Models(champion)
        return self.models

    def routing(self) -> tuple[float, bool]:
        return self.models.routing() if self.models else (0.0, False)

    def cache_stats(self) -> dict[str, int]:
        return self.models.cache.stats() if self.models else {"size": 0, "entries": 0, "hits": 0, "misses": 0}

    def versions(self) -> dict[str, Any]:
        """What answers requests now: GET /models, which `amaas deploy` polls."""
        if self.models is None:
            return {"champion": None, "challenger": None, "canary_share": 0.0, "shadow": False}
        current = self.models.current
        share, shadow = self.models.routing()
        return {role: (bundle.version if bundle else None) for role, bundle in current.items()} | {
            "canary_share": share, "shadow": shadow}


def _bentoml_app(app: Any) -> Any:
    """BentoML's ServiceAppFactory behind the Starlette app `app`: the object whose `api_endpoint_wrapper` its
    /predict route calls, and whose `batch_infer` feeds the API's adaptive batching (its dispatcher, its batch-size
    metric, its model thread)."""
    for known in app.routes:
        endpoint = getattr(known, "endpoint", None)
        if getattr(known, "name", None) == "predict" and isinstance(endpoint, functools.partial):
            return endpoint.func.__self__  # type: ignore[attr-defined]
    raise RuntimeError("BentoML's app has no predict route to batch /predict with")


# BentoML reads the API function's signature each time it fetches the function (every request); read it once
AmaasService.apis["predict"].func.__signature__ = inspect.signature(AmaasService.apis["predict"].func)
MODELS = _Shared()
bound_metric_labels()  # unknown paths get 404 before BentoML's metrics label them
cancelled_timeouts()  # BentoML's per-request timeout timers are cancelled when the request is over
AmaasService.add_asgi_middleware(Gateway, settings=settings, state=state, routing=MODELS.routing,
                                 versions=MODELS.versions, predict=MODELS.predict, durable=MODELS.durable,
                                 explain=MODELS.explain, phases=MODELS.phases,
                                 follows_registry=bool(PROJECT))
