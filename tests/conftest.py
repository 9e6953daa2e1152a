"""Shared fixtures: small settings files and a project folder with a finished pipeline run."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from pipelines.registry import Registry

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# `airflow ...` as the README runs it: Airflow's CLI whose in-process execution API starts in a second
# (pipelines.airflow_cli); a test of Airflow's own CLI calls BIN / "airflow"
AIRFLOW = (str(BIN / "python"), "-m", "pipelines.airflow_cli")
# libraries that take seconds to import: the CLI, a collect with nothing new and the DAG files load none of them
HEAVY = ("pandas", "numpy", "sklearn", "scipy", "lightgbm", "xgboost", "torch", "great_expectations", "evidently")

# Nothing a test runs may phone home or write to the user's home.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def small_params(**overrides: Any) -> dict[str, Any]:
    """The shipped params.yaml shrunk to seconds of work; `overrides` use dotted keys."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    small = {
        "source.simulator.n_batches": 3,
        "source.simulator.rows_per_batch": 1000,
        "train.lightgbm.n_estimators": 60,
        "train.xgboost.n_estimators": 60,
        "train.mlp.epochs": 4,
        "promote.bootstrap_samples": 100,
        "compress.latency_rows": 20,
        "compress.measure_memory": False,  # test_compress measures it
        "validate.expectations_file": None,
        **overrides,
    }
    for dotted, value in small.items():
        set_dotted(params, dotted, value)
    return params


