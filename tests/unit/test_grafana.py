"""The Grafana dashboard is a valid, provisioned dashboard whose queries read the serving metrics; the gauges the
server adds to /metrics. (tests/integration/test_grafana.py checks every query against a real /metrics.)"""

from __future__ import annotations

import collections

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pipelines.serving import metrics
from pipelines.state.limits import NO_USAGE, usage_metrics
from tests.grafana import DASHBOARD, exposed_names, load_dashboard, metric_names, panels, queries

INFRA = DASHBOARD.parents[2]
# what BentoML 1.4's API server exposes (namespace bentoml_service): its request metrics and adaptive batching
BENTOML = {"bentoml_service_request_total", "bentoml_service_request_duration_seconds_bucket",
           "bentoml_service_request_duration_seconds_sum", "bentoml_service_request_duration_seconds_count",
           "bentoml_service_request_in_progress", "bentoml_service_adaptive_batch_size_bucket",
           "bentoml_service_adaptive_batch_size_sum", "bentoml_service_adaptive_batch_size_count"}
VERSIONS = {"champion": "v2", "challenger": "v3", "canary_share": 0.25, "shadow": False}
CACHE = {"size": 1000, "entries": 40, "hits": 30, "misses": 90}


def test_metric_names_are_read_from_promql():
    assert metric_names('histogram_quantile(0.99, sum by (le, endpoint) (rate(a_bucket{x="by(y)"}[$__rate_interval])))'
                        ) == {"a_bucket"}
    assert metric_names('sum(rate(b_total{code=~"5.."}[5m])) / clamp_min(sum(rate(b_total[5m])), 1e-9)') == {"b_total"}
    assert metric_names("max by (role, version) (c_info) and on(role) d offset 5m") == {"c_info", "d"}
    assert exposed_names('# TYPE h histogram\nh_bucket{le="1"} 2\nh_count 2\nh_sum 0.1\ng 1\n') == {
        "h_bucket", "h_count", "h_sum", "g"}


def test_dashboard_is_a_valid_grafana_dashboard():
    dashboard = load_dashboard()
    assert dashboard["uid"] == "amaas-serving" and dashboard["title"] and dashboard["schemaVersion"] >= 36
    datasource = yaml.safe_load((INFRA / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    uids = {d["uid"] for d in datasource["datasources"] if d["type"] == "prometheus"}
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), collections.Counter(ids).most_common(3)
    charts = [p for p in panels(dashboard) if p["type"] != "row"]
    assert len(charts) >= 10
    for panel in charts:
        assert panel["title"] and panel["type"] in {"timeseries", "stat", "table", "state-timeline"}, panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"]["uid"] in uids, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in uids and target["expr"].count("(") == target["expr"].count(")")
            assert metric_names(target["expr"]), (panel["title"], target["expr"])


def test_dashboard_charts_what_operators_asked_for():
    """rps, p50/p99 per route, 4xx/5xx, shed requests, batch sizes, model version, canary share, requests, rows and
    429s per API key (no cache panel: the response cache is off by default, and per worker)."""
    exprs = queries(load_dashboard())
    joined = "\n".join(exprs)
    for wanted in ("histogram_quantile(0.5,", "histogram_quantile(0.99,", 'http_response_code=~"4.."',
                   'http_response_code=~"5.."', 'http_response_code="503"', "by (le, endpoint)",
                   "bentoml_service_adaptive_batch_size_bucket", metrics.MODEL_INFO, metrics.CANARY_SHARE,
                   "sum by (key) (rate(amaas_key_requests_total", "amaas_key_rows_total",
                   "amaas_key_rate_limited_total"):
        assert wanted in joined, wanted
    assert "cache" not in joined


def test_every_dashboard_metric_is_bentomls_or_ours():
    ours = exposed_names(metrics.served_metrics(VERSIONS, CACHE, 1, {"drift": 0.1, "threshold": 0.15})) | (
        exposed_names(usage_metrics({"k": NO_USAGE})))
    used = set().union(*(metric_names(e) for e in queries(load_dashboard())))
    assert used <= BENTOML | ours, used - BENTOML - ours


def test_served_gauges_say_what_get_models_says():
    families = text_string_to_metric_families(metrics.served_metrics(VERSIONS, CACHE, explained=7))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}
    assert samples == {
        ("amaas_model_info", (("role", "champion"), ("version", "v2"))): 1.0,
        ("amaas_model_info", (("role", "challenger"), ("version", "v3"))): 1.0,
        ("amaas_canary_share", ()): 0.25,
        ("amaas_shadow_enabled", ()): 0.0,
        ("amaas_cache_hits_total", ()): 30.0,
        ("amaas_cache_misses_total", ()): 90.0,
        ("amaas_cache_hit_ratio", ()): 0.25,
        ("amaas_cache_entries", ()): 40.0,
        ("amaas_cache_size", ()): 1000.0,
        ("amaas_explained_rows_total", ()): 7.0,
    }
    off = {"size": 0, "entries": 0, "hits": 0, "misses": 0}
    assert "amaas_cache_hit_ratio 0.0" in metrics.served_metrics(VERSIONS, off)  # no lookups yet: 0, not NaN
    alone = metrics.served_metrics({"champion": 'v"1', "challenger": None, "canary_share": 0.0, "shadow": True},
                                   off)
    assert 'amaas_model_info{role="champion",version="v\\"1"} 1.0' in alone and 'role="challenger"' not in alone
    bentoml_text = "# TYPE x counter\nx_total 3.0"  # no final newline: ours still start on their own line
    joined = metrics.with_served_metrics(bentoml_text, VERSIONS, CACHE)
    names = {s.name for f in text_string_to_metric_families(joined) for s in f.samples}
    assert names >= {"x_total", "amaas_model_info"}


@pytest.mark.parametrize("provisioning", ["datasources/prometheus.yaml", "dashboards/amaas.yaml"])
def test_provisioning_files_parse(provisioning):
    assert yaml.safe_load((INFRA / "grafana" / "provisioning" / provisioning).read_text())["apiVersion"] == 1


def test_the_dashboard_charts_explanations_and_the_newest_attribution_drift(tmp_path):
    joined = "\n".join(queries(load_dashboard()))
    assert "amaas_explained_rows_total" in joined and "max(amaas_attribution_drift)" in joined
    report = tmp_path / "drift.json"
    assert metrics.latest_attribution_drift(report, 0.15) == {}  # no report yet: no gauge
    report.write_text('{"attribution_drift": null}')
    assert metrics.latest_attribution_drift(report, 0.15) == {}  # no model to explain in that run
    report.write_text('{"attribution_drift": 0.3}')
    found = metrics.latest_attribution_drift(report, 0.15)
    text = metrics.served_metrics(VERSIONS, CACHE, 2, found)
    assert "amaas_attribution_drift 0.3" in text and "amaas_attribution_drift_threshold 0.15" in text
    assert "amaas_explained_rows_total 2.0" in text
