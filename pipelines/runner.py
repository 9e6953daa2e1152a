"""The pipeline's stages in order, and the one function every entry point uses to run one.

STAGES is the only list of them: dvc.yaml is generated from it and the stages' declarations
(`amaas dvc-yaml`), the DAGs and `amaas run` follow it; tests check that all of them agree.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import importlib
import logging
import os
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from pipelines.accounting import measured, record_stage
from pipelines.config import PARAMS_ENV, ROOT_ENV, Paths, Settings, load_settings
from pipelines.contracts import Stage, declaration, dvc_yaml
from pipelines.lock import project_lock
from pipelines.stages import STAGES

# Airflow retries, by task id. What touches the network or a database retries with exponential backoff (30 s,
# 60 s, 120 s): collect reads the source, version pushes to the DVC remote, deploy polls the live service, and
# each of them can meet a server that is briefly away. A stage that computes on local files would fail the
# same way again, so it does not retry; train least of all (minutes of work for the same error).
RETRIED_TASKS = frozenset({"collect", "version", "deploy"})
# Stages that time models the way they serve (compress): their process has OpenMP's idle threads sleep, as serving
# has them (bentos/service.py), since a thread spinning after a parallel region takes the core the next call needs
# (one row through XGBoost cost 62 ms under load instead of about 1). OpenMP reads the policy once, when the first
# library that uses it loads: scikit-learn's libgomp, which XGBoost's wheel shares (same soname), loads with
# pipelines.bundle; so it is set before the stage's module is imported (serve_like_openmp).
SERVING_TIMED_STAGES = frozenset({"compress"})
OPENMP_LIBRARIES = ("sklearn", "lightgbm", "xgboost", "torch")
log = logging.getLogger(__name__)


def run_stage(name: str, params: str | Path | None = None, root: str | Path | None = None, **options: Any
              ) -> dict[str, Any]:
    """Run stage `name` with settings from `params` on the project at `root`; return its summary.

    `options` go to the stage's run() as keyword arguments (e.g. collect's `rerun`)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(STAGES)}")
    if not serve_like_openmp(name):
        log.debug("%s: OpenMP was loaded before the stage, with the wait policy it had then", name)
    settings = load_settings(params)
    paths = Paths(Path(root).resolve()) if root else Paths.from_env()
    module = importlib.import_module(f"pipelines.stages.{name}")  # its run() sees only the settings it declares
    with project_lock(paths.root, settings.pipeline.lock_timeout_s):
        status = "failed"
        try:
            with measured() as usage:
                summary = module.run(settings, paths, **options)
            status = "ok"
        finally:  # a failed run costs too: reports/cost.json says so
            record_stage(paths, settings.cost, name, usage, status)
    log.info("%s done in %.1f s (%.1f CPU s): %s", name, usage.wall_s, usage.cpu_s, key_figures(summary))
    return summary


def serve_like_openmp(name: str) -> bool:
    """For a stage of SERVING_TIMED_STAGES: OMP_WAIT_POLICY=PASSIVE unless the environment says otherwise. False,
    the environment left alone, where it cannot apply any more (OpenMP loaded already in this process: a host
    that ran other work first, such as `amaas run` or a test session)."""
    if name not in SERVING_TIMED_STAGES:
        return True
    if any(library in sys.modules for library in OPENMP_LIBRARIES):
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True


def key_figures(summary: dict[str, Any]) -> str:
    """A stage's summary as one line: its numbers, words and flags (figures to 4 significant digits), without the
    nested tables and the folders (the JSON summary and the reports have them)."""
    shown = []
    for key, value in summary.items():
        if isinstance(value, float):
            shown.append(f"{key}={value:.4g}")
        elif isinstance(value, bool | int) or (isinstance(value, str) and os.sep not in value):
            shown.append(f"{key}={value}")
    return " ".join(shown) or "done"


def project_files(default_root: Path) -> tuple[Path, Path]:
    """(params file, project root) for an orchestrator: $AMAAS_PARAMS / $AMAAS_ROOT, else the given project.

    Every task of the DAGs starts here, so this is also where its process is told to exit fast
    (freeze_heap_at_exit)."""
    freeze_heap_at_exit()
    return _project_files(default_root)


def _project_files(default_root: Path) -> tuple[Path, Path]:
    root = Path(os.environ.get(ROOT_ENV) or default_root).resolve()
    return Path(os.environ.get(PARAMS_ENV) or root / "params.yaml"), root


