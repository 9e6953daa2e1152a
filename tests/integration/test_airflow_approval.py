"""promote.approval with Airflow: a borderline challenger waits at training_pipeline's approval task (Airflow's
human-in-the-loop operator) with its evidence; a rejection, a timeout and an approval from the UI are recorded in
the registry with the person and the note; the asset graph links monitoring -> training -> champion.

One `airflow standalone` (scheduler: the approval timeout; API server: the answers) and one project for the module.
Each run is `airflow dags test` on the same metadata database with the stages before promote marked successful
(the project already holds their outputs), so a run costs promote, the wait and deploy, not a training."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from playwright.sync_api import expect, sync_playwright

from pipelines.registry import Registry
from pipelines.runner import STAGES
from tests.conftest import AIRFLOW, airflow_env, launch_chromium
from tests.integration.conftest import Airflow, log_in, standalone_airflow

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
DAG_ID = "training_pipeline"
BEFORE_PROMOTE = "|".join(STAGES[:STAGES.index("promote")])


@pytest.fixture(scope="module")
def project(two_models, tmp_path_factory) -> tuple[Path, str]:
    """A copy of two_models (a champion, and a weaker challenger in models/challenger) whose gate calls every
    p-value up to 1 borderline, so the weak challenger waits; training is scheduled on the retrain_needed asset."""
    source, champion, _ = two_models
    root = tmp_path_factory.mktemp("approval")
    shutil.copytree(source, root, dirs_exist_ok=True, symlinks=True)
    shutil.rmtree(root / ".airflow", ignore_errors=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["promote"].update(approval="borderline", approval_max_p_value=1.0)
    params["pipeline"]["training_trigger"] = "asset"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root, champion


@pytest.fixture(scope="module")
def airflow(project) -> Iterator[Airflow]:
    # the scheduler's sweep of expired approval requests every 2 s instead of 15: a timeout lands when it is due
    with standalone_airflow(project[0], AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL="2") as running:
        yield running


@pytest.fixture(scope="module")
def api(airflow) -> requests.Session:
    session = requests.Session()
    token = session.post(f"{airflow.url}/auth/token", json={"username": airflow.user, "password": airflow.password},
                         timeout=30)
    session.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
    return session


def _new_challenger(root: Path, name: str, timeout_min: float = 30) -> str:
    """The challenger again under a new version name (a new release of the same weak model), and the approval
    timeout of the next run."""
    metadata = root / "models" / "challenger" / "metadata.json"
    version = f"{json.loads(metadata.read_text())['version'].split('-')[0]}-{name}"  # a valid BentoML tag too
    metadata.write_text(json.dumps({**json.loads(metadata.read_text()), "version": version}))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["promote"]["approval_timeout_min"] = timeout_min
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return version


@contextlib.contextmanager
def _run(root: Path, airflow: Airflow) -> Iterator[subprocess.Popen[str]]:
    """training_pipeline as `airflow dags test` on the standalone's database, stages before promote marked done."""
    log = (root / "dags-test.log").open("w")
    run = subprocess.Popen([*AIRFLOW, "dags", "test", DAG_ID, "--mark-success-pattern", BEFORE_PROMOTE],
                           env={**airflow.env, **airflow_env(root)}, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        yield run
        assert run.wait(timeout=300) == 0, (root / "dags-test.log").read_text()[-4000:]
    finally:
        if run.poll() is None:
            run.kill()
        log.close()


def _waiting(api: requests.Session, airflow: Airflow, run: subprocess.Popen[str], root: Path, version: str
             ) -> dict[str, Any]:
    """The request to approve `version` once the task waits for it."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert run.poll() is None, (root / "dags-test.log").read_text()[-4000:]
        answer = api.get(f"{airflow.url}/api/v2/dags/{DAG_ID}/dagRuns/~/hitlDetails",
                         params={"response_received": False}, timeout=10)
        # the request is written a moment before its task is marked awaiting_input: waiting means both
        found = [r for r in answer.json()["hitl_details"] if version in r["subject"]
                 and r["task_instance"]["state"] == "awaiting_input"] if answer.ok else []
        if found:
            return found[0]
        time.sleep(0.5)
    raise AssertionError("no approval request within 300 s")


def _respond(api: requests.Session, airflow: Airflow, request: dict[str, Any], option: str, note: str) -> None:
    ti = request["task_instance"]
    answer = api.patch(f"{airflow.url}/api/v2/dags/{DAG_ID}/dagRuns/{ti['dag_run_id']}/taskInstances/"
                       f"{ti['task_id']}/-1/hitlDetails",
                       json={"chosen_options": [option], "params_input": {"note": note}}, timeout=30)
    assert answer.status_code == 200, answer.text


def test_a_borderline_challenger_waits_and_a_rejection_keeps_the_champion(project, airflow, api):
    root, champion = project
    version = _new_challenger(root, "rejected")
    with _run(root, airflow) as run:
        request = _waiting(api, airflow, run, root, version)
        assert request["subject"] == f"Promote {version} over champion {champion}?"
        body = request["body"]
        for evidence in ("waiting for approval (borderline: p=", f"challenger {version}", f"champion {champion}",
                         "| roc_auc |", "**Gate:** gain -", "**Slices losing more than", "single-row latency p50",
                         "per 1,000 rows", "[Model card](file://", "[Drift report](file://"):
            assert evidence in body, (evidence, body)
        assert request["options"] == ["Approve", "Reject"] and request["task_instance"]["state"] == "awaiting_input"
        _respond(api, airflow, request, "Reject", "north worse than we accept")
    registry = Registry(root / "models" / "registry")
    decision = registry.decisions()[-1]
    assert (decision["action"], decision["by"], decision["note"], decision["challenger"]) == (
        "reject", airflow.user, "north worse than we accept", version)
    assert registry.champion == champion and decision["p_value"] is not None  # the gate's evidence kept


def test_no_answer_in_time_rejects(project, airflow, api):
    root, champion = project
    # a fractional timeout, as a user may set one: 15 s, long enough for the request to be seen waiting first
    version = _new_challenger(root, "timed-out", timeout_min=0.25)
    with _run(root, airflow) as run:
        _waiting(api, airflow, run, root, version)  # and nobody answers: the scheduler's sweep applies the default
    registry = Registry(root / "models" / "registry")
    decision = registry.decisions()[-1]
    assert (decision["action"], decision["by"], decision["timed_out"], decision["challenger"]) == (
        "reject", None, True, version)
    assert registry.champion == champion


def test_approving_from_the_ui_promotes_with_user_and_note(project, airflow, api, tmp_path):
    root, champion = project
    version = _new_challenger(root, "approved")
    with _run(root, airflow) as run:
        request = _waiting(api, airflow, run, root, version)
        ti = request["task_instance"]
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright, tmp_path / "browser-home")
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            try:
                log_in(page, airflow)
                page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{ti['dag_run_id']}/tasks/approval/required_actions")
                expect(page.get_by_text(request["subject"])).to_be_visible(timeout=60_000)  # the request, shown
                page.locator("#element_note").fill("signed off by risk")  # the form's field of the param `note`
                page.get_by_role("button", name="Approve").click()
                expect(page.get_by_text("approval response successful")).to_be_visible(timeout=60_000)
            except BaseException:
                with contextlib.suppress(Exception):
                    page.screenshot(path=tmp_path / "failure.png", full_page=True)
                raise
            finally:
                browser.close()
    registry = Registry(root / "models" / "registry")
    decision = registry.decisions()[-1]
    assert (decision["action"], decision["by"], decision["note"]) == ("approve", airflow.user, "signed off by risk")
    assert registry.champion == version and decision["champion_before"] == champion
    assert json.loads((root / "reports" / "promotion.json").read_text())["action"] == "approve"


def test_the_asset_graph_links_monitoring_training_and_the_champion(airflow, api):
    assets = {a["name"]: a for a in api.get(f"{airflow.url}/api/v2/assets", timeout=30).json()["assets"]}
    retrain, champion = assets["retrain_needed"], assets["champion"]
    assert {(t["dag_id"], t["task_id"]) for t in retrain["producing_tasks"]} == {("monitoring", "retrain")}
    assert [d["dag_id"] for d in retrain["scheduled_dags"]] == [DAG_ID]
    assert {(t["dag_id"], t["task_id"]) for t in champion["producing_tasks"]} == {(DAG_ID, "champion")}
