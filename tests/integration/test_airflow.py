"""The training DAG: imports cleanly, matches the stage order, and runs with `airflow dags test` (the project's
entry point, pipelines.airflow_cli)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import AIRFLOW, BIN, airflow_env, amaas, write_params
from tests.integration.conftest import airflow_home

pytestmark = pytest.mark.slow


def _dags_test(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([*AIRFLOW, "dags", "test", *args], env=env, capture_output=True, text=True,
                          timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def _training_runs(env: dict[str, str]) -> list[dict]:
    """training_pipeline's runs, read from the SQLite metadata database itself: a Python process that imports
    Airflow's models to ask would take seconds of CPU. Airflow stores logical_date as naive UTC text and conf as
    JSON text."""
    with contextlib.closing(sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db")) as db:
        rows = db.execute("SELECT state, conf, logical_date FROM dag_run WHERE dag_id = 'training_pipeline'"
                          " ORDER BY id").fetchall()
    return [{"state": state, "conf": json.loads(conf) if conf else conf,
             "logical_date": datetime.fromisoformat(logical).replace(tzinfo=UTC).isoformat()}
            for state, conf, logical in rows]


def _next_day(root, days: int = 1, **overrides) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["source"]["simulator"]["n_batches"] += days  # the source has more days of rows
    params["source"]["simulator"].update(overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_days_of_monitoring_retrain_only_on_drift_and_promote_only_if_better(tmp_path, migrated_airflow_db):
    """Day 0 trains the champion; stable days: no retrain; drift: monitoring triggers training_pipeline,
    whose challenger replaces the champion only through the gate; the rollback DAG undoes it."""
    write_params(tmp_path, **{"source.simulator.rows_per_batch": 2000})
    env = airflow_home(airflow_env(tmp_path), migrated_airflow_db)
    _dags_test(env, "training_pipeline")
    decision = json.loads((tmp_path / "reports" / "promotion.json").read_text())
    first = decision["champion_after"]
    assert decision["promoted"] and first == decision["challenger"]
    assert json.loads((tmp_path / "models" / "deployment.json").read_text())["champion"] == first

    for _ in range(2):  # stable days
        _next_day(tmp_path)
        _dags_test(env, "monitoring")
        drift = json.loads((tmp_path / "reports" / "drift_details.json").read_text())
        assert not drift["retrain_needed"], drift["reasons"]
        assert drift["reference"] == f"champion {first}" and drift["labeled_rows"] > 1900
    assert len(_training_runs(env)) == 1  # only day 0's run

    # the world changes on day 5; monitoring next runs when days 5-7 have arrived (so training rows hold some)
    _next_day(tmp_path, days=3, drift_start_batch=5, drift_strength=2.0)
    _dags_test(env, "monitoring")
    drift = json.loads((tmp_path / "reports" / "drift_details.json").read_text())
    assert drift["retrain_needed"] and drift["current"] == "batch 2026-01-08"
    assert any(r.startswith("data drift") for r in drift["reasons"])
    history = json.loads((tmp_path / "reports" / "monitoring_history.json").read_text())
    assert [h["retrain_needed"] for h in history[-3:]] == [False, False, True]
    status = json.loads(amaas("status", root=tmp_path).stdout)
    assert status["champion"] == first and status["last_monitoring"]["reasons"] == drift["reasons"]
    triggered = _training_runs(env)[-1]
    assert triggered["state"] == "queued" and "data drift" in triggered["conf"]["reason"]

    # what the scheduler would do with the queued run: run it, with its conf
    output = _dags_test(env, "training_pipeline", triggered["logical_date"], "--conf", json.dumps(triggered["conf"]))
    assert "training run because: monitoring" in output
    decision = json.loads((tmp_path / "reports" / "promotion.json").read_text())
    passes = decision["gain"] >= decision["min_improvement"] and decision["p_value"] <= decision["max_p_value"]
    assert decision["promoted"] == passes
    assert decision["champion_after"] == (decision["challenger"] if passes else first)
    assert decision["promoted"], decision["reason"]  # trained on drifted rows too, it beats the old champion

    _dags_test(env, "rollback", "--conf", json.dumps({"reason": "test: back to the first model"}))
    assert json.loads((tmp_path / "models" / "registry" / "aliases.json").read_text())["champion"] == first
    assert json.loads((tmp_path / "models" / "deployment.json").read_text())["champion"] == first


def test_monitoring_loop_on_a_small_multiclass_table(tmp_path, migrated_airflow_db):
    """A user's table (tests/tables.py), not the simulator: ~100 rows a day in a CSV drop folder, string
    labels with a rare class, no id. Stable days raise no alarm; a day whose x1 and color moved triggers
    training."""
    from tests.tables import make_table, params_for

    drop = tmp_path / "data" / "drop"
    drop.mkdir(parents=True)

    def arrive(day: int, **changes) -> None:
        table = make_table("multiclass", 100 if day else 300, seed=100 + day, days=1 if day else 3,
                           start=str(pd.Timestamp("2026-03-01") + pd.Timedelta(days=day + 2 if day else 0)))
        table.assign(**changes).to_csv(drop / f"day_{day:02d}.csv", index=False)

    params = params_for("multiclass", **{"source.kind": "files", "source.files.path": "data/drop",
                                         "source.files.pattern": "*.csv"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = airflow_home(airflow_env(tmp_path), migrated_airflow_db)
    arrive(0)
    _dags_test(env, "training_pipeline")
    first = json.loads((tmp_path / "reports" / "promotion.json").read_text())["champion_after"]
    assert first is not None

    for day in (1, 2):  # stable days
        arrive(day)
        _dags_test(env, "monitoring")
        drift = json.loads((tmp_path / "reports" / "drift_details.json").read_text())
        assert drift["current_rows"] == 100 and drift["labeled_rows"] == 100
        assert not drift["retrain_needed"], drift["reasons"]
    assert len(_training_runs(env)) == 1

    arrive(3, x1=lambda t: t["x1"] + 3, color="Red")  # the world moved
    _dags_test(env, "monitoring")
    drift = json.loads((tmp_path / "reports" / "drift_details.json").read_text())
    assert drift["retrain_needed"] and set(drift["drifted_columns"]) == {"x1", "color"}, drift
    assert _training_runs(env)[-1]["state"] == "queued"


# Airflow's execution API built as the API server builds it, then as pipelines.airflow_cli does: the routes of the
# version the Task SDK speaks, with their request and response models
ROUTES_BOTH_WAYS = """
import json
from airflow.api_fastapi.execution_api.app import create_task_execution_api_app
from airflow.sdk.api.datamodels._generated import API_VERSION
from fastapi.routing import APIRoute
from pipelines.airflow_cli import latest_version_routes

def schema(model):
    return model.model_json_schema() if hasattr(model, "model_json_schema") else repr(model)

def routes():
    app = create_task_execution_api_app()
    app._cadwyn_initialize()  # what its first request does
    return {f"{sorted(r.methods)} {r.path}": [schema(r.response_model),
                                              schema(r.body_field.field_info.annotation) if r.body_field else None]
            for r in app.router.versioned_routers[API_VERSION].routes if isinstance(r, APIRoute)}

full = routes()
latest_version_routes()
print(json.dumps([full, routes()]))
"""


def test_the_entry_point_serves_the_task_sdk_the_routes_airflow_does():
    """pipelines.airflow_cli's execution API (Cadwyn builds one API version) has every route of the version the
    Task SDK speaks, with the same models, as Airflow's own (every version)."""
    proc = subprocess.run([str(BIN / "python"), "-c", ROUTES_BOTH_WAYS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    full, trimmed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(full) > 40 and any("/task-instances/" in route for route in full)
    assert trimmed == full
