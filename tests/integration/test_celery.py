"""Airflow with the CeleryExecutor, a real Redis broker and a real PostgreSQL metadata database runs
training_pipeline to success: the scale-out setup of infra/, on one machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import BIN, REPO, free_port, write_params

pytestmark = pytest.mark.slow
DAG_ID = "training_pipeline"


def celery_settings(db: str, broker: str, execution_api: str, jwt_secret: str) -> dict[str, str]:
    """The Airflow settings of a CeleryExecutor deployment; infra/ uses the same keys (test_infra checks)."""
    return {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": execution_api,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": db,  # psycopg 3 speaks asyncio too: no asyncpg needed
        "AIRFLOW__CELERY__BROKER_URL": broker,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + db,
        "AIRFLOW__API_AUTH__JWT_SECRET": jwt_secret,
    }


def _database(postgres_url: str, name: str) -> str:
    """A fresh database on the test server; its SQLAlchemy URL."""
    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_url.rsplit("/", 1)[0] + f"/{name}"


def _airflow(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "airflow"), *args], env=env, capture_output=True, text=True, check=check,
                          timeout=300)


def _query(db: str, sql: str) -> tuple[Any, ...] | None:
    """The first row of `sql` on the metadata database, or None (no row, or the database busy): one poll of a
    polling loop, whose overall deadline alone ends the wait. A query, not the airflow CLI, which takes seconds of
    CPU to start, taken from the scheduler and the worker on a 2-core machine."""
    try:
        with psycopg.connect(db.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=10) as conn:
            return conn.execute(sql, (DAG_ID,)).fetchone()
    except psycopg.Error:
        return None


def test_celery_executor_runs_training_pipeline(tmp_path, postgres_url, redis_url):
    write_params(tmp_path)
    db = _database(postgres_url, "airflow_celery")
    api_port = free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "AIRFLOW_HOME": str(tmp_path / ".airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        **celery_settings(db, redis_url, f"http://127.0.0.1:{api_port}/execution/", os.urandom(16).hex()),
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AMAAS_ROOT": str(tmp_path),
        "AMAAS_PARAMS": str(tmp_path / "params.yaml"),
        "AMAAS_TRAINING_SCHEDULE": "none",  # only the run this test triggers
    }
    _airflow(env, "db", "migrate")
    logs = tmp_path / "logs"
    logs.mkdir()
    services = {
        "api-server": ["api-server", "--port", str(api_port)],
        "scheduler": ["scheduler"],
        "dag-processor": ["dag-processor"],
        "worker": ["celery", "worker"],
    }
    procs = [subprocess.Popen([str(BIN / "airflow"), *cmd], env=env, stdout=(logs / f"{name}.log").open("w"),
                              stderr=subprocess.STDOUT, start_new_session=True) for name, cmd in services.items()]
    try:
        deadline = time.monotonic() + 120
        # the CLI's trigger once the DAG processor has stored the DAG, which a trigger needs
        while (_query(db, "SELECT 1 FROM serialized_dag WHERE dag_id = %s") is None
               or _airflow(env, "dags", "trigger", DAG_ID, check=False).returncode != 0):
            assert time.monotonic() < deadline, "the DAG processor never registered training_pipeline"
            time.sleep(1)
        deadline = time.monotonic() + 420
        while True:
            run = _query(db, "SELECT state FROM dag_run WHERE dag_id = %s ORDER BY id DESC LIMIT 1")
            state = run[0] if run else "none"
            if state in ("success", "failed") or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert state == "success", _tails(logs)
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    worker_log = (logs / "worker.log").read_text()
    assert worker_log.count("execute_workload") >= 8 and " succeeded in " in worker_log  # tasks ran on Celery
    decision = json.loads((tmp_path / "reports" / "promotion.json").read_text())
    assert decision["promoted"]


def _tails(logs: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted(logs.glob("*.log")))
