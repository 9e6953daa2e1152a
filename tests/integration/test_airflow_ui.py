"""The Airflow UI as `make airflow` starts it: log in with the generated password, trigger training_pipeline
with the Trigger button and see the run succeed."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import Page, expect, sync_playwright

from tests.conftest import launch_chromium, write_params
from tests.integration.conftest import Airflow, log_in, standalone_airflow

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1200),  # Airflow's start, the DAG's parsing and up to RUN_TIMEOUT for the run
]
DAG_ID = "training_pipeline"
RUN_TIMEOUT = 600


@pytest.fixture
def airflow(tmp_path: Path) -> Iterator[Airflow]:
    """`make airflow`'s script on a small project in `tmp_path`, on free ports."""
    write_params(tmp_path)
    with standalone_airflow(tmp_path) as running:
        yield running


def _get(api: requests.Session, url: str) -> requests.Response | None:
    """One poll of the API; None when it timed out or the connection failed: on a loaded machine the API server
    can miss one request, and only the polling loop's overall deadline ends the wait."""
    try:
        return api.get(url, timeout=10)
    except (requests.ConnectionError, requests.Timeout):
        return None


def _wait_for_dag(api: requests.Session, url: str) -> None:
    """The DAG processor parses dags/ a few seconds after the API server answers."""
    deadline = time.monotonic() + 120
    while (answer := _get(api, f"{url}/api/v2/dags/{DAG_ID}")) is None or answer.status_code != 200:
        assert time.monotonic() < deadline, f"{DAG_ID} not parsed in 120 s"
        time.sleep(0.5)


def _trigger(page: Page, url: str) -> None:
    """The DAG page's Trigger button, then the dialog's: one manual run, unpausing the DAG if it is paused."""
    page.goto(f"{url}/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger Dag").click()
    dialog = page.get_by_role("dialog")
    confirm = dialog.get_by_role("button", name="Trigger", exact=True)
    confirm.wait_for()
    unpause = dialog.get_by_label(f"Unpause {DAG_ID} on trigger")  # only there while the DAG is paused
    if unpause.count():
        unpause.check(force=True)  # Chakra draws its own box over the real (hidden) checkbox
    confirm.click()
    dialog.wait_for(state="hidden")


def _finished_runs(api: requests.Session, url: str) -> list[dict[str, Any]]:
    """The DAG's runs once none is queued or running (or as they are after RUN_TIMEOUT)."""
    deadline = time.monotonic() + RUN_TIMEOUT
    runs: list[dict[str, Any]] = []
    while True:
        answer = _get(api, f"{url}/api/v2/dags/{DAG_ID}/dagRuns")
        if answer is not None and answer.status_code == 200:
            runs = answer.json()["dag_runs"]  # else the last runs seen: a missed poll is no answer
        if (runs and all(r["state"] in ("success", "failed") for r in runs)) or time.monotonic() > deadline:
            return runs
        time.sleep(1)  # a poll is one cheap API call: the run's end is seen within a second


def test_training_pipeline_triggered_from_the_ui_succeeds(airflow: Airflow, tmp_path: Path) -> None:
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, tmp_path / "browser-home")
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        try:
            api = requests.Session()
            api.headers["Authorization"] = f"Bearer {log_in(page, airflow)}"
            _wait_for_dag(api, airflow.url)
            _trigger(page, airflow.url)
            runs = _finished_runs(api, airflow.url)
            assert [(r["run_type"], r["triggered_by"]) for r in runs] == [("manual", "ui")], runs
            assert runs[0]["state"] == "success", f"{runs[0]} (Airflow log: {airflow.log})"
            # and as a person sees it: the run's page shows its state badge next to its id
            page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{runs[0]['dag_run_id']}")
            expect(page.locator("body")).to_contain_text(
                re.compile(re.escape(runs[0]["dag_run_id"]) + r"\s*Success"), timeout=30_000)
        except BaseException:  # pytest's failures are BaseExceptions
            with contextlib.suppress(Exception):  # keep the original error if the page is gone too
                page.wait_for_load_state("networkidle", timeout=15_000)  # the UI draws skeletons first
                page.screenshot(path=tmp_path / "failure.png", full_page=True)
            raise
        finally:
            browser.close()
    assert (tmp_path / "reports" / "promotion.json").exists()
