"""
### training_pipeline

Collects the newest data, retrains the ensemble and releases it only if it is better, one task per stage
in the order of `pipelines.runner.STAGES` (task id = stage name = `amaas <stage>` = DVC stage):

collect → validate (a broken batch stops the run here) → prepare → train → evaluate → compress (a distilled
student and an int8 copy, measured; the one to serve is the challenger) → report (drift and performance of the
champion) → package → promote (the gate: the challenger must beat the champion) → **approval** (with
`promote.approval` borderline or always: a person approves or rejects the waiting challenger in Required
Actions, seeing its evidence; skipped when nothing waits) → **champion** (the `champion` asset, when the run
changed it) → deploy → **version**: `dvc commit` and `dvc push` of everything the run wrote (in a DVC project),
so a later `dvc repro` skips it and `dvc pull` elsewhere gets the same data and models.

Assets (`pipelines.airflow_tasks`): validate updates `validated_data`, train `trained_model`, the champion task
`champion`. With `pipeline.training_trigger: asset` the DAG is scheduled on monitoring's `retrain_needed` asset
(or its weekly schedule, whichever comes first) instead of monitoring's trigger.

Each task calls `pipelines.runner.run_in_project`, the same stage function as `amaas <stage>` and
`dvc repro`, and passes only its small summary through XCom. Runs weekly (`$AMAAS_TRAINING_SCHEDULE`:
a cron string, a preset, or `none`), when the `monitoring` DAG finds drift or decay, or by hand with the
form below. Owner: `pipeline.owner`.
Settings: the project's `params.yaml` (or `$AMAAS_PARAMS`); outputs under the project
(or `$AMAAS_ROOT`).

Retries (`pipelines.runner.task_retries`): collect, version (the DVC push) and deploy touch a source, a
remote or a server, and retry 3 times with exponential backoff from 30 s; the other stages compute on local
files and would fail the same way again, so they do not retry (train above all: minutes for the same error).
A task that fails for good sends a `task_failed` alert (`pipelines.alerts`: log line, webhook, email).
"""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, chain, dag, get_current_context, task

from pipelines.airflow_tasks import NOTE, PromotionApproval, assets
from pipelines.config import Paths
from pipelines.runner import (
    STAGES,
    FailureAlert,
    dag_settings,
    run_in_project,
    schedule_from_env,
    task_retries,
    version_in_project,
)

PROJECT = Path(__file__).resolve().parent.parent
SETTINGS, PATHS = dag_settings(PROJECT)
ASSETS = assets(PATHS)
CRON = schedule_from_env("AMAAS_TRAINING_SCHEDULE", "@weekly")
SCHEDULE = CRON if SETTINGS.pipeline.training_trigger == "dag" else (
    ASSETS["retrain_needed"] if CRON is None else
    AssetOrTimeSchedule(timetable=CronTriggerTimetable(CRON, timezone="UTC"), assets=ASSETS["retrain_needed"]))
OUTLETS = {"validate": [ASSETS["validated_data"]], "train": [ASSETS["trained_model"]]}


def _run(stage: str) -> dict:
    import logging

    context = get_current_context()
    params = context["params"]
    if stage == "deploy" and not params["deploy"]:
        from airflow.exceptions import AirflowSkipException

        raise AirflowSkipException("deploy switched off for this run (trigger form)")
    if stage == "collect":
        events = [e for found in context["triggering_asset_events"].values() for e in found]
        reason = "; ".join(str(e.extra.get("reason")) for e in events) if events else params["reason"]
        logging.getLogger("amaas").info("training run because: %s", reason)
    return run_in_project(stage, PROJECT)


@dag(
    dag_id="training_pipeline",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    # a task that fails for good alerts through the project's channels (pipelines.alerts: log, webhook, email)
    default_args={"on_failure_callback": FailureAlert(PROJECT), "owner": SETTINGS.pipeline.owner},
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
    stages = {stage: task(task_id=stage, doc_md=f"Runs `amaas {stage}`.", outlets=OUTLETS.get(stage, []),
                          trigger_rule="none_failed" if stage == "deploy" else "all_success",
                          **task_retries(stage))(_run)(stage) for stage in STAGES}
    approval = PromotionApproval(task_id="approval", default_root=PROJECT, params=NOTE,
                                 doc_md=PromotionApproval.__doc__)

    @task(task_id="champion", trigger_rule="none_failed", outlets=[ASSETS["champion"]],
          doc_md="Updates the `champion` asset when this run changed the champion; skipped otherwise.")
    def champion() -> dict:
        from airflow.exceptions import AirflowSkipException

        from pipelines.io import read_json
        from pipelines.runner import project_files

        promotion = Paths(project_files(PROJECT)[1]).promotion
        decision = read_json(promotion) if promotion.is_file() else {}
        if decision.get("champion_after") == decision.get("champion_before"):
            raise AirflowSkipException("the champion did not change")
        return {"champion": decision["champion_after"]}

    # deploy runs after a skipped approval or champion task; version after a skipped deploy too
    @task(task_id="version", trigger_rule="none_failed", doc_md="`dvc commit` + `dvc push` of what the run wrote.",
          **task_retries("version"))
    def version() -> dict:
        return version_in_project(PROJECT)

    chain(*(stages[s] for s in STAGES[:-1]), approval, champion(), stages["deploy"], version())


training_pipeline()
