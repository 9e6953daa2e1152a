"""A task that fails under real Airflow (`airflow dags test`) alerts through the project's webhook.

Airflow's own CLI here, not pipelines.airflow_cli: the DAGs run unchanged under what a user without it runs."""

from __future__ import annotations

import json
import subprocess

import pytest

from pipelines.alerts import WEBHOOK_ENV
from tests.conftest import BIN, airflow_env, write_params
from tests.integration.conftest import airflow_home
from tests.unit.test_alerts import webhook  # noqa: F401 (the local webhook server fixture)

pytestmark = pytest.mark.slow


def test_a_failed_task_alerts_through_the_webhook(tmp_path, webhook, migrated_airflow_db):  # noqa: F811
    """The rollback DAG on a project with no champion yet: its rollback task fails, and the alert names it."""
    url, received, _ = webhook
    write_params(tmp_path)
    env = {**airflow_home(airflow_env(tmp_path), migrated_airflow_db), WEBHOOK_ENV: url}
    proc = subprocess.run([str(BIN / "airflow"), "dags", "test", "rollback", "--conf",
                           json.dumps({"reason": "test: nothing to roll back to"})], env=env, capture_output=True,
                          text=True, timeout=600)
    output = proc.stdout + proc.stderr
    failed = [r for r in received if r["kind"] == "task_failed"]
    assert [r["details"]["task_id"] for r in failed] == ["rollback"], output[-4000:]  # deploy never ran
    details = failed[0]["details"]
    assert details["dag_id"] == "rollback" and details["try_number"] == 1 and details["run_id"]
    assert details["exception"].startswith("RegistryError: nothing to roll back to")
    assert details["log_url"].endswith("/tasks/rollback?try_number=1")
    assert details["run_id"] in details["log_url"].replace("%3A", ":").replace("%2B", "+")
    assert failed[0]["project"] == str(tmp_path.resolve())
