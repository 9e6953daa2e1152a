"""
### training_pipeline

Runs every amaas stage in order: **collect → validate → prepare → train → evaluate → report →
package → promote**. Each task calls `pipelines.stages.run_stage`, the same function as
`amaas <stage>` and `dvc repro`, and passes only its small summary through XCom.

Settings come from `params.yaml` in the project (or `$AMAAS_PARAMS`); outputs go under the
project folder (or `$AMAAS_ROOT`). A failed validation stops the run before training.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import dag, task

from pipelines.stages import STAGES

PROJECT = Path(__file__).resolve().parent.parent
SCHEDULE = os.environ.get("AMAAS_TRAINING_SCHEDULE", "@weekly")  # a cron string, a preset, or "none": manual only


def _run(stage: str) -> dict:
    from pipelines.stages import run_stage

    root = os.environ.get("AMAAS_ROOT") or str(PROJECT)
    params = os.environ.get("AMAAS_PARAMS") or str(Path(root) / "params.yaml")
    return run_stage(stage, params, root)


@dag(
    dag_id="training_pipeline",
    schedule=None if SCHEDULE.lower() in ("", "none") else SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=1)},
    doc_md=__doc__,
    tags=["amaas"],
)
def training_pipeline() -> None:
    previous = None
    for stage in STAGES:
        current = task(task_id=stage, doc_md=f"Runs `amaas {stage}`.")(_run)(stage)
        if previous is not None:
            previous >> current
        previous = current


training_pipeline()
