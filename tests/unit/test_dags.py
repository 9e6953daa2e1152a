"""Every DAG file imports without errors (Airflow's own DagBag) and runs the stages as STAGES and the retry
policy say; every task alerts when it fails."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipelines.runner import STAGES
from tests.conftest import BIN, HEAVY, REPO, airflow_env, write_params


def _parse(*roots: Path) -> list[dict]:
    """The DAGs as Airflow's DagBag parses them with the settings of the project at each of `roots`, in one
    process (Airflow's import is most of the cost): a DagBag per root, the DAG files re-imported each time with
    that project's $AMAAS_ROOT and $AMAAS_PARAMS. `heavy`: the libraries loaded once all of them were parsed."""
    script = (
        "import json, os, sys; from airflow.dag_processing.dagbag import DagBag\n"
        "found = []\n"
        f"for root in {[str(r) for r in roots]!r}:\n"
        "    os.environ['AMAAS_ROOT'], os.environ['AMAAS_PARAMS'] = root, os.path.join(root, 'params.yaml')\n"
        f"    bag = DagBag(dag_folder={str(REPO / 'dags')!r})\n"
        "    found.append({'errors': {k: str(v) for k, v in bag.import_errors.items()},\n"
        "    'dags': {d.dag_id: {"
        "'order': [t.task_id for t in d.topological_sort()],"
        "'retries': {t.task_id: [t.retries, t.retry_exponential_backoff] for t in d.tasks},"
        "'params': sorted(d.params), 'doc': bool(d.doc_md), 'owners': sorted({t.owner for t in d.tasks}),"
        "'schedule': type(d.timetable).__name__, 'outlets': {t.task_id: [a.name for a in t.outlets] for t in d.tasks"
        " if t.outlets},"
        "'on_failure': {t.task_id: [repr(c) for c in t.on_failure_callback] for t in d.tasks}}"
        " for d in bag.dags.values()}})\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "print(json.dumps([{**f, 'heavy': heavy} for f in found]))\n"
    )
    proc = subprocess.run([str(BIN / "python"), "-c", script], env=airflow_env(roots[0]), capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def parsed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The DAGs parsed with a project whose owner is set, and with one whose training is scheduled on an asset."""
    owned, on_asset = tmp_path_factory.mktemp("owned"), tmp_path_factory.mktemp("asset")
    write_params(owned, **{"pipeline.owner": "risk-team"})
    write_params(on_asset, **{"pipeline.training_trigger": "asset"})
    return dict(zip(("owned", "asset"), _parse(owned, on_asset), strict=True))


def test_dags_import_without_errors_and_follow_stage_order(parsed):
    result = parsed["owned"]
    assert result["errors"] == {}
    assert result["heavy"] == []  # DAG files are parsed often: the stages' libraries load in the tasks, not here
    dags = result["dags"]
    assert set(dags) == {"training_pipeline", "monitoring", "rollback"}
    training = dags["training_pipeline"]
    # one task per stage, named as the stage, in pipeline order, the approval and champion asset before deploy;
    # then DVC versions what the run wrote
    assert training["order"] == [*STAGES[:-1], "approval", "champion", "deploy", "version"]
    assert training["outlets"] == {"validate": ["validated_data"], "train": ["trained_model"],
                                   "champion": ["champion"]}
    assert dags["monitoring"]["outlets"] == {"validate": ["validated_data"], "retrain": ["retrain_needed"]}
    assert all(d["owners"] == ["risk-team"] for d in dags.values())
    # what touches a source, a remote or a server retries with backoff; local computation does not
    retried = {t for t, (retries, backoff) in training["retries"].items() if retries and backoff > 1}
    assert retried == {"collect", "deploy", "version"}
    assert training["retries"]["train"][0] == 0 and training["params"] == ["deploy", "reason"]
    assert dags["monitoring"]["retries"]["collect"][0] >= 2 and dags["rollback"]["retries"]["deploy"][0] >= 2
    assert set(dags["monitoring"]["order"]) == {"collect", "validate", "report", "retrain_needed", "retrain",
                                                "trigger_training", "version"}
    assert dags["rollback"]["order"] == ["rollback", "deploy"] and dags["rollback"]["params"] == ["reason"]
    assert all(d["doc"] for d in dags.values())
    # every task of every DAG sends a task_failed alert (pipelines.alerts) when it fails for good
    alert = f"FailureAlert({str(REPO)!r})"
    for dag_id, found in dags.items():
        assert set(found["on_failure"]) == set(found["order"]), dag_id
        assert {task: calls for task, calls in found["on_failure"].items() if calls != [alert]} == {}, dag_id


def test_training_can_be_scheduled_on_the_retrain_needed_asset(parsed):
    """pipeline.training_trigger: asset: monitoring no longer triggers training_pipeline by id; training is
    scheduled on monitoring's retrain_needed asset (or its weekly schedule)."""
    assert parsed["asset"]["errors"] == {}
    dags = parsed["asset"]["dags"]
    assert "trigger_training" not in dags["monitoring"]["order"]
    assert dags["training_pipeline"]["schedule"] == "AssetOrTimeSchedule"
    assert parsed["owned"]["dags"]["training_pipeline"]["schedule"] != "AssetOrTimeSchedule"  # each its own params


def test_a_dag_task_freezes_its_heap_at_exit(tmp_path, monkeypatch):
    """`airflow dags test` runs every task in one process holding Airflow, torch, Evidently...: at exit the
    interpreter's collections would walk all of it (seconds), unless the task froze the heap first."""
    import atexit
    import gc

    from pipelines import runner

    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    runner.freeze_heap_at_exit.cache_clear()
    monkeypatch.delenv("AMAAS_ROOT", raising=False)
    monkeypatch.delenv("AMAAS_PARAMS", raising=False)
    assert runner.project_files(tmp_path) == (tmp_path.resolve() / "params.yaml", tmp_path.resolve())
    runner.project_files(tmp_path)  # every task of the run goes through here: one hook is enough
    assert registered == [gc.freeze]
