"""The Evidently workspace: created once with its dashboard, snapshots tagged and stamped per batch, reruns
replace a day's snapshots, damage repaired or named."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from pathlib import Path

import pandas as pd
import pytest
from evidently.ui.workspace import Workspace

from pipelines import workspace as ws
from pipelines.config import Paths
from pipelines.stages import report
from tests.unit.test_report_monitoring import _project, stub

METRIC = "roc_auc"
DAY = dt.datetime(2026, 1, 3)


def _project_dir(folder: Path) -> Path:
    return folder / str(ws.PROJECT_ID)


def _snapshots(folder: Path) -> dict[str, dict]:
    """Every snapshot file of the project, parsed, by kind."""
    files = sorted((_project_dir(folder) / ws.SNAPSHOTS_DIR).glob("*.json"))
    parsed = [json.loads(f.read_text()) for f in files]
    return {s["metadata"]["kind"]: s for s in parsed}


def _values(snapshot: dict) -> dict[str, float]:
    """The values snapshot's numbers, by column, as the UI's series read them (metric type + column label)."""
    out = {}
    for result in snapshot["metric_results"].values():
        params = result["metric_value_location"]["metric"]["params"]
        assert params["type"] == "evidently:metric_v2:MeanValue"
        out[params["column"]] = result["value"]
    return out


def _evidently(folder: Path) -> Workspace:
    """The workspace as Evidently's own code reads it (`evidently ui` loads it the same way)."""
    return Workspace(str(folder))


def test_the_layout_is_evidentlys():
    from evidently.ui.storage.local import base

    assert (ws.METADATA_FILE, ws.DASHBOARD_FILE, ws.SNAPSHOTS_DIR) == (
        base.PROJECT_FILE_NAME, base.DASHBOARD_FILE_NAME, base.SNAPSHOTS_DIR_NAME)


def test_the_project_and_its_dashboard_are_created_once(tmp_path):
    folder = tmp_path / "workspace"
    ws.open_project(folder, METRIC)
    workspace = _evidently(folder)
    project = workspace.get_project(ws.PROJECT_ID)
    assert project is not None and project.name == ws.PROJECT_NAME
    board = workspace.get_dashboard(ws.PROJECT_ID)
    titles = [p.title for p in board.panels]
    assert titles == [p.title for p in ws.panels(METRIC)] and len(titles) == 6
    assert "roc_auc on labelled rows vs the champion's test value" in titles
    assert [t.panels for t in board.tabs] == [[p.id for p in board.panels]]
    files = {f: f.read_bytes() for f in _project_dir(folder).glob("*.json")}
    stamps = {f: f.stat().st_mtime_ns for f in files}

    ws.open_project(folder, METRIC)  # a second report run: nothing rewritten, nothing added
    again = _evidently(folder)
    assert len(again.get_dashboard(ws.PROJECT_ID).panels) == 6
    assert len(again.list_projects()) == 1
    assert {f: f.read_bytes() for f in files} == files
    assert {f: f.stat().st_mtime_ns for f in files} == stamps

    ws.open_project(folder, "log_loss")  # promote.metric changed: that panel follows it, still five
    titles = [p.title for p in _evidently(folder).get_dashboard(ws.PROJECT_ID).panels]
    assert len(titles) == 6 and "log_loss on labelled rows vs the champion's test value" in titles


def test_damaged_project_files_are_rewritten_from_code(tmp_path, caplog):
    folder = tmp_path / "workspace"
    ws.open_project(folder, METRIC)
    metadata, dashboard = _project_dir(folder) / ws.METADATA_FILE, _project_dir(folder) / ws.DASHBOARD_FILE
    expected = (metadata.read_text(), dashboard.read_text())
    metadata.write_text('{"id": "01a2')  # truncated mid-write
    dashboard.write_text("")
    with caplog.at_level(logging.WARNING, logger="pipelines.workspace"):
        ws.open_project(folder, METRIC)
    assert "damaged: rewritten from the definition in code" in caplog.text
    assert (metadata.read_text(), dashboard.read_text()) == expected
    assert len(_evidently(folder).get_dashboard(ws.PROJECT_ID).panels) == 6


