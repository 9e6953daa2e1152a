"""Alerts reach a real (local) webhook; a failing channel never fails the stage; a failed Airflow task alerts
through the same channels."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from pipelines import alerts
from pipelines.config import PARAMS_ENV, ROOT_ENV, Paths, load_settings
from pipelines.runner import FailureAlert
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


class _LogUrlNeedsConfig:
    """A task instance whose log_url raises, as Airflow's can when its config is incomplete."""
    dag_id, task_id, run_id, try_number = "monitoring", "report", "scheduled__2026-01-02", 1

    @property
    def log_url(self) -> str:
        raise RuntimeError("no [api] base_url")


def _airflow_context(exception: BaseException, **ti: object) -> dict:
    """What Airflow 3 hands an on_failure_callback, the parts task_failed reads."""
    instance = SimpleNamespace(**{"dag_id": "training_pipeline", "task_id": "train", "run_id": "manual__2026-11-26",
                                  "try_number": 2, "log_url": "http://airflow:8080/dags/training_pipeline/runs/"
                                  "manual__2026-11-26/tasks/train?try_number=2", **ti})
    return {"task_instance": instance, "ti": instance, "run_id": instance.run_id, "exception": exception,
            "dag": SimpleNamespace(dag_id=instance.dag_id)}


def test_a_failed_airflow_task_alerts_with_what_identifies_it(tmp_path, webhook, monkeypatch):
    url, received, _ = webhook
    monkeypatch.delenv(ROOT_ENV, raising=False)
    monkeypatch.delenv(PARAMS_ENV, raising=False)
    monkeypatch.delenv(alerts.WEBHOOK_ENV, raising=False)
    write_params(tmp_path, **{"alerts.webhook_url": url})
    callback = FailureAlert(tmp_path)  # what the DAGs attach to every task
    callback(_airflow_context(ValueError("learner diverged")))
    assert len(received) == 1
    sent = received[0]
    assert sent["kind"] == "task_failed" and sent["project"] == str(tmp_path.resolve())
    assert sent["details"] == {"dag_id": "training_pipeline", "task_id": "train", "run_id": "manual__2026-11-26",
                               "try_number": 2, "exception": "ValueError: learner diverged",
                               "log_url": "http://airflow:8080/dags/training_pipeline/runs/manual__2026-11-26/tasks/"
                                          "train?try_number=2"}
    assert sent["message"] == ("training_pipeline.train failed (try 2, run manual__2026-11-26): ValueError: learner "
                               "diverged")

    # the tasks' settings: $AMAAS_ROOT / $AMAAS_PARAMS win over the DAG's folder, as in run_in_project
    elsewhere = tmp_path / "deployed"
    write_params(elsewhere, **{"alerts.webhook_url": url})
    monkeypatch.setenv(ROOT_ENV, str(elsewhere))
    FailureAlert(tmp_path / "not-this-one")({"ti": _LogUrlNeedsConfig(), "exception": OSError("source down")})
    assert received[1]["project"] == str(elsewhere.resolve())
    assert received[1]["details"] == {"dag_id": "monitoring", "task_id": "report", "run_id": "scheduled__2026-01-02",
                                      "try_number": 1, "exception": "OSError: source down", "log_url": None}


def test_a_task_failure_alert_that_cannot_be_sent_never_raises(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(ROOT_ENV, raising=False)
    monkeypatch.delenv(PARAMS_ENV, raising=False)
    (tmp_path / "params.yaml").write_text("alerts: [not, a, mapping\n")  # broken settings
    params = tmp_path / "params.yaml"
    with caplog.at_level(logging.ERROR, logger="pipelines.alerts"):
        assert alerts.task_failed(_airflow_context(RuntimeError("x")), params, tmp_path) is None
        FailureAlert(tmp_path)({})  # no task instance at all
    assert caplog.text.count("could not send the task-failure alert") == 2
    write_params(tmp_path, **{"alerts.webhook_url": "http://127.0.0.1:9/none", "alerts.retries": 0,
                              "alerts.timeout_s": 1})
    assert alerts.task_failed(_airflow_context(RuntimeError("x")), params, tmp_path) == {"log": True,
                                                                                          "webhook": False}


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


def test_a_failed_webhook_logs_only_its_scheme_and_host(tmp_path, monkeypatch, caplog):
    """Hardening II, item 5: tokens in the path or in user:pass@ of a webhook URL were logged in full."""
    secret = "http://user:hunter2@127.0.0.1:9/hooks/T0KEN?sig=s3cret"
    settings = load_settings(write_params(tmp_path, **{"alerts.retries": 0, "alerts.timeout_s": 1}))
    for given in ("params", "env"):
        if given == "env":
            monkeypatch.setenv(alerts.WEBHOOK_ENV, secret)
        else:
            settings = load_settings(write_params(tmp_path, **{"alerts.webhook_url": secret, "alerts.retries": 0,
                                                               "alerts.timeout_s": 1}))
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="pipelines.alerts"):
            assert alerts.alert(settings, Paths(tmp_path), "test", "m", {})["webhook"] is False
        assert "http://127.0.0.1:9" in caplog.text
        assert not any(part in caplog.text for part in ("hunter2", "user", "T0KEN", "s3cret", "hooks"))


def test_a_webhook_that_is_not_http_is_refused_with_the_fix(tmp_path, monkeypatch, caplog):
    """Hardening II, item 7: a file:// webhook loaded, and promote crashed with a TypeError after its decision."""
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match=r"alerts.webhook_url.*http:// or https://"):
        load_settings(write_params(tmp_path, **{"alerts.webhook_url": "file:///etc/passwd"}))
    monkeypatch.setenv(alerts.WEBHOOK_ENV, "file:///etc/passwd")
    settings = load_settings(write_params(tmp_path))
    with caplog.at_level(logging.ERROR, logger="pipelines.alerts"):
        assert alerts.alert(settings, Paths(tmp_path), "test", "m", {}) == {"log": True, "webhook": False}
    assert "http:// or https://" in caplog.text and alerts.WEBHOOK_ENV in caplog.text
