"""Alerts reach a real (local) webhook; a failing channel never fails the stage."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipelines import alerts
from pipelines.config import Paths, load_settings
from pipelines.stages import collect, prepare, report, validate
from tests.conftest import write_params


@pytest.fixture
def webhook():
    """A local HTTP server that records JSON posts; the first `fail_first` answers are 500."""
    received: list[dict] = []
    state = {"fail_first": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            if state["fail_first"] > 0:
                state["fail_first"] -= 1
                self.send_response(500)
            else:
                received.append(body)
                self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received, state
    server.shutdown()


def test_webhook_gets_the_alert_and_retries(tmp_path, webhook):
    url, received, state = webhook
    settings, paths = load_settings(write_params(tmp_path, **{"alerts.webhook_url": url})), Paths(tmp_path)
    state["fail_first"] = 2  # two 500s, then success on the last of 1 + 2 retries
    assert alerts.alert(settings, paths, "gate_failed", "not better", {"gain": -0.01}) == {"log": True,
                                                                                        "webhook": True}
    assert received == [{"kind": "gate_failed", "message": "not better", "details": {"gain": -0.01},
                         "project": str(tmp_path)}]
    down = load_settings(write_params(tmp_path, **{"alerts.webhook_url": "http://127.0.0.1:9/none",
                                                   "alerts.retries": 0, "alerts.timeout_s": 1}))
    assert alerts.alert(down, paths, "drift", "x", {}) == {"log": True, "webhook": False}  # logged, not raised


@pytest.mark.slow  # collect, validate, prepare and report on a drifted simulator
def test_drift_over_the_threshold_alerts(tmp_path, webhook, monkeypatch):
    url, received, _ = webhook
    monkeypatch.setenv(alerts.WEBHOOK_ENV, url)  # the environment's URL, none in params
    settings = load_settings(write_params(tmp_path, **{"source.simulator.drift_start_batch": 2,
                                                       "source.simulator.drift_strength": 3.0}))
    paths = Paths(tmp_path)
    for stage in (collect, validate, prepare):
        stage.run(settings, paths)
    summary = report.run(settings, paths)
    assert summary["retrain_needed"]
    assert [r["kind"] for r in received] == ["drift"]
    assert received[0]["details"]["drifted_columns"] == summary["drifted_columns"]