def test_a_file_in_place_of_the_workspace_is_a_clear_error(tmp_path):
    folder = tmp_path / "workspace"
    folder.write_text("not a folder")
    with pytest.raises(ws.WorkspaceError, match="is not a folder.*Move that file away"):
        ws.open_project(folder, METRIC)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_workspace_that_cannot_be_written_is_a_clear_error(tmp_path):
    folder = tmp_path / "workspace"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ws.WorkspaceError, match="write permission"):
            ws.open_project(folder, METRIC)
    finally:
        folder.chmod(0o700)


def test_window_time_is_the_batch_day_or_the_window_end():
    assert ws.window_time("batch 2026-01-03", 24) == DAY
    assert ws.window_time("batch 2026-01-03.2", 24) == DAY
    assert ws.window_time("predictions after 2026-01-02T06:00:00+00:00", 24) == dt.datetime(2026, 1, 3, 6)
    assert ws.window_time("batch 000004", 24) is None


def test_snapshots_are_tagged_stamped_and_replaced_on_a_rerun(tmp_path):
    folder = tmp_path / "workspace"
    values = {"drift_share": 0.25, "drift_share_threshold": 0.5, "prediction_drift": None, "rows": 1000.0,
              "quarantined_rows": 7.0, "champion_changed": 1.0}
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0] * 10})
    definition = DataDefinition(numerical_columns=["x"])
    snapshot = Report([DataDriftPreset()]).run(Dataset.from_pandas(frame, data_definition=definition),
                                               Dataset.from_pandas(frame, data_definition=definition))
    written = ws.add_run(folder, METRIC, "batch 2026-01-03", DAY, "vabc", values, {"data_drift": snapshot})
    assert set(written) == {"data_drift", "values"}
    stored = _snapshots(folder)
    assert set(stored) == {"data_drift", "values"}
    for kind, item in stored.items():
        assert {"amaas", "champion:vabc", "batch:2026-01-03", kind} <= set(item["tags"])
        assert item["metadata"] == {"champion": "vabc", "window": "batch 2026-01-03", "kind": kind}
        assert dt.datetime.fromisoformat(item["timestamp"]) == DAY
    assert ws.VALUES_TAG in stored["values"]["tags"] and ws.VALUES_TAG not in stored["data_drift"]["tags"]
    # None: no point that day, the rest exactly as given
    assert _values(stored["values"]) == {"drift_share": 0.25, "drift_share_threshold": 0.5, "rows": 1000.0,
                                         "quarantined_rows": 7.0, "champion_changed": 1.0}
    # Evidently's own workspace reads what was written (the UI loads it the same way)
    workspace = _evidently(folder)
    assert sorted(str(i) for i in workspace.list_runs(ws.PROJECT_ID)) == sorted(written.values())
    assert workspace.get_run(ws.PROJECT_ID, written["values"]).tags == stored["values"]["tags"]

    # the same batch again (a rerun): its snapshots are replaced, a kind it no longer makes is dropped
    ws.add_run(folder, METRIC, "batch 2026-01-03", DAY, "vdef", {**values, "rows": 990.0}, {})
    stored = _snapshots(folder)
    assert set(stored) == {"values"} and _values(stored["values"])["rows"] == 990.0
    assert "champion:vdef" in stored["values"]["tags"]
    # the next day adds its own
    ws.add_run(folder, METRIC, "batch 2026-01-04", DAY + dt.timedelta(days=1), "vdef", values, {})
    assert len(list((_project_dir(folder) / ws.SNAPSHOTS_DIR).glob("*.json"))) == 2
    with pytest.raises(ValueError, match="unknown snapshot kind"):
        ws.add_run(folder, METRIC, "batch 2026-01-05", DAY, None, values, {"ab_test": snapshot})


def test_damaged_snapshots_are_set_aside_so_the_ui_can_start(tmp_path):
    folder = tmp_path / "workspace"
    ws.add_run(folder, METRIC, "batch 2026-01-03", DAY, "vabc", {"rows": 10.0}, {})
    good = next((_project_dir(folder) / ws.SNAPSHOTS_DIR).glob("*.json"))
    bad = good.with_name(f"{ws.snapshot_id('batch 2026-01-04', 'values')}.json")
    bad.write_text(good.read_text()[:500])  # a copy cut short
    assert ws.set_aside_damaged(folder) == [folder / ws.DAMAGED_DIR / bad.name]
    assert good.is_file() and not bad.exists()
    assert ws.set_aside_damaged(folder) == []