def get_dotted(params: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted key of a params mapping ("train.lightgbm.n_estimators")."""
    node: Any = params
    for part in dotted.split("."):
        node = node[part]
    return node


def set_dotted(params: dict[str, Any], dotted: str, value: Any) -> None:
    """Set the value at a dotted key of a params mapping (its parent sections must exist)."""
    parent, _, leaf = dotted.rpartition(".")
    (get_dotted(params, parent) if parent else params)[leaf] = value


def write_params(folder: Path, **overrides: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(small_params(**overrides), sort_keys=False))
    return path


def amaas(*args: str, root: Path, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run the real `amaas` console script on `root`."""
    return subprocess.run([str(BIN / "amaas"), "--params", str(root / "params.yaml"), "--root", str(root), *args],
                          capture_output=True, text=True, check=check, **kwargs)


def airflow_env(root: Path) -> dict[str, str]:
    """Environment for `airflow ...` on the project at `root`: its own AIRFLOW_HOME, the repository's DAGs."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "AIRFLOW_HOME": str(root / ".airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AMAAS_ROOT": str(root),
        "AMAAS_PARAMS": str(root / "params.yaml"),
    }


def copy_project_files(dest: Path) -> None:
    """What a fresh clone has that dvc.yaml depends on: code, dvc.yaml, DVC config."""
    for name in ("pipelines", "bentos", "dags", "expectations"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "dvc.yaml", dest / "dvc.yaml")


def dvc_project(root: Path) -> None:
    """A fresh clone's worth of project at `root` (params.yaml written by the caller): code, dvc.yaml, DVC
    config (local remote .dvc-storage/), git."""
    copy_project_files(root)
    (root / ".dvc").mkdir()
    shutil.copy2(REPO / ".dvc" / "config", root / ".dvc" / "config")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)


def run_tool(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, **kw: Any
             ) -> subprocess.CompletedProcess[str]:
    """A command of the venv (dvc, airflow, amaas) in `cwd`, output captured."""
    env = env or {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ...]:
    """Small model inputs: (settings, fitted transform, X train, y train, X valid, y valid)."""
    import pandas as pd

    from pipelines.config import load_settings
    from pipelines.sources.simulator import generate_batch
    from pipelines.transform import FeatureTransform

    settings = load_settings(write_params(tmp_path_factory.mktemp("p"), **{"source.simulator.malformed_share": 0}))
    cfg = settings.source.simulator
    raw = pd.concat([generate_batch(cfg, settings.seed, i) for i in range(3)], ignore_index=True)
    transform = FeatureTransform.fit(raw.iloc[:2000], settings.data_schema, settings.clean)
    X = transform.transform(raw)
    y = raw["default"].to_numpy()
    return settings, transform, X.iloc[:2000], y[:2000], X.iloc[2000:], y[2000:]


@pytest.fixture(scope="session")
def blended(data: tuple[Any, ...]) -> Any:
    """A blending ensemble of the configured learners fitted on `data` once for the session, for the tests that
    only save, load and predict with one (none of them changes it)."""
    from pipelines.models import Ensemble, build_learners

    settings, transform, X, y, Xv, yv = data
    return Ensemble(build_learners(settings, transform), "blending").fit(X, y, Xv, yv)


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder after one full `amaas run` on small data (shared by slow tests); the distilled student
    serves (serve.model: student)."""
    root = tmp_path_factory.mktemp("project")
    write_params(root, **{"serve.model": "student"})
    proc = amaas("run", root=root, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture(scope="session")
def server(trained_project: Path) -> Iterator[Server]:
    """A real `amaas serve` of trained_project's champion, shared by the slow tests that only send requests."""
    with served(trained_project) as running:
        yield running


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/integration/ is slow, whether or not its file says so: `make test-fast` skips it."""
    integration = REPO / "tests" / "integration"
    for item in items:
        if Path(item.path).resolve().is_relative_to(integration):
            item.add_marker(pytest.mark.slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_chromium(playwright: Any, home: Path) -> Any:
    """Headless Chromium from Debian's package for a Playwright test; its $HOME state (crash reports, dconf)
    goes under `home`, not the user's home."""
    return playwright.chromium.launch(executable_path=server_binary("chromium", "chromium"), headless=True, env={
        **os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache")})


def server_binary(name: str, package: str, also: str | None = None) -> str:
    """Path of a server program from a Debian package (or the `also` glob); fails in CI, where .ci/run
    installs the package, and skips elsewhere."""
    found = shutil.which(name)
    if found is None and also:
        found = next(iter(sorted(glob.glob(also))[-1:]), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} not found: .ci/run must install Debian's {package} package")
        pytest.skip(f"{name} not installed (apt-get install {package})")
    return found


def wait_until(ready: Callable[[], bool], server: subprocess.Popen[Any], what: str, timeout: float = 60) -> None:
    """Poll `ready` until it is true; fail if the server process exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        if server.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not start")
        time.sleep(0.2)


def wait_ready(url: str, proc: subprocess.Popen[Any], log: Path, timeout: float = 120) -> None:
    """Poll `url`/readyz until it answers 200 (a refused or slow answer is retried until `timeout`); fail with the
    tail of `log` if the server process exits first."""
    import requests

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"server not ready in {timeout:.0f} s")
        time.sleep(0.3)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server of our own on 127.0.0.1 (Debian's postgresql package; .ci/run installs it)."""
    server_binary("initdb", "postgresql", also="/usr/lib/postgresql/*/bin/initdb")
    from pipelines.state.local_servers import postgres

    with postgres() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis server of our own on 127.0.0.1, nothing persisted."""
    server_binary("redis-server", "redis-server")
    from pipelines.state.local_servers import redis

    with redis() as url:
        yield url


@dataclass
class Server:
    url: str
    session: Any  # a requests.Session that sends a valid API key


@contextlib.contextmanager
def served(root: Path) -> Iterator[Server]:
    """A real `amaas serve` of `root`'s champion on a free localhost port, and a client with an API key."""
    import requests

    from pipelines.state.keys import ApiKeys

    names = ApiKeys(root / ".amaas" / "api_keys.json").names()
    key = ApiKeys(root / ".amaas" / "api_keys.json").add(f"tests-{len(names)}")
    port = free_port()
    log = (root / "serve.log").open("w")
    proc = subprocess.Popen([str(BIN / "amaas"), "--params", str(root / "params.yaml"), "--root", str(root),
                             "serve", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, root / "serve.log")
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {key}"
        yield Server(url, session)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def register_copy(registry: Registry, version: str, tmp: Path, broken: bool = False) -> None:
    """Register the champion's bundle again under another version name (the same model: a cheap new release),
    or, `broken`, with its model file replaced by text that is not a model: its bento cannot start."""
    bundle = tmp / version
    shutil.copytree(registry.champion_dir(), bundle)
    metadata = json.loads((bundle / "metadata.json").read_text())
    (bundle / "metadata.json").write_text(json.dumps({**metadata, "version": version}))
    if broken:
        (bundle / "ensemble" / "student_lightgbm" / "model.txt").write_text("not a model")
    registry.register(bundle)


def files_state(keys_file: Path) -> Callable[[], Any]:
    """The one-host shared state of a gateway under test: the key file `keys_file` and the limits beside it."""
    from types import SimpleNamespace

    from pipelines.state.keys import ApiKeys
    from pipelines.state.limits import SharedState

    state = SimpleNamespace(keys=ApiKeys(keys_file), limits=SharedState.beside(keys_file))
    return lambda: state