def dag_settings(default_root: Path) -> tuple[Settings, Paths]:
    """The settings and paths a DAG file is parsed with (its owner, its trigger, its assets' URIs): those of
    project_files, read without touching the parsing process otherwise."""
    params, root = _project_files(default_root)
    return load_settings(params), Paths(root)


@functools.cache
def freeze_heap_at_exit() -> None:
    """Let the interpreter's exit skip the garbage collector's walks over the whole heap.

    `airflow dags test` runs every task in one process, which ends up holding Airflow, its execution API, pandas,
    torch, LightGBM, Evidently: over a million objects. At exit, Python collects them again and again while it
    tears the modules down (4 s on 2 cores, more than the tasks' own overhead together); frozen objects are
    skipped. Nothing is lost: the task's outputs are written and closed by then, and finalizers of objects still
    alive at exit are not guaranteed to run anyway. Airflow's forked task processes end with os._exit after the
    atexit hooks, so for them this changes nothing. A stage command (`amaas <stage>`, so each stage of `dvc repro`)
    pays the same at its end: 1.6-2.2 s with pandas, torch, LightGBM, XGBoost and Evidently loaded, 0.2-0.4 s
    frozen (measured under load 3-5)."""
    atexit.register(gc.freeze)


def run_in_project(name: str, default_root: Path, **options: Any) -> dict[str, Any]:
    """What an Airflow task runs: stage `name` on the project (see project_files)."""
    params, root = project_files(default_root)
    return run_stage(name, params, root, **options)


def task_retries(task_id: str) -> dict[str, Any]:
    """The Airflow retry arguments of a task (see RETRIED_TASKS)."""
    if task_id in RETRIED_TASKS:
        return {"retries": 3, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": 2.0,
                "max_retry_delay": timedelta(minutes=10)}
    return {"retries": 0}


class FailureAlert:
    """The on_failure_callback of every task of the DAGs: a `task_failed` alert through the project's alert
    channels (pipelines.alerts.task_failed). Airflow calls it once a task has failed for good (after its
    retries); it never raises. pipelines.alerts is imported only then, not while the DAG file is parsed."""

    def __init__(self, default_root: Path) -> None:
        self.default_root = default_root

    def __call__(self, context: Any) -> None:
        try:
            from pipelines.alerts import task_failed

            params, root = project_files(self.default_root)  # the settings the tasks run with
        except Exception:
            log.exception("could not send the task-failure alert")
            return
        task_failed(context, params, root)

    def __repr__(self) -> str:
        return f"FailureAlert({str(self.default_root)!r})"


def declarations() -> list[Stage]:
    """Every stage's contract, in pipeline order."""
    return [declaration(name) for name in STAGES]


def write_dvc_yaml(root: Path, check: bool = False) -> bool:
    """Write <root>/dvc.yaml from the declarations (atomically); with `check`, only say whether it is current."""
    from pipelines.io import write_text

    target = root / "dvc.yaml"
    text = dvc_yaml(declarations(), Paths(root.resolve()))
    current = target.is_file() and target.read_text() == text
    if not check and not current:
        write_text(target, text)
    return current


@contextlib.contextmanager
def _locked_project(default_root: Path) -> Iterator[Path]:
    """The project's root (see project_files), held under the project lock like a stage."""
    params, root = project_files(default_root)
    with project_lock(root, load_settings(params).pipeline.lock_timeout_s):
        yield root


def rollback_in_project(default_root: Path, reason: str) -> str:
    """Operator rollback from an orchestrator: the previous champion becomes champion again."""
    from pipelines.registry import Registry, rollback

    with _locked_project(default_root) as root:
        return rollback(Registry.of(Paths(root), load_settings(project_files(default_root)[0])), reason)


def answer_in_project(default_root: Path, approve: bool, by: str | None, note: str, timed_out: bool
                      ) -> dict[str, Any]:
    """A person's answer to the challenger that waits for approval, from an orchestrator (promote.answer)."""
    from pipelines.stages.promote import answer

    with _locked_project(default_root) as root:
        return answer(load_settings(project_files(default_root)[0]), Paths(root), approve, by, note, timed_out)


def version_in_project(default_root: Path, stages: tuple[str, ...] = ()) -> dict[str, Any]:
    """What the DAGs run after the stages: DVC versions their outputs (see pipelines.versioning)."""
    from pipelines.versioning import record

    with _locked_project(default_root) as root:
        return record(root, stages)


def schedule_from_env(variable: str, default: str) -> str | None:
    """A DAG's schedule: $`variable` (a cron string or preset; "none" = manual only), else `default`."""
    schedule = os.environ.get(variable, default)
    return None if schedule.lower() in ("", "none") else schedule
