"""Fixtures of the integration tests that more than one test file uses."""

from __future__ import annotations

import shutil

import pytest
import yaml

from pipelines.registry import Registry
from tests.conftest import amaas


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
