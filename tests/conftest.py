"""Shared fixtures: small settings files and a project folder with a finished pipeline run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

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
        **overrides,
    }
    for dotted, value in small.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return params


def write_params(folder: Path, **overrides: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(small_params(**overrides), sort_keys=False))
    return path


def amaas(*args: str, root: Path, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run the real `amaas` console script on `root`."""
    return subprocess.run([str(BIN / "amaas"), "--params", str(root / "params.yaml"), "--root", str(root), *args],
                          capture_output=True, text=True, check=check, **kwargs)


def copy_project_files(dest: Path) -> None:
    """What a fresh clone has that dvc.yaml depends on: code, dvc.yaml, DVC config."""
    for name in ("pipelines", "bentos", "dags"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "dvc.yaml", dest / "dvc.yaml")


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder after one full `amaas run` on small data (shared by slow tests)."""
    root = tmp_path_factory.mktemp("project")
    write_params(root)
    proc = amaas("run", root=root, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root
