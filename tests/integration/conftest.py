"""Fixtures of the integration tests that more than one test file uses."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml
from playwright.sync_api import Page

from pipelines.registry import Registry
from tests.conftest import BIN, airflow_env, amaas, dvc_project, free_port, run_tool, wait_until, write_params

# the login lines pipelines/airflow_ui.py (`make airflow`) prints once the UI answers
BANNER = re.compile(r"^Airflow UI: (\S+)\nUser:\s+(\S+)\nPassword:\s+(\S+)$", re.MULTILINE)


@pytest.fixture(scope="session")
def two_models(trained_project, tmp_path_factory):
    """A project whose registry holds the champion and a weaker challenger that failed the gate; shared by the
    session (test_serve's canary test serves it in place and leaves the same champion; others work on a copy)."""
    root = tmp_path_factory.mktemp("two-models")
    shutil.copytree(trained_project, root, dirs_exist_ok=True, symlinks=True)
    shutil.rmtree(root / "logs", ignore_errors=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["learners"] = ["lightgbm"]
    params["train"]["lightgbm"].update(n_estimators=3, num_leaves=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("train", "evaluate", "compress", "package", "promote"):
        amaas(stage, root=root)
    registry = Registry(root / "models" / "registry")
    aliases = registry.aliases()
    assert aliases["challenger"] != aliases["champion"]
    return root, aliases["champion"], aliases["challenger"]


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A fresh clone's worth of project (dvc_project, the small params) after its first `dvc repro`, and that run;
    made once per session and never changed: a test works on a copy (copy_project)."""
    root = tmp_path_factory.mktemp("reproduced")
    dvc_project(root)
    write_params(root)
    return root, run_tool(["dvc", "repro"], root, timeout=900)


def copy_project(source: Path, dest: Path) -> Path:
    """A copy of the project `source` at `dest` (DVC and git state included; DVC hashes the copied files again)."""
    shutil.copytree(source, dest, symlinks=True, dirs_exist_ok=True)
    return dest


@pytest.fixture(scope="session")
def migrated_airflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Airflow metadata database (SQLite) after `airflow db migrate`, made once per session: a migration takes
    5 s or more, so each test copies this one into its project's AIRFLOW_HOME (airflow_home) instead."""
    root = tmp_path_factory.mktemp("airflow-db")
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=airflow_env(root), capture_output=True, text=True,
                   check=True)
    return root / ".airflow" / "airflow.db"


def airflow_home(env: dict[str, str], migrated_db: Path) -> dict[str, str]:
    """`env` (airflow_env's) with the migrated database copied into its AIRFLOW_HOME: the state `airflow db migrate`
    leaves there, but for airflow.cfg, which the next command writes for that home as it would after a migration."""
    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy2(migrated_db, home / "airflow.db")
    return env


@dataclass
class Airflow:
    url: str
    user: str
    password: str
    log: Path
    env: dict[str, str]  # of `airflow standalone`, less what pipelines.airflow_ui adds


def _stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM everything Airflow started, then SIGKILL what is left. Task processes run in process groups of
    their own, so they are found as descendants before anything is killed."""
    try:
        family = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    for process in psutil.wait_procs(family, timeout=30)[1]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)  # anything that left the tree but not the session's group
    server.wait(timeout=30)


@contextlib.contextmanager
def standalone_airflow(root: Path, **settings: str) -> Iterator[Airflow]:
    """`make airflow`'s script (scheduler, DAG processor, triggerer, API server and UI) on the project at `root`
    (its params.yaml written), on free ports, with Airflow `settings` (AIRFLOW__... variables) added; stopped
    with everything it started."""
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(root / ".airflow"),  # `make test` exports the repository's own
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AMAAS_TRAINING_SCHEDULE": "none",  # unpausing a @weekly DAG would start a scheduled run before ours
        # the log servers' fixed ports would clash with a `make airflow` running on this machine
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        **settings,
    }
    log_path = root / "airflow.log"
    with log_path.open("w") as log:
        server = subprocess.Popen([str(BIN / "python"), "-m", "pipelines.airflow_ui", "--root", str(root),
                                   "--port", str(free_port())], stdout=log, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
        try:
            wait_until(lambda: BANNER.search(log_path.read_text()) is not None, server,
                       f"Airflow (log: {log_path})", timeout=300)
            url, user, password = BANNER.search(log_path.read_text()).groups()
            yield Airflow(url, user, password, log_path, env)
        finally:
            _stop(server)


def log_in(page: Page, airflow: Airflow) -> str:
    """Sign in through the login form; the session's API token (the `_token` cookie)."""
    page.goto(airflow.url)
    page.get_by_label("Username").fill(airflow.user)
    page.get_by_label("Password").fill(airflow.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/login" not in url)
    return next(c["value"] for c in page.context.cookies() if c["name"] == "_token")
