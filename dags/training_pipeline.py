"""
### training_pipeline

Collects the newest data, retrains the ensemble and releases it only if it is better, one task per stage
in the order of `pipelines.runner.STAGES` (task id = stage name = `amaas <stage>` = DVC stage):

collect → validate (a broken batch stops the run here) → prepare → train → evaluate → compress (a distilled
student and an int8 copy, measured; the one to serve is the challenger) → report (drift and performance of the
champion) → package → promote (the gate: the challenger must beat the champion) → deploy
→ **version**: `dvc commit` and `dvc push` of everything the run wrote (in a DVC project), so a later
`dvc repro` skips it and `dvc pull` elsewhere gets the same data and models.

Each task calls `pipelines.runner.run_in_project`, the same stage function as `amaas <stage>` and
`dvc repro`, and passes only its small summary through XCom. Runs weekly (`$AMAAS_TRAINING_SCHEDULE`:
a cron string, a preset, or `none`), when the `monitoring` DAG finds drift or decay, or by hand with the
form below. Settings: the project's `params.yaml` (or `$AMAAS_PARAMS`); outputs under the project
(or `$AMAAS_ROOT`).

Retries (`pipelines.runner.task_retries`): collect, version (the DVC push) and deploy touch a source, a
remote or a server, and retry 3 times with exponential backoff from 30 s; the other stages compute on local
files and would fail the same way again, so they do not retry (train above all: minutes for the same error).
A task that fails for good sends a `task_failed` alert (`pipelines.alerts`: log line, webhook, email).
"""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import Param, chain, dag, get_current_context, task

from pipelines.runner import STAGES, FailureAlert, run_in_project, schedule_from_env, task_retries, version_in_project

PROJECT = Path(__file__).resolve().parent.parent
SCHEDULE = schedule_from_env("AMAAS_TRAINING_SCHEDULE", "@weekly")


def _run(stage: str) -> dict:
    import logging

    params = get_current_context()["params"]
    if stage == "deploy" and not params["deploy"]:
        from airflow.exceptions import AirflowSkipException

        raise AirflowSkipException("deploy switched off for this run (trigger form)")
    if stage == "collect":
        logging.getLogger("amaas").info("training run because: %s", params["reason"])
    return run_in_project(stage, PROJECT)


@dag(
    dag_id="training_pipeline",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    # a task that fails for good alerts through the project's channels (pipelines.alerts: log, webhook, email)
    default_args={"on_failure_callback": FailureAlert(PROJECT)},
    params={
        "reason": Param("scheduled", type="string", title="Reason",
                        description="Why this run: recorded in the log (monitoring fills in the drift it found)."),
        "deploy": Param(True, type="boolean", title="Deploy",
                        description="Put a newly promoted champion into service at the end."),
    },
    doc_md=__doc__,
    tags=["amaas"],
)
def training_pipeline() -> None:
    stages = [task(task_id=stage, doc_md=f"Runs `amaas {stage}`.", **task_retries(stage))(_run)(stage)
              for stage in STAGES]

    @task(task_id="version", trigger_rule="none_failed", doc_md="`dvc commit` + `dvc push` of what the run wrote.",
          **task_retries("version"))
    def version() -> dict:
        return version_in_project(PROJECT)

    chain(*stages, version())  # version runs after a skipped deploy too


training_pipeline()
