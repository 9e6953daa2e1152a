"""What the server adds to BentoML's Prometheus /metrics: the model versions being served and the canary
routing, as gauges (infra/grafana/dashboards/amaas-serving.json charts them), the response cache's hits,
misses, hit ratio and entries, and per column the rows answered with an unseen category or a number outside the
reference range.

They are computed when /metrics is scraped (BentoML's `__metrics__` hook on the service), from the same state
that GET /models answers with: never stale, and nothing shared between worker processes (the cache figures
are those of the worker that answers the scrape).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

MODEL_INFO = "amaas_model_info"
CANARY_SHARE = "amaas_canary_share"
SHADOW = "amaas_shadow_enabled"
CACHE = "amaas_cache"  # _hits_total, _misses_total, _hit_ratio, _entries, _size
UNSEEN = "amaas_unseen_category_rows"  # _total, per column: rows answered with a category the model never saw
OUT_OF_REFERENCE = "amaas_out_of_reference_rows"  # _total, per column: rows answered outside the reference range
EXPLAINED = "amaas_explained_rows"  # _total: rows answered on /explain
ATTRIBUTION_DRIFT = "amaas_attribution_drift"  # (and _threshold): the newest report's, where the server has it
PHASE = "amaas_predict_phase"  # _seconds_total per phase, _requests_total, _batches_total: where /predict's time goes
ROLES = ("champion", "challenger")
# A /predict request's phases, in order. Per request, on the event loop: auth (key and limits), parse (body read
# and JSON), checks (the request schema, a daily quota's charge, rows built), batch (from handing the rows to the
# batching until the answers are back: the wait for a batch, thread hops and the batch's work), durable (the wait
# for the log's fsync), answer (serialized and sent). Per batch, on the model's thread: score (the cache's or the
# model's answers) and log (the log entries built, encoded and written); a batch's are shared by its requests. A
# request the response cache answers whole skips the batching: its score and log, on the event loop, count as a
# batch of its own (so `batch` less `score` and `log` is still the waiting, for hits and misses alike).
REQUEST_PHASES = ("auth", "parse", "checks", "batch", "durable", "answer")
BATCH_PHASES = ("score", "log")


class PhaseTimes:
    """Wall seconds this worker process spent in each phase of /predict (REQUEST_PHASES, BATCH_PHASES), summed, and
    how many requests and batches they came from: a few clock reads per request (the benchmark reads them from
    /metrics, per worker, to print where a request's time goes)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys((*REQUEST_PHASES, *BATCH_PHASES), 0.0)
        self.requests = 0  # answered /predict requests (200) whose request phases are counted
        self.batches = 0
        self._lock = threading.Lock()  # batches end on the model's thread, requests on the event loop

    def request(self, times: list[float]) -> None:
        """One answered request: the clock (time.perf_counter) at its start and at the end of each request phase."""
        with self._lock:
            for phase, started, ended in zip(REQUEST_PHASES, times, times[1:], strict=False):
                self.seconds[phase] += ended - started
            self.requests += 1

    def batch(self, times: list[float]) -> None:
        """One batch: the clock at its start and at the end of each batch phase."""
        with self._lock:
            for phase, started, ended in zip(BATCH_PHASES, times, times[1:], strict=False):
                self.seconds[phase] += ended - started
            self.batches += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"seconds": dict(self.seconds), "requests": self.requests, "batches": self.batches}


