"""What the server adds to BentoML's Prometheus /metrics: the model versions being served and the canary
routing, as gauges (infra/grafana/dashboards/amaas-serving.json charts them).

They are computed when /metrics is scraped (BentoML's `__metrics__` hook on the service), from the same state
that GET /models answers with: never stale, and nothing shared between worker processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

MODEL_INFO = "amaas_model_info"
CANARY_SHARE = "amaas_canary_share"
SHADOW = "amaas_shadow_enabled"
ROLES = ("champion", "challenger")


class _Served(Collector):
    def __init__(self, versions: dict[str, Any]) -> None:
        self.versions = versions

    def collect(self) -> Iterator[GaugeMetricFamily]:
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


def served_metrics(versions: dict[str, Any]) -> str:
    """Prometheus text for `versions` (what GET /models answers: champion, challenger, canary_share, shadow)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Served(versions))
    return generate_latest(registry).decode()


def with_served_metrics(content: str, versions: dict[str, Any]) -> str:
    """BentoML's /metrics text followed by the served-model gauges."""
    return (content if not content or content.endswith("\n") else content + "\n") + served_metrics(versions)
