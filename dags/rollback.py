"""
### rollback

Manual: the previous champion becomes champion again (`amaas rollback`), then `deploy` checks that the
service answers with it. A running `amaas serve` switches within `serve.reload_interval_s`; requests in
flight finish on the model they started with. The reason you give is recorded in the registry.
A failed task sends a `task_failed` alert (`pipelines.alerts`: log line, webhook, email).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from pipelines.runner import FailureAlert, dag_settings, rollback_in_project, run_in_project, task_retries

PROJECT = Path(__file__).resolve().parent.parent
SETTINGS, _ = dag_settings(PROJECT)


@dag(
    dag_id="rollback",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    # a rollback is never repeated blindly; a failed task alerts (pipelines.alerts: log, webhook, email)
    default_args={"retries": 0, "retry_delay": timedelta(minutes=1), "on_failure_callback": FailureAlert(PROJECT),
                  "owner": SETTINGS.pipeline.owner},
    params={"reason": Param(type="string", minLength=3, title="Reason",
                            description="Why the current champion is taken out of service (recorded).")},
    doc_md=__doc__,
    tags=["amaas"],
)
def rollback() -> None:
    @task(task_id="rollback")
    def rollback_champion() -> str:
        return rollback_in_project(PROJECT, get_current_context()["params"]["reason"])

    @task(task_id="deploy", **task_retries("deploy"))  # polls the live service: retried like in training
    def deploy() -> dict:
        return run_in_project("deploy", PROJECT)

    rollback_champion() >> deploy()


rollback()