class _Served(Collector):
    def __init__(self, versions: dict[str, Any], cache: dict[str, Any], explained: int,
                 attribution: dict[str, float], phases: dict[str, Any] | None) -> None:
        self.phases = phases
        self.versions = versions
        self.cache = cache
        self.explained = explained
        self.attribution = attribution

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        info = GaugeMetricFamily(MODEL_INFO, "Model versions being served: 1 per role (champion, challenger) and "
                                             "version", labels=["role", "version"])
        for role in ROLES:
            if self.versions.get(role):
                info.add_metric([role, str(self.versions[role])], 1.0)
        yield info
        yield GaugeMetricFamily(CANARY_SHARE, "Share of requests the challenger answers now (0 without a "
                                              "loaded challenger)", value=float(self.versions["canary_share"]))
        yield GaugeMetricFamily(SHADOW, "1 while every request is also scored by the challenger (shadow)",
                                value=float(bool(self.versions["shadow"])))
        hits, misses = self.cache["hits"], self.cache["misses"]
        yield CounterMetricFamily(f"{CACHE}_hits", "Rows answered from the response cache", value=hits)
        yield CounterMetricFamily(f"{CACHE}_misses", "Rows the response cache sent to the model (none while it "
                                                     "is off)", value=misses)
        yield GaugeMetricFamily(f"{CACHE}_hit_ratio", "Share of rows answered from the response cache so far",
                                value=hits / (hits + misses) if hits + misses else 0.0)
        yield GaugeMetricFamily(f"{CACHE}_entries", "Answers in the response cache now (emptied on a model "
                                                    "switch)", value=self.cache["entries"])
        yield GaugeMetricFamily(f"{CACHE}_size", "The most answers the response cache keeps (serve.cache.size; "
                                                 "0: off)", value=self.cache["size"])
        yield CounterMetricFamily(EXPLAINED, "Rows answered on /explain (with an explanation; also in the prediction "
                                             "log, flagged explained)", value=self.explained)
        if "drift" in self.attribution:
            yield GaugeMetricFamily(ATTRIBUTION_DRIFT, "Attribution drift of the champion in the newest report "
                                                       "(reports/drift.json: 1 - NDCG of its top columns)",
                                    value=self.attribution["drift"])
            yield GaugeMetricFamily(f"{ATTRIBUTION_DRIFT}_threshold", "report.attribution_drift_threshold",
                                    value=self.attribution["threshold"])
        for name, kind, what in ((UNSEEN, "unseen", "with a category the model never saw (answered as the unknown "
                                                    "category)"),
                                 (OUT_OF_REFERENCE, "out_of_reference", "with a number outside the column's reference "
                                                                        "range (answered; drift for monitoring)")):
            counts = CounterMetricFamily(name, f"Rows answered {what}, per column", labels=["column"])
            for column, rows in sorted(self.cache.get(kind, {}).items()):  # columns of the schema: bounded labels
                counts.add_metric([column], rows)
            yield counts
        if self.phases is not None:  # labelled by process: a scrape reaches one worker, the benchmark adds them up
            worker = str(os.getpid())
            seconds = CounterMetricFamily(f"{PHASE}_seconds", "Wall seconds this worker spent in each phase of "
                                                              "/predict (see pipelines/serving/metrics.py)",
                                          labels=["phase", "worker"])
            for phase, value in self.phases["seconds"].items():
                seconds.add_metric([phase, worker], value)
            yield seconds
            for kind in ("requests", "batches"):
                counted = CounterMetricFamily(f"{PHASE}_{kind}", f"/predict {kind} whose phases are counted",
                                              labels=["worker"])
                counted.add_metric([worker], self.phases[kind])
                yield counted


def served_metrics(versions: dict[str, Any], cache: dict[str, Any], explained: int = 0,
                   attribution: dict[str, float] | None = None, phases: dict[str, Any] | None = None) -> str:
    """Prometheus text for `versions` (what GET /models answers: champion, challenger, canary_share, shadow),
    `cache` (ResponseCache.stats: size, entries, hits, misses), the rows `explained` on /explain, the newest
    report's `attribution` drift (drift, threshold; none: no gauge) and `phases` (PhaseTimes.snapshot; none: no
    phase metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Served(versions, cache, explained, attribution or {}, phases))
    return generate_latest(registry).decode()


def with_served_metrics(content: str, versions: dict[str, Any], cache: dict[str, Any], explained: int = 0,
                        attribution: dict[str, float] | None = None, phases: dict[str, Any] | None = None) -> str:
    """BentoML's /metrics text followed by the served-model, cache, explanation and phase metrics."""
    return (content if not content or content.endswith("\n") else content + "\n") + served_metrics(
        versions, cache, explained, attribution, phases)


def latest_attribution_drift(drift_report: Path, threshold: float) -> dict[str, float]:
    """{drift, threshold} from the newest reports/drift.json, or {} without one (or without a value in it)."""
    try:
        value = json.loads(drift_report.read_text()).get("attribution_drift")
    except (OSError, ValueError, AttributeError):
        return {}
    return {"drift": float(value), "threshold": threshold} if isinstance(value, int | float) else {}
