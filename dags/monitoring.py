"""
### monitoring

Daily watch over the champion: **collect → validate → report → retrain_needed → retrain →
trigger_training**, and **version** (`dvc commit` + `dvc push` of the new batch and the report, in a DVC
project). `retrain` updates the `retrain_needed` asset with the reasons; `trigger_training` starts
`training_pipeline` with `pipeline.training_trigger: dag` (the default). With `asset`, training_pipeline is
scheduled on that asset instead, and the UI's asset graph shows the loop
(monitoring → retrain_needed → training_pipeline → champion). Owner: `pipeline.owner`.

`report` compares the newest batch (or, with `report.current: prediction_log`, the served predictions
of the last `report.window_hours`) with the champion's own training rows and test predictions, using
Evidently: data drift, prediction drift, and performance once labels have arrived. The thresholds in
`params.yaml` (`report:`) decide whether retraining is needed; the decision and its reasons go to
`reports/monitoring_history.json`, alerts go out, and `training_pipeline` is triggered with the reasons
as its `reason`. The new model is released only if it passes the promotion gate.
Schedule: `$AMAAS_MONITORING_SCHEDULE` (default `@daily`; `none` = manual only).

Retries (`pipelines.runner.task_retries`): collect and version (the DVC push) touch a source or a remote
and retry 3 times with exponential backoff from 30 s; validate and report compute on local files and would
fail the same way again, so they do not retry. A task that fails for good sends a `task_failed` alert
(`pipelines.alerts`: log line, webhook, email).
"""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, get_current_context, task

from pipelines.airflow_tasks import assets
from pipelines.runner import (
    FailureAlert,
    dag_settings,
    run_in_project,
    schedule_from_env,
    task_retries,
    version_in_project,
)

PROJECT = Path(__file__).resolve().parent.parent
SCHEDULE = schedule_from_env("AMAAS_MONITORING_SCHEDULE", "@daily")
SETTINGS, PATHS = dag_settings(PROJECT)
ASSETS = assets(PATHS)


def _run(stage: str) -> dict:
    return run_in_project(stage, PROJECT)


@dag(
    dag_id="monitoring",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    # a task that fails for good alerts through the project's channels (pipelines.alerts: log, webhook, email)
    default_args={"on_failure_callback": FailureAlert(PROJECT), "owner": SETTINGS.pipeline.owner},
    params={"retrain": Param(True, type="boolean", title="Retrain on drift",
                             description="Trigger training_pipeline when the report says retraining is needed.")},
    doc_md=__doc__,
    tags=["amaas"],
)
def monitoring() -> None:
    collect = task(task_id="collect", doc_md="Runs `amaas collect`: the new batch.", **task_retries("collect")
                   )(_run)("collect")
    validate = task(task_id="validate", doc_md="Runs `amaas validate`.", outlets=[ASSETS["validated_data"]],
                    **task_retries("validate"))(_run)("validate")
    report = task(task_id="report", doc_md="Runs `amaas report`: drift and performance.", **task_retries("report")
                  )(_run)("report")

    @task.short_circuit(task_id="retrain_needed")
    def retrain_needed(summary: dict) -> bool:
        """Go on to trigger training only when the report found a reason (and the form allows it)."""
        return bool(summary["retrain_needed"]) and bool(get_current_context()["params"]["retrain"])

    @task(task_id="retrain", outlets=[ASSETS["retrain_needed"]],
          doc_md="Updates the `retrain_needed` asset, the report's reasons in its event's extra.")
    def retrain(summary: dict) -> str:
        reason = f"monitoring {get_current_context()['run_id']}: {'; '.join(summary['reasons'])}"
        get_current_context()["outlet_events"][ASSETS["retrain_needed"]].extra = {"reason": reason}
        return reason

    @task(task_id="version", doc_md="`dvc commit` + `dvc push` of the new batch and the report.",
          **task_retries("version"))
    def version() -> dict:
        return version_in_project(PROJECT, ("collect", "validate", "report"))

    collect >> validate >> report >> version()
    needed = retrain_needed(report) >> retrain(report)
    if SETTINGS.pipeline.training_trigger == "dag":
        needed >> TriggerDagRunOperator(
            task_id="trigger_training",
            trigger_dag_id="training_pipeline",
            conf={"reason": "{{ ti.xcom_pull(task_ids='retrain') }}"},
            wait_for_completion=False,
            doc_md="Starts `training_pipeline` with the reasons as its `reason`.",
        )


monitoring()