def test_a_report_run_adds_its_snapshots_with_the_plotted_values(tmp_path, monkeypatch):
    settings, paths = _project(tmp_path, "binary", stub("binary"), monkeypatch)
    reference = report.load_reference(settings, paths) | {"champion": "v1"}
    monkeypatch.setattr(report, "load_reference", lambda s, p: reference)
    paths.quarantine.mkdir(parents=True)
    pd.DataFrame({"batch": ["2026-01-02"] * 4 + ["2026-01-01"]}).to_parquet(paths.quarantined_rows)
    into_workspace, calls = report._to_workspace, []
    monkeypatch.setattr(report, "_to_workspace", lambda *args: calls.append(args) or into_workspace(*args))
    result = report.run(settings, paths)
    stored = _snapshots(paths.workspace)
    assert set(stored) == {"data_drift", "prediction_drift", "performance", "values"}
    assert all("champion:v1" in s["tags"] and "batch:2026-01-02" in s["tags"] for s in stored.values())
    values = _values(stored["values"])
    assert values["rows"] == 304 and values["quarantined_rows"] == 4  # 300 clean rows of that day, 4 quarantined
    assert values["drift_share"] == result["drift_share"] and values["prediction_drift"] == result["prediction_drift"]
    assert values["metric_current"] == result["metric_current"] and values["champion_changed"] == 1
    assert values["drift_share_threshold"] == settings.report.drift_share_threshold
    # the data drift snapshot is Evidently's own, with its drifted share
    types = {r["metric_value_location"]["metric"]["params"]["type"] for r in stored["data_drift"]["metric_results"]
             .values()}
    assert "evidently:metric_v2:DriftedColumnsCount" in types

    history = json.loads(paths.monitoring_history.read_text())
    assert [(h["current"], h["champion"]) for h in history] == [("batch 2026-01-02", "v1")]

    # the same batch again: its snapshots replaced; a change is judged against the batch before, never itself.
    # Once through the whole stage; the other histories through its last step alone, with this run's reports
    # (each run of the stage renders four Evidently reports, a second or more of them).
    for before, changed in (("v1", 0), ("v0", 1), (None, 1)):
        history = [{"current": "batch 2026-01-01", "champion": before},
                   {"current": "batch 2026-01-02", "champion": "v1"}]
        if before == "v1":
            paths.monitoring_history.write_text(json.dumps(history))
            report.run(settings, paths)
        else:
            *args, _ = calls[-1]
            report._to_workspace(*args, history)
        assert len(list((Paths(tmp_path).workspace / str(ws.PROJECT_ID) / ws.SNAPSHOTS_DIR).glob("*.json"))) == 4
        assert _values(_snapshots(paths.workspace)["values"])["champion_changed"] == changed, before


def test_a_workspace_write_that_fails_names_the_fix_after_the_verdict_is_written(tmp_path, monkeypatch):
    settings, paths = _project(tmp_path, "binary", stub("binary"), monkeypatch)

    def full_disk(path: Path, text: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ws, "write_text", full_disk)
    with pytest.raises(ws.WorkspaceError, match=r"No space left.*Free space.*reports/drift.json"):
        report.run(settings, paths)
    assert json.loads(paths.drift_report.read_text())["current"] == "batch 2026-01-02"  # the verdict stands
    assert len(json.loads(paths.monitoring_history.read_text())) == 1


def test_make_monitor_prepares_the_workspace_before_the_ui_reads_it(tmp_path):
    from pipelines import monitor_ui
    from tests.conftest import write_params

    write_params(tmp_path)
    folder = Paths(tmp_path).workspace
    bad = _project_dir(folder) / ws.SNAPSHOTS_DIR / f"{ws.snapshot_id('batch 2026-01-04', 'values')}.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"name": "values: batch 2026-01-04", "timestamp": ')
    assert monitor_ui.prepare(tmp_path, tmp_path / "params.yaml") == folder
    assert not bad.exists() and (folder / ws.DAMAGED_DIR / bad.name).is_file()
    assert len(_evidently(folder).get_dashboard(ws.PROJECT_ID).panels) == 6  # a project even before any report
