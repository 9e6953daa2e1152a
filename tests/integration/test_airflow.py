"""The training DAG: imports cleanly, matches the stage order, and runs with `airflow dags test`."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from pipelines.stages import STAGES
from tests.conftest import BIN, REPO, write_params

pytestmark = pytest.mark.slow


def _airflow_env(home) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "AIRFLOW_HOME": str(home / ".airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AMAAS_ROOT": str(home),
        "AMAAS_PARAMS": str(home / "params.yaml"),
    }


def test_dags_import_without_errors_and_follow_stage_order(tmp_path):
    script = (
        "import json; from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(REPO / 'dags')!r})\n"
        "dag = bag.dags.get('training_pipeline')\n"
        "order = [t.task_id for t in dag.topological_sort()] if dag else []\n"
        "print(json.dumps({'errors': {k: str(v) for k, v in bag.import_errors.items()}, 'order': order,"
        " 'retries': [t.retries for t in dag.tasks] if dag else []}))\n"
    )
    proc = subprocess.run([str(BIN / "python"), "-c", script], env=_airflow_env(tmp_path), capture_output=True,
                          text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == {}
    assert tuple(result["order"]) == STAGES
    assert all(r >= 1 for r in result["retries"])


def test_airflow_dags_test_runs_training_pipeline(tmp_path):
    write_params(tmp_path)
    env = _airflow_env(tmp_path)
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, capture_output=True, text=True, check=True)
    proc = subprocess.run([str(BIN / "airflow"), "dags", "test", "training_pipeline"], env=env,
                          capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    decision = json.loads((tmp_path / "reports" / "promotion.json").read_text())
    assert decision["promoted"] and decision["champion_after"] == decision["challenger"]
