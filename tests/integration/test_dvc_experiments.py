"""`dvc exp run` works as DVC users expect: experiments record their metrics and plots for `dvc exp show` and
`dvc plots diff`, and never change the registry's champion or what is deployed."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.conftest import BIN, REPO, run_tool
from tests.integration.conftest import copy_project

pytestmark = pytest.mark.slow
GIT = ["git", "-c", "user.name=amaas test", "-c", "user.email=test@amaas.invalid"]


def test_two_experiments_compare_and_leave_the_champion_alone(tmp_path, reproduced):
    """On a copy of the session's first `dvc repro` (test_dvc checks that run), committed as the baseline."""
    source, repro = reproduced
    assert repro.returncode == 0, repro.stdout[-2000:] + repro.stderr[-3000:]
    copy_project(source, tmp_path)
    for name in (".gitignore", ".dvcignore"):
        shutil.copy2(REPO / name, tmp_path / name)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    aliases = (tmp_path / "models" / "registry" / "aliases.json").read_text()
    deployment = (tmp_path / "models" / "deployment.json").read_text()
    assert json.loads(aliases)["champion"] is not None
    assert run_tool([*GIT, "add", "-A"], tmp_path).returncode == 0
    committed = run_tool([*GIT, "commit", "-q", "-m", "baseline"], tmp_path)
    assert committed.returncode == 0, committed.stderr

    for name, ensemble in (("stacked", "stacking"), ("blended", "blending")):
        # two learners without the MLP: stacking fits each learner once per fold
        run = run_tool(["dvc", "exp", "run", "-n", name, "-S", f"train.ensemble={ensemble}",
                        "-S", "train.learners=[lightgbm,xgboost]"], tmp_path, env=env)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        # the experiment's gate decision is recorded, the registry and the deployment are not touched
        promotion = json.loads((tmp_path / "reports" / "promotion.json").read_text())
        assert promotion["experiment"] == name and promotion["promoted"] is False and "would_promote" in promotion
        assert (tmp_path / "models" / "registry" / "aliases.json").read_text() == aliases
        assert (tmp_path / "models" / "deployment.json").read_text() == deployment

    shown = run_tool(["dvc", "exp", "show", "--json"], tmp_path, env=env)
    assert shown.returncode == 0, shown.stderr[-2000:]
    experiments = {}
    for baseline in json.loads(shown.stdout):
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                experiments[exp["name"]] = rev["data"]
    assert {"stacked", "blended"} <= set(experiments)
    for name, ensemble in (("stacked", "stacking"), ("blended", "blending")):
        data = experiments[name]
        metrics = data["metrics"]["reports/metrics.json"]["data"]
        assert 0.5 < metrics["roc_auc"] <= 1, name
        assert data["metrics"]["reports/train.json"]["data"]["ensemble"] == ensemble
        assert data["params"]["params.yaml"]["data"]["train"]["ensemble"] == ensemble

    plots = run_tool(["dvc", "plots", "diff", "stacked", "blended", "--json"], tmp_path, env=env)
    assert plots.returncode == 0, plots.stderr[-2000:]
    # {"data": {plot file: [renderings, each naming the revisions it draws]}, "errors": [the other tasks' plots]}
    roc = json.loads(plots.stdout)["data"]["reports/plots/roc.csv"]
    revisions = set().union(*(item.get("revisions", []) for item in roc))
    assert {"stacked", "blended"} <= revisions, plots.stdout[:3000]
