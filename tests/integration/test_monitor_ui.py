"""The Evidently UI as `make monitor` starts it, after days of monitoring: the dashboard's panels have points.

Day 0 is a whole `amaas run` (a copy of the session's trained_project: the first report watches the challenger;
promote then crowns it), then three simulator days of collect, validate and report against that champion.
`python -m pipelines.monitor_ui` serves reports/workspace; Chromium opens the project's dashboard and finds each
panel by its title with a point per day for each of its series. The screenshot is kept as
docs/monitoring_dashboard.png (the README shows it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Locator, Page, sync_playwright

from pipelines.workspace import PROJECT_ID, panels
from tests.conftest import BIN, REPO, amaas, free_port, launch_chromium, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
DAYS = 3  # monitoring days after the training run
BANNER = re.compile(r"^Dashboard:\s+(\S+)$", re.MULTILINE)  # what pipelines/monitor_ui.py prints once the UI answers
SCREENSHOT = REPO / "docs" / "monitoring_dashboard.png"
# MUI X Charts, which Evidently's UI draws panels with: a line's points and a bar chart's bars
POINTS = "circle.MuiMarkElement-root, rect.MuiBarElement-root"


def _next_day(root: Path) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["source"]["simulator"]["n_batches"] += 1  # the source has one more day of rows
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def monitored(trained_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project after a training run (a copy of the session's, without what its servers logged) and DAYS days of
    monitoring."""
    root = tmp_path_factory.mktemp("monitored")
    shutil.copytree(trained_project, root, dirs_exist_ok=True, symlinks=True,
                    ignore=shutil.ignore_patterns("logs", "serve.log"))
    for _ in range(DAYS):
        _next_day(root)
        for stage in ("collect", "validate", "report"):
            done = amaas(stage, root=root, check=False)
            assert done.returncode == 0, f"{stage}: {done.stderr[-3000:]}"
    return root


@pytest.fixture
def monitor_url(monitored: Path) -> Iterator[str]:
    """`make monitor`'s script on the project, on a free port; the dashboard's URL it prints."""
    log_path = monitored / "monitor.log"
    with log_path.open("w") as log:
        server = subprocess.Popen([str(BIN / "python"), "-m", "pipelines.monitor_ui", "--root", str(monitored),
                                   "--port", str(free_port())], stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, env={**os.environ, "EVIDENTLY_DISABLE_TELEMETRY": "1"})
        try:
            wait_until(lambda: BANNER.search(log_path.read_text()) is not None, server,
                       f"Evidently UI (log: {log_path})", timeout=180)
            match = BANNER.search(log_path.read_text())
            assert match is not None
            yield match[1]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)


def _panel(page: Page, title: str) -> Locator:
    """The card of the panel titled `title`: the nearest block around its heading that holds a chart."""
    return page.locator(f"xpath=//h5[normalize-space()=\"{title}\"]/ancestor::div[.//*[local-name()='svg']][1]")


def _points_per_panel(page: Page, url: str, wanted: dict[str, int], deadline: float) -> dict[str, int]:
    """Points drawn in each wanted panel, once every panel has its wanted number or the deadline passes. A loaded
    machine may time out a page load or leave a chart mid-animation: each try's failure only means try again."""
    counts: dict[str, int] = {}
    while True:
        try:
            if not counts:
                page.goto(url, timeout=60_000)
            for title in wanted:
                _panel(page, title).locator("svg").first.wait_for(timeout=15_000)
            counts = {title: _panel(page, title).locator(POINTS).count() for title in wanted}
            if all(counts[t] >= n for t, n in wanted.items()):
                return counts
        except PlaywrightError:  # a timeout, or the page navigating away: try again
            counts = {}
        if time.monotonic() > deadline:
            return counts
        time.sleep(2)


def test_the_dashboard_shows_every_panel_with_a_point_per_day(monitored: Path, monitor_url: str,
                                                              tmp_path: Path) -> None:
    history = json.loads((monitored / "reports" / "monitoring_history.json").read_text())
    assert len(history) == DAYS + 1 and history[0]["champion"] is None
    champion = history[-1]["champion"]
    assert champion is not None and all(h["champion"] == champion for h in history[1:])
    assert monitor_url.endswith(f"/projects/{PROJECT_ID}")
    stored = [json.loads(f.read_text()) for f in (monitored / "reports" / "workspace" / str(PROJECT_ID) / "snapshots")
              .glob("*.json")]
    days = sorted((s["timestamp"][:10], s["metadata"]["kind"], s["metadata"]["champion"]) for s in stored)
    assert len(days) == 4 * (DAYS + 1)  # data drift, prediction drift, performance and values, each day
    assert {(d, c) for d, _, c in days} == {(h["current"].removeprefix("batch "), h["champion"] or "none")
                                             for h in history}
    metric = yaml.safe_load((monitored / "params.yaml").read_text())["promote"]["metric"]
    # each series has a value on every day (labels arrive with each simulator batch)
    wanted = {p.title: len(p.series) * (DAYS + 1) for p in panels(metric)}

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, tmp_path / "browser-home")
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            counts = _points_per_panel(page, monitor_url, wanted, time.monotonic() + 240)
            assert all(counts.get(t, 0) >= n for t, n in wanted.items()), f"points per panel {counts}, wanted {wanted}"
            for panel in panels(metric):  # each series is named in its panel's legend
                card = _panel(page, panel.title)
                for _, legend in panel.series:
                    assert card.get_by_text(legend, exact=True).count() >= 1, (panel.title, legend)
            page.wait_for_timeout(1500)  # the charts' drawing animation ends
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=SCREENSHOT, full_page=True)
        except BaseException:  # pytest's failures are BaseExceptions
            with contextlib.suppress(Exception):  # keep the original error if the page is gone too
                page.screenshot(path=tmp_path / "failure.png", full_page=True)
            raise
        finally:
            browser.close()
