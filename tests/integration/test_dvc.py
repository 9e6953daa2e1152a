"""`dvc repro` on a fresh copy of the project: runs everything once, then nothing; same as `amaas run`."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from pipelines.runner import STAGES
from tests.conftest import AIRFLOW, REPO, airflow_env, dvc_project, run_tool, write_params
from tests.integration.conftest import airflow_home, copy_project

pytestmark = pytest.mark.slow


def test_dvc_yaml_follows_stage_order():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert tuple(stages) == STAGES
    assert all(spec["cmd"] == f"amaas {name}" for name, spec in stages.items())


def _dvc_project(root) -> None:
    dvc_project(root)
    write_params(root)


def _ran(repro: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in repro.stdout.splitlines() if "Running stage" in line]


def test_dvc_repro_twice_and_same_metrics_as_amaas_run(tmp_path, trained_project, reproduced):
    """The first `dvc repro` of a fresh project (the session's `reproduced`), then a second on a copy of it."""
    source, first = reproduced
    copy_project(source, tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    # a log worth reading: DVC's lines and one line per stage with its figures; no warning (progress with -v)
    lines = (first.stdout + first.stderr).splitlines()
    assert len(lines) <= 60 and not [line for line in lines if "warning" in line.lower()], "\n".join(lines)
    assert sum(" done in " in line for line in lines) == len(STAGES)

    # collect asks the source for new rows on every repro; with none, data/raw is unchanged and nothing after runs
    second = run_tool(["dvc", "repro"], tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert _ran(second) == ["Running stage 'collect':"]
    for stage in STAGES[1:]:
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout

    shown = run_tool(["dvc", "metrics", "show", "--json"], tmp_path)
    metrics = json.loads(shown.stdout)
    dvc_metrics = next(iter(metrics.values()))["data"]["reports/metrics.json"]["data"]
    assert 0.5 < dvc_metrics["roc_auc"] <= 1

    # the same stage functions through the CLI give the same model and the same numbers
    amaas_metrics = json.loads((trained_project / "reports" / "metrics.json").read_text())
    assert amaas_metrics == dvc_metrics

    pushed = run_tool(["dvc", "push"], tmp_path)
    assert pushed.returncode == 0, pushed.stderr[-2000:]
    assert any((tmp_path / ".dvc-storage").rglob("*"))


def test_an_airflow_run_is_versioned_by_dvc(tmp_path, migrated_airflow_db):
    """The training DAG ends with dvc commit + push: dvc repro afterwards skips what Airflow did."""
    _dvc_project(tmp_path)
    env = airflow_home(airflow_env(tmp_path), migrated_airflow_db)
    run = run_tool([*AIRFLOW, "dags", "test", "training_pipeline"], tmp_path, env=env, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "'versioned': True" in run.stdout + run.stderr
    assert any(p.is_file() for p in (tmp_path / ".dvc-storage").rglob("*"))  # pushed to the remote

    repro = run_tool(["dvc", "repro"], tmp_path)
    assert repro.returncode == 0, repro.stderr[-2000:]
    assert _ran(repro) == ["Running stage 'collect':"]  # always asks the source; nothing new
    for stage in STAGES[1:]:
        assert f"Stage '{stage}' didn't change, skipping" in repro.stdout
