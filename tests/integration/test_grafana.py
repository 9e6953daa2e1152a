"""Every query of the Grafana dashboard (infra/grafana/dashboards/amaas-serving.json) names a metric that a real
`amaas serve` exposes on /metrics, once it has answered some requests (a 4xx among them), and another server of
the project does not wipe them."""

from __future__ import annotations

import time

import pytest
import requests

from pipelines.registry import Registry
from tests.conftest import served
from tests.grafana import exposed_names, load_dashboard, metric_names, queries
from tests.integration.test_serve import ROW

pytestmark = pytest.mark.slow


def _codes(metrics: str) -> set[str]:
    """The status codes of /predict answers that BentoML counted."""
    return {line.split('http_response_code="')[1][:3] for line in metrics.splitlines()
            if line.startswith("bentoml_service_request_total{") and 'endpoint="/predict"' in line}


def _metrics(url: str) -> str:
    try:
        response = requests.get(f"{url}/metrics", timeout=10)
    except (requests.ConnectionError, requests.Timeout):  # a busy server: the next poll tries again
        return ""
    assert response.status_code == 200, response.text[:500]
    return response.text


def test_every_dashboard_query_names_a_metric_the_server_exposes(server, trained_project):
    used = {name: expr for expr in queries(load_dashboard()) for name in metric_names(expr)}
    assert len(used) >= 5
    for _ in range(3):
        assert server.session.post(f"{server.url}/predict", json={"rows": [ROW] * 3}, timeout=30).status_code == 200
    assert server.session.post(f"{server.url}/predict", json={"row": {**ROW, "age": "x"}}, timeout=30
                               ).status_code == 422
    assert requests.post(f"{server.url}/predict", json={"row": ROW}, timeout=30).status_code == 401
    assert requests.get(f"{server.url}/models", timeout=30).status_code == 200

    deadline, text = time.monotonic() + 30, ""  # the counters are written by the worker, read by /metrics
    while time.monotonic() < deadline:
        text = _metrics(server.url)
        if set(used) <= exposed_names(text):
            break
        time.sleep(0.5)
    missing = {name: used[name] for name in set(used) - exposed_names(text)}
    assert not missing, f"dashboard queries name metrics /metrics does not expose: {missing}"

    champion = Registry(trained_project / "models" / "registry").champion
    assert f'amaas_model_info{{role="champion",version="{champion}"}} 1.0' in text
    assert "amaas_canary_share 0.0" in text and "amaas_shadow_enabled 0.0" in text
    codes = _codes(text)
    assert {"200", "401", "422"} <= codes, codes  # the 4xx panels have series to show

    # another server of the same project starts (and stops): this one's counts stay (BentoML's one metrics folder
    # per project, emptied by each start, once wiped them)
    with served(trained_project) as other:
        assert other.session.get(f"{other.url}/models", timeout=30).status_code == 200
    assert _codes(_metrics(server.url)) >= {"200", "401", "422"}
