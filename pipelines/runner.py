"""The pipeline's stages in order, and the one function every entry point uses to run one.

dvc.yaml, the training DAG and `amaas run` all follow STAGES; a test checks they agree.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.config import PARAMS_ENV, ROOT_ENV, Paths, load_settings
from pipelines.lock import project_lock

STAGES = ("collect", "validate", "prepare", "train", "evaluate", "report", "package", "promote", "deploy")
log = logging.getLogger(__name__)


def run_stage(name: str, params: str | Path | None = None, root: str | Path | None = None, **options: Any
              ) -> dict[str, Any]:
    """Run stage `name` with settings from `params` on the project at `root`; return its summary.

    `options` go to the stage's run() as keyword arguments (e.g. collect's `rerun`)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(STAGES)}")
    settings = load_settings(params)
    paths = Paths(Path(root).resolve()) if root else Paths.from_env()
    module = importlib.import_module(f"pipelines.stages.{name}")
    with project_lock(paths.root, settings.pipeline.lock_timeout_s):
        started = time.perf_counter()
        summary = module.run(settings, paths, **options)
    log.info("stage %s done in %.1f s", name, time.perf_counter() - started)
    return summary


def project_files(default_root: Path) -> tuple[Path, Path]:
    """(params file, project root) for an orchestrator: $AMAAS_PARAMS / $AMAAS_ROOT, else the given project."""
    root = Path(os.environ.get(ROOT_ENV) or default_root).resolve()
    return Path(os.environ.get(PARAMS_ENV) or root / "params.yaml"), root


def run_in_project(name: str, default_root: Path, **options: Any) -> dict[str, Any]:
    """What an Airflow task runs: stage `name` on the project (see project_files)."""
    params, root = project_files(default_root)
    return run_stage(name, params, root, **options)


@contextlib.contextmanager
def _locked_project(default_root: Path) -> Iterator[Path]:
    """The project's root (see project_files), held under the project lock like a stage."""
    params, root = project_files(default_root)
    with project_lock(root, load_settings(params).pipeline.lock_timeout_s):
        yield root


def rollback_in_project(default_root: Path, reason: str) -> str:
    """Operator rollback from an orchestrator: the previous champion becomes champion again."""
    from pipelines.registry import rollback

    with _locked_project(default_root) as root:
        return rollback(Paths(root), reason)


def version_in_project(default_root: Path, stages: tuple[str, ...] = ()) -> dict[str, Any]:
    """What the DAGs run after the stages: DVC versions their outputs (see pipelines.versioning)."""
    from pipelines.versioning import record

    with _locked_project(default_root) as root:
        return record(root, stages)


def schedule_from_env(variable: str, default: str) -> str | None:
    """A DAG's schedule: $`variable` (a cron string or preset; "none" = manual only), else `default`."""
    schedule = os.environ.get(variable, default)
    return None if schedule.lower() in ("", "none") else schedule
