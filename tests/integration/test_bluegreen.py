"""A real blue-green `amaas serve` (serve.strategy: blue-green): `amaas deploy` under a steady stream of requests
switches to the new champion without losing one, and a champion whose bento cannot start leaves the old one
serving (the registry goes back, an alert goes out)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipelines.config import Paths
from pipelines.registry import Registry, force_promote
from pipelines.serving.server import alive
from tests.conftest import amaas, register_copy, served

pytestmark = pytest.mark.slow

ROW = {"age": 41, "income": None, "loan_amount": 12000, "term_months": 60, "interest_rate": 14.5,
       "credit_score": 610, "debt_to_income": None, "employment_years": 3, "open_accounts": 7,
       "delinquencies_2y": 1, "home_ownership": "rent", "purpose": "credit_card", "region": "south"}


def _set_params(root: Path, section: str, **values: object) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def test_blue_green_deploy_loses_no_request_and_a_broken_bento_leaves_the_old_one_serving(
        trained_project, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(trained_project, root, symlinks=True, ignore=shutil.ignore_patterns("logs", "serve.log"))
    paths = Paths(root)
    registry = Registry(paths.registry)
    old = registry.champion
    register_copy(registry, "vbluegreen", tmp_path)
    _set_params(root, "serve", strategy="blue-green")
    _set_params(root, "deploy", timeout_s=120)

    statuses: list[int] = []
    versions: list[str] = []
    stop = threading.Event()
    with served(root) as server:
        def client() -> None:
            while not stop.is_set():
                r = server.session.post(f"{server.url}/predict", json={"row": ROW}, timeout=30)
                statuses.append(r.status_code)
                if r.status_code == 200:
                    versions.append(r.json()[0]["model_version"])

        thread = threading.Thread(target=client)
        thread.start()
        blue = json.loads(paths.front_state.read_text())["active"]
        assert blue["color"] == "blue" and blue["champion"] == old

        force_promote(Registry(paths.registry), "vbluegreen", "test")
        deployed = amaas("deploy", root=root)  # returns once the front has switched and blue is stopped
        record = json.loads(paths.deployment.read_text())
        assert record["verified"] and record["strategy"] == "blue-green", deployed.stdout
        green = record["served"]
        assert green["color"] == "green" and green["champion"] == "vbluegreen" and green["url"] != blue["url"]
        assert server.session.get(f"{server.url}/models", timeout=30).json()["champion"] == "vbluegreen"
        assert not alive(blue["pid"])

        register_copy(registry, "vbroken", tmp_path, broken=True)
        force_promote(Registry(paths.registry), "vbroken", "test")
        # its workers fail at start and BentoML starts them again: the deploy gives up on that, not on its timeout
        _set_params(root, "deploy", timeout_s=900)
        started = time.monotonic()
        failed = amaas("deploy", root=root, check=False)
        assert failed.returncode == 2 and "keeps serving" in failed.stderr, failed.stderr[-2000:]
        assert "fail at start" in failed.stderr and time.monotonic() - started < 450, failed.stderr[-2000:]
        assert registry.champion == "vbluegreen"  # rolled back
        assert registry.decisions()[-1]["action"] == "rollback"
        assert json.loads(paths.front_state.read_text())["active"]["pid"] == green["pid"]
        assert server.session.get(f"{server.url}/models", timeout=30).json()["champion"] == "vbluegreen"
        assert server.session.post(f"{server.url}/predict", json={"row": ROW}, timeout=30).status_code == 200
        stop.set()
        thread.join(timeout=30)
    assert statuses and set(statuses) == {200}, set(statuses)  # no request lost while the front switched
    assert versions[0] == old and versions[-1] == "vbluegreen" and "vbroken" not in versions
    assert not paths.front_state.exists() and not alive(green["pid"])  # stopping the server stops its backends
