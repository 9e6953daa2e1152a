"""The ASGI gateway in front of BentoML's model API: API keys and their scopes, per-key rate limits and quotas,
size limits, the request schema, a request id and a route per request, the admin endpoints (reload, drain,
usage per key), GET /models and the documented /docs.json.

A /predict request it takes goes to the service's `predict` with the rows as checked (defaults, route, request id
and key name added): BentoML's adaptive batching and its worker thread score them, and the gateway writes the
answer. It does not go through BentoML's route for /predict, which would wrap the request in a Starlette request,
parse and validate the body again and build a response: 0.3 of the 1.1 ms of server CPU per single-row
request (measured). BentoML's outer middlewares (metrics, tracing, the request timeout and concurrency limit)
still see it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import orjson
from bentoml.exceptions import ServiceUnavailable
from pydantic import BaseModel, TypeAdapter, ValidationError

from pipelines.config import ServeConfig, Settings
from pipelines.serving.asgi import Receive, Send, buffered
from pipelines.serving.metrics import PhaseTimes
from pipelines.serving.openapi import document
from pipelines.serving.routing import route
from pipelines.serving.schema import answer_model, explained_answer_model, request_schema, with_defaults
from pipelines.state import Shared
from pipelines.state.keys import ApiKeys, KeyEntry, KeyStoreError
from pipelines.state.limits import (
    NO_USAGE,
    POLL_S,
    Decision,
    SharedState,
    StateBusy,
    seconds_to_midnight,
    server_id,
    usage_metrics,
)
from pipelines.state.postgres import PgApiKeys, PgLimits

MODELS_PATH = "/models"  # GET: the versions being served and the canary routing (open, like health)
DOCS_JSON = "/docs.json"
REQUEST_ID = "_request_id"  # added to each row by the gateway, carried through the adaptive batch
ROUTE = "_route"  # champion | challenger | shadow
KEY_NAME = "_key_name"  # the name of the API key that sent the row (never the key), for the prediction log
STATIC_DIR = "/static_content"  # BentoML's Swagger UI files
ADMIN_PATHS = ("/admin/reload", "/admin/drain", "/admin/keys")  # an admin-scoped key only
MODEL_PATHS = ("/predict", "/explain")  # the same body, keys (predict scope), limits and schema
# every route and its one method (another one is 405 with Allow); openapi.py documents each of them
ROUTES: dict[str, tuple[str, ...]] = {
    "/predict": ("POST",), "/explain": ("POST",), MODELS_PATH: ("GET",), DOCS_JSON: ("GET",), "/docs": ("GET",),
    "/": ("GET",), "/readyz": ("GET",), "/livez": ("GET",), "/healthz": ("GET",), "/metrics": ("GET",),
    "/admin/reload": ("POST",), "/admin/drain": ("POST",), "/admin/keys": ("GET",)}
MAX_HEADER_BYTES = 16 * 1024  # all names and values together; more is 431
MAX_REQUEST_ID = 128
REQUEST_ID_PATTERN = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID}}}")
MAX_DEPTH = 16  # JSON nesting: a request is {"rows": [{...}]}, 3 deep
MAX_ERRORS = 20  # field errors listed in a 422 (the count says how many there were)
MAX_ECHO = 100  # characters of an input value echoed in a 422
RETRY_AFTER_S = "1"
RELOAD_WAIT_S = 30.0  # POST /admin/reload waits this long for every worker to follow the registry
log = logging.getLogger("amaas.gateway")

Rows = list[dict[str, Any]]
# predict(scope, rows): the answers to the rows, in order (ServiceUnavailable when BentoML's batching sheds them);
# the scope is the request's (its "app" is BentoML's)
Predict = Callable[[dict[str, Any], Rows], Awaitable[Rows]]
_ANSWER = orjson.OPT_SERIALIZE_NUMPY  # numpy scalars as numbers; NaN (never in an answer) would be null


class Gateway:
    """ASGI middleware in front of the model API: API keys (401) and scopes (403), per-key rate limits and
    quotas (429), draining (503), size limits (413), the request schema (422 with field errors), a request id and
    a route per request, and the admin endpoints. Health, metrics and docs stay open.

    Keys, limits, usage, drain and reload live in the shared state (`state()`: files beside the project, or a
    fleet's PostgreSQL and Redis), so every worker and every replica sees the same keys, buckets and flags."""

    def __init__(self, app: Any, settings: Callable[[], Settings], state: Callable[[], Shared],
                 routing: Callable[[], tuple[float, bool]], versions: Callable[[], dict[str, Any]], predict: Predict,
                 durable: Callable[[], Awaitable[None]] | None = None, follows_registry: bool = False,
                 explain: Predict | None = None, phases: PhaseTimes | None = None) -> None:
        self.app = app
        self.predict = predict  # the service's answers to checked rows
        self.explain = explain  # ... with their explanations (None: /explain is not served)
        self.settings = settings  # called on first use, not here: BentoML builds the gateway at import
        self.shared = state  # likewise
        self.server = server_id()
        self.routing = routing  # (canary share, shadow) now: follows the registry while serving
        self.versions = versions  # GET /models: what is being served now (deploy checks it)
        self.durable = durable  # returns once the answers given so far are in the prediction log on disk
        self.follows_registry = follows_registry  # False: a bento run on its own model, nothing to reload
        self._broken: str | None = None  # the key store's fault as last logged
        self.phases = phases  # where /predict's time goes (None: not counted)

    @cached_property
    def keys(self) -> ApiKeys | PgApiKeys:
        return self.shared().keys

    @cached_property
    def state(self) -> SharedState | PgLimits:
        """Limits, quotas, usage, drain and reload."""
        return self.shared().limits

    @cached_property
    def serve(self) -> ServeConfig:
        return self.settings().serve

    @cached_property
    def model(self) -> TypeAdapter[Any]:
        """The request schema of /predict, from params.yaml."""
        return request_schema(self.settings().data_schema, self.serve.max_rows)

    @cached_property
    def defaults(self) -> dict[str, None]:
        """A row's optional fields, for the rows that leave them out."""
        return with_defaults(self.settings().data_schema)

    @cached_property
    def answer(self) -> type[BaseModel]:
        return answer_model(self.settings().data_schema)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._handle(scope, receive, watched)
        except Exception:  # nothing escapes the gateway: one line, and a 500 if no answer has started
            log.error("unexpected error on %s %s", scope.get("method"), _clip(scope.get("path")), exc_info=True)
            if not started:
                await _reply(send, 500, {"error": "internal error; the server log has the details"})

    async def _handle(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            return await _reply(send, 431, {"error": f"request headers over {MAX_HEADER_BYTES} bytes"})
        path = scope["path"].rstrip("/") or "/"
        if not known_path(path):  # no route of ours: answered here, so no per-path state grows anywhere
            return await _reply(send, 404, {"error": "not found: POST /predict, /explain; GET /models, /docs, "
                                                     "/readyz, /livez, /metrics; /admin/reload, /admin/drain, "
                                                     "/admin/keys"})
        allowed = ROUTES.get(path, ("GET",))  # BentoML's Swagger UI files: GET
        if scope["method"] not in allowed:
            return await _reply(send, 405, {"error": f"{path} takes {', '.join(allowed)}"},
                                [(b"allow", ", ".join(allowed).encode())])
        if path == "/docs":  # the Swagger UI lives at /; /docs is where people look for it
            scope = {**scope, "path": "/", "raw_path": b"/"}
            path = "/"
        if path == MODELS_PATH:
            return await _reply(send, 200, self.versions())
        if path == DOCS_JSON:
            return await self._documented(scope, receive, send)
        if path == "/readyz":
            return await self._ready(scope, receive, send)
        if path == "/metrics":
            return await self._metered(scope, receive, send)
        # latin-1 maps every byte: a header that is not UTF-8 is a wrong key or a bad id, never an error
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path in ADMIN_PATHS:
            return await self._admin(path, headers, receive, send)
        if path not in MODEL_PATHS:  # health and the Swagger UI: BentoML's, open
            return await self.app(scope, receive, send)
        clock = [time.perf_counter()]  # at the end of each phase (metrics.REQUEST_PHASES)
        entry = None
        if self.serve.auth:
            entry = await self._authorized(headers, send, "predict", "`amaas keys add NAME` (default scope predict)")
            if entry is None:
                return None
        score = self.predict if path == "/predict" else self.explain
        if score is None:
            return await _reply(send, 404, {"error": "this server does not serve /explain"})
        limit = entry.limit(self.serve.rate_limit) if entry else None
        try:
            decision = self.state.admit(self.server, entry.name if entry else None, limit)
        except StateBusy as exc:
            return await self._state_busy(exc, send)
        if decision.refused:
            return await self._refuse(decision, entry, send)
        clock.append(time.perf_counter())
        if not (headers.get("content-length") or "0").isdigit():
            return await _reply(send, 400, {"error": "Content-Length is not a number"})
        body = await _read_body(receive, self.serve.max_body_bytes, headers)
        if body is None:
            return await _reply(send, 413, {"error": f"request body over serve.max_body_bytes="
                                                     f"{self.serve.max_body_bytes} bytes"})
        try:
            payload = _parse(body, check_depth=False)
        except ValueError as exc:
            return await self._not_json(exc, send)
        clock.append(time.perf_counter())
        if isinstance(payload, dict) and isinstance(payload.get("rows"), list) and len(
                payload["rows"]) > self.serve.max_rows:
            return await _reply(send, 413, {"error": f"{len(payload['rows'])} rows, more than serve.max_rows="
                                                     f"{self.serve.max_rows}: split the request"})
        try:
            request: dict[str, Any] = self.model.validate_python(payload)
        except ValidationError as exc:
            try:  # only a refused request can be deep; its errors echo inputs, which must be shallow
                _check_depth(payload)
            except ValueError as deep:
                return await self._not_json(deep, send)
            return await _reply(send, 422, {"error": f"{exc.error_count()} invalid field(s)",
                                            "detail": _field_errors(exc)})
        if (request.get("rows") is None) == (request.get("row") is None):
            return await _reply(send, 422, {"error": "send either 'rows' (a list) or 'row' (one row)",
                                            "detail": [{"loc": ["rows"], "msg": "exactly one of rows, row"}]})
        received: list[dict[str, Any]] = request.get("rows") or [request["row"]]
        if entry is not None and limit is not None:
            try:
                left = self.state.charge(entry.name, len(received), limit)
            except StateBusy as exc:
                return await self._state_busy(exc, send)
            if left is not None:
                return await _reply(send, 429, {"error": f"daily quota of API key {entry.name!r}: {left} of "
                                                         f"{limit.daily_quota} rows left today (UTC), this request "
                                                         f"has {len(received)}: send fewer rows or wait"},
                                    [(b"retry-after", str(seconds_to_midnight(time.time())).encode())])
        request_id = self._request_id(headers.get("x-request-id"))
        where = route(request_id, *self.routing())
        tags = {REQUEST_ID: request_id, ROUTE: where, KEY_NAME: entry.name if entry else None}
        rows = [{**self.defaults, **r, **tags} for r in received]
        clock.append(time.perf_counter())
        try:
            answers = await score(scope, rows)
        except ServiceUnavailable:  # BentoML's batching shed it: it would wait over serve.max_latency_ms
            log.warning("shed request %s: overloaded (it would wait over serve.max_latency_ms)", request_id)
            if entry is not None and limit is not None:  # nothing was predicted: its rows do not count (a balancer
                with contextlib.suppress(StateBusy):  # resends a 503, and the resent request is charged again)
                    self.state.refund(entry.name, len(received))
            return await _reply(send, 503, {"error": "overloaded, retry", "request_id": request_id},
                                [(b"retry-after", RETRY_AFTER_S.encode()), (b"x-request-id", request_id.encode())])
        clock.append(time.perf_counter())
        if self.durable is not None:
            try:
                await self.durable()  # answered means logged: this answer's rows are durable before it leaves
            except StateBusy as exc:  # a fleet's log database stayed unreachable: no answer that is not logged;
                log.error("%s", exc)  # 504, not 503: its rows may still reach the log, a balancer must not resend it
                return await _reply(send, 504, {"error": "the prediction log could not be written in time; the "
                                                         "server log has the details", "request_id": request_id})
        clock.append(time.perf_counter())
        await _send(send, 200, answers_body(answers), [*decision.headers(), (b"x-request-id", request_id.encode())])
        if self.phases is not None and path == "/predict":
            clock.append(time.perf_counter())
            self.phases.request(clock)

    async def _not_json(self, exc: ValueError, send: Send) -> None:
        await _reply(send, 422, {"error": "body is not valid JSON", "detail": [{"msg": _clip(str(exc))}]})

    async def _authorized(self, headers: dict[str, str], send: Send, scope: str, create: str) -> KeyEntry | None:
        """The sender's key entry if it has `scope`, or None after answering 401/503 (see _authenticated) or 403
        (another scope; `create` says how to make a key that has it)."""
        entry = await self._authenticated(headers, send)
        if entry is not None and scope not in entry.scopes:
            await _reply(send, 403, {"error": f"API key {entry.name!r} has no {scope!r} scope: create one with "
                                              f"{create}"})
            return None
        return entry

    async def _authenticated(self, headers: dict[str, str], send: Send) -> KeyEntry | None:
        """The sender's key entry, or None after answering 401 (no valid key) or 503 (the key file is corrupt)."""
        try:
            entry = self.keys.lookup(_key(headers))
            self._broken = None
        except KeyStoreError as exc:
            self._report_broken_keys(exc)
            await _reply(send, 503, {"error": "the server's API key store is unreadable; the operator must repair "
                                              "it (see the server log)"})
            return None
        if entry is None:
            await _reply(send, 401, {"error": "missing or invalid API key: send 'Authorization: Bearer <key>' "
                                              "(create one with `amaas keys add NAME`)"})
        return entry

    async def _refuse(self, decision: Decision, entry: KeyEntry | None, send: Send) -> None:
        """429 (rate or daily quota) or 503 (draining), with Retry-After and X-RateLimit-*."""
        limit, name = decision.limit, entry.name if entry else None
        if decision.refused == "draining":
            body = "this server is draining: it takes no new requests; send them to another server"
        elif decision.refused == "quota" and limit is not None:
            body = f"daily quota of API key {name!r} used up ({limit.daily_quota} rows per UTC day)"
        else:
            rps = limit.rps if limit else None
            body = f"rate limit of API key {name!r}: {rps:g} requests/s, bursts of {limit.burst if limit else 0}"
        await _reply(send, 503 if decision.refused == "draining" else 429,
                     {"error": f"{body}; retry after {decision.retry_after_s} s"}, decision.headers())

    async def _state_busy(self, exc: StateBusy, send: Send) -> None:
        log.warning("%s", exc)
        await _reply(send, 503, {"error": "overloaded (the rate-limit state is busy), retry"},
                     [(b"retry-after", RETRY_AFTER_S.encode())])

    async def _ready(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """BentoML's readiness, except while this server drains: then 503, so a balancer moves away."""
        try:
            draining = self.state.draining(self.server)
        except StateBusy as exc:
            return await self._state_busy(exc, send)
        if draining:
            return await _reply(send, 503, {"status": "draining"})
        await self.app(scope, receive, send)

    async def _metered(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """BentoML's /metrics with each API key's usage (all workers: read from the shared state) appended."""
        started, text = await buffered(self.app, scope, receive)
        if started.get("status") == 200:
            try:
                text = (text if not text or text.endswith(b"\n") else text + b"\n") + usage_metrics(
                    self.state.usage()).encode()
            except StateBusy as exc:
                log.warning("/metrics without per-key usage: %s", exc)
        headers = [(k, v) for k, v in started.get("headers", []) if k.lower() != b"content-length"]
        await send({**started, "headers": [*headers, (b"content-length", str(len(text)).encode())]})
        await send({"type": "http.response.body", "body": text})

    async def _admin(self, path: str, headers: dict[str, str], receive: Receive, send: Send) -> None:
        """/admin/*: an admin-scoped key (401 without a key, 403 with another), whether or not serve.auth is on."""
        if await self._authorized(headers, send, "admin", "`amaas keys add NAME --scope admin`") is None:
            return None
        try:
            if path == "/admin/keys":
                return await _reply(send, 200, self._usage())
            if path == "/admin/drain":
                return await self._drain(headers, receive, send)
            return await self._reload(send)
        except StateBusy as exc:
            return await self._state_busy(exc, send)

    def _usage(self) -> dict[str, Any]:
        """GET /admin/keys: each key's scopes, limits and usage (all workers)."""
        usage = self.state.usage()
        return {name: {"scopes": list(entry.scopes), **vars(entry.limit(self.serve.rate_limit)),
                       **vars(usage.get(name, NO_USAGE))}
                for name, entry in self.keys.entries().items()}

    async def _drain(self, headers: dict[str, str], receive: Receive, send: Send) -> None:
        """POST /admin/drain (body optional; {"drain": false} takes requests again): every worker of this server
        answers /predict 503 and /readyz not ready."""
        body = await _read_body(receive, 1024, headers) if (headers.get("content-length") or "0").isdigit() else None
        try:
            payload = _parse(body) if body is not None else "not a number"
        except ValueError:
            payload = "not JSON"
        if payload is None:
            payload = {}
        if not (isinstance(payload, dict) and set(payload) <= {"drain"} and isinstance(payload.get("drain", True),
                                                                                      bool)):
            return await _reply(send, 422, {"error": 'send no body, or {"drain": true} or {"drain": false}'})
        draining = bool(payload.get("drain", True))
        self.state.set_draining(self.server, draining)
        log.warning("server %s %s", self.server, "draining: new /predict requests get 503" if draining else
                    "takes requests again")
        await _reply(send, 200, {"draining": draining})

    async def _reload(self, send: Send) -> None:
        """POST /admin/reload: every worker of this server follows the registry now; answered when all have
        (504 if some did not within RELOAD_WAIT_S)."""
        if not self.follows_registry:
            return await _reply(send, 409, {"error": "this server serves its bento's own model (no project "
                                                     "registry, $AMAAS_ROOT unset): there is nothing to reload"})
        generation = self.state.request_reload(self.server)
        workers, deadline = self.serve.workers, time.monotonic() + RELOAD_WAIT_S
        while (followed := self.state.followers(self.server, generation)) < workers and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S / 4)
        await _reply(send, 200 if followed >= workers else 504,
                     {"followed": followed, "workers": workers, "models": self.versions()})

    def _request_id(self, given: str | None) -> str:
        """The client's X-Request-ID if it is a safe one, else a new id (the bad one logged, clipped, once)."""
        if given and REQUEST_ID_PATTERN.fullmatch(given):
            return given
        made = uuid.uuid4().hex
        if given:
            log.warning("request %s: X-Request-ID %s is not 1-%d characters of [A-Za-z0-9._:-]; replaced",
                        made, ascii(_clip(given, 40)), MAX_REQUEST_ID)
        return made

    def _report_broken_keys(self, exc: KeyStoreError) -> None:
        """One log line per fault of the key store, not one per request."""
        if str(exc) != self._broken:
            self._broken = str(exc)
            log.error("%s; every keyed request gets 503 until then", exc)

    async def _documented(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """The OpenAPI document of every route the gateway answers (BentoML's title and version)."""
        started, body = await buffered(self.app, scope, receive)
        bentoml = json.loads(body) if started.get("status") == 200 else {}
        info = bentoml.get("info", {}) if isinstance(bentoml, dict) else {}
        limits = {"max_rows": self.serve.max_rows, "max_body_bytes": self.serve.max_body_bytes}
        explained = None if self.explain is None else explained_answer_model(self.settings().data_schema)
        routes = {path: methods for path, methods in ROUTES.items() if path != "/explain" or explained}
        await _reply(send, 200, document({"title": "amaas", "version": "unknown", **info}, self.model, self.answer,
                                         self.serve.auth, routes, limits, explained))


def known_path(path: str) -> bool:
    """Whether `path` is a route of the service (or one of BentoML's Swagger UI files): other paths get 404
    before anything keeps per-path state for them (BentoML's metrics label requests by path)."""
    path = path.rstrip("/") or "/"
    if path in ROUTES:
        return True
    if not path.startswith(STATIC_DIR + "/") or ".." in path:
        return False
    return (_static_root() / path[len(STATIC_DIR) + 1:]).is_file()  # a fixed set of files: bounded labels


@functools.cache
def _static_root() -> Path:
    import bentoml._internal.server.http_app as http_app  # where BentoML keeps its static_content folder

    return Path(http_app.__file__).resolve().parent / "static_content"


def bound_metric_labels() -> None:
    """Make BentoML's request metrics (the outermost middleware, labelled by path) see known paths only: an
    unknown path is answered 404 before them, so unauthenticated probes cannot grow /metrics."""
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware as Metrics

    metered: Any = Metrics.__call__
    if getattr(metered, "_amaas_bounded", False):
        return

    async def known_only(self: Any, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not known_path(scope["path"]):
            return await _reply(send, 404, {"error": "not found"})
        await metered(self, scope, receive, send)

    known_only._amaas_bounded = True  # type: ignore[attr-defined]
    known_only._amaas_original = metered  # type: ignore[attr-defined]  # what tests/unit/test_bentoml_patches.py pins
    setattr(Metrics, "__call__", known_only)  # noqa: B010 (a method replaced on the class)


def cancelled_timeouts() -> None:
    """BentoML's TimeoutMiddleware (traffic.timeout, 504 when no answer starts in time) schedules a timer per
    request and never cancels it: every request leaves a timer, a future and a context alive for the whole timeout
    (30 s: 40,000 of each at 1,300 rps), and the collector's full passes over them grew to 90 ms pauses, every
    second, that shed requests (measured with gc.callbacks). The same middleware with the timer cancelled once
    the request is over; a request that ends without an answer ends at once instead of waiting for the timer."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    if getattr(TimeoutMiddleware.__call__, "_amaas_cancels", False):
        return

    async def timed(self: Any, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        started = loop.create_future()  # done when the answer starts
        def expire() -> None:
            if not started.done():
                started.set_result(False)

        timer = loop.call_later(self.timeout, expire)

        async def starting(message: dict[str, Any]) -> None:
            if not started.done():
                started.set_result(True)
            await send(message)

        handled = asyncio.ensure_future(self.app(scope, receive, starting))
        try:
            await asyncio.wait((started, handled), return_when=asyncio.FIRST_COMPLETED)
            if started.done() and not started.result() and handled.cancel():
                return await _reply(send, 504, {"error": f"no answer within traffic.timeout={self.timeout} s"})
            await handled
        finally:
            timer.cancel()
            started.cancel()

    timed._amaas_cancels = True  # type: ignore[attr-defined]
    timed._amaas_original = TimeoutMiddleware.__call__  # type: ignore[attr-defined]  # pinned by a test
    setattr(TimeoutMiddleware, "__call__", timed)  # noqa: B010 (a method replaced on the class)


def _parse(body: bytes, check_depth: bool = True) -> Any:
    """The JSON of `body`, strictly: UTF-8, no NaN or Infinity, at most MAX_DEPTH levels (ValueError if not;
    `check_depth` False leaves the depth to the caller: a request the schema takes is 3 levels deep).

    orjson parses (strict already: it refuses NaN, Infinity, numbers out of range and bad UTF-8, and stops at 1,024
    levels); only a body it refuses goes through the standard parser again, for an error that names the fault."""
    try:
        payload = orjson.loads(body or b"null")
    except orjson.JSONDecodeError as exc:
        raise ValueError(_why_not_json(body, exc)) from None
    if check_depth:
        _check_depth(payload)
    return payload


def _why_not_json(body: bytes, exc: orjson.JSONDecodeError) -> str:
    """What is wrong with a body orjson refused, in words a client can act on."""
    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number (send null, or a finite number)")

    try:
        _check_depth(json.loads(body.decode("utf-8"), parse_constant=constant))
    except UnicodeDecodeError as error:
        return f"body is not UTF-8 (byte {error.start})"
    except RecursionError:
        return f"JSON nested deeper than {MAX_DEPTH} levels"
    except ValueError as error:
        return str(error)
    return f"{exc} (numbers must be finite doubles)"  # the standard parser takes 1e400 as infinity


def _check_depth(payload: Any) -> None:
    stack = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _field_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """At most MAX_ERRORS field errors, each with its input clipped to MAX_ECHO characters."""
    out = []
    for error in exc.errors(include_url=False, include_context=False)[:MAX_ERRORS]:
        value = error.get("input")
        short = value if value is None or isinstance(value, (bool, int, float)) else _clip(
            value if isinstance(value, str) else json.dumps(value, default=str))
        out.append({"loc": list(error["loc"]), "msg": _clip(error["msg"]), "type": error["type"], "input": short})
    return out


def _clip(value: Any, limit: int = MAX_ECHO) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _key(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key")


async def _read_body(receive: Receive, limit: int, headers: dict[str, str]) -> bytes | None:
    """The whole body, or None as soon as it is over `limit` bytes (checked on Content-Length first)."""
    if int(headers.get("content-length") or 0) > limit:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def answers_body(answers: Rows) -> bytes:
    """The JSON body of /predict's answers: compact, numpy numbers as numbers."""
    return orjson.dumps(answers, option=_ANSWER)


async def _reply(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
                 ) -> None:
    await _send(send, status, json.dumps(body, default=str, allow_nan=False).encode(), headers)


async def _send(send: Send, status: int, data: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A whole JSON response."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})
