"""The project's Evidently workspace (reports/workspace): every `amaas report` run adds its snapshots to it,
and `make monitor` (`evidently ui`) shows them with a dashboard defined here.

One Evidently project, "amaas monitoring", with a fixed id. Each report run adds, for its batch or window:
the data drift, prediction drift and performance snapshots (the same Evidently reports as reports/*.html,
where they could be made) and a small "values" snapshot of what the dashboard plots (the numbers of
reports/drift.json, the batch's rows and quarantined rows, whether the champion changed). Every snapshot is
tagged with the champion version and the batch or window, and stamped with the batch's day (or the window's
end), so the panels plot one point per day. A snapshot's id follows from its batch/window and kind: a rerun
on the same batch replaces that day's snapshots instead of adding a second point.

Damage: the project's metadata and its dashboard are defined in code and rewritten whenever they differ or
cannot be read; snapshots are written atomically. A snapshot file that Evidently cannot read (edited by hand,
a disk fault) makes `evidently ui` answer every project page with an error 500: `set_aside_damaged` moves such
files to reports/workspace/damaged/ (`make monitor` runs it first). A workspace that cannot be written (a file
in its place, no permission, a full disk) raises WorkspaceError naming the fix.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.io import write_text

log = logging.getLogger(__name__)

PROJECT_NAME = "amaas monitoring"
PROJECT_DESCRIPTION = ("Snapshots of every `amaas report` run: data drift, prediction drift, performance and the "
                       "plotted values, tagged with the champion version and the batch or window")
NAMESPACE = uuid.UUID("9b0d3c1e-6a52-4f4e-9d2a-5c1f0e7a8b31")  # project, tab, panel and snapshot ids derive from it
PROJECT_ID = uuid.uuid5(NAMESPACE, "project")
TAB = "Monitoring"
KINDS = ("data_drift", "prediction_drift", "performance", "values")
VALUES_TAG = "amaas-values"  # the snapshots the panels read
DAMAGED_DIR = "damaged"
# Evidently's local workspace layout (evidently.ui.storage.local.base; a test checks they agree):
# <workspace>/<project id>/metadata.json, dashboard.json, snapshots/<snapshot id>.json
METADATA_FILE = "metadata.json"
DASHBOARD_FILE = "dashboard.json"
SNAPSHOTS_DIR = "snapshots"
_DAY = re.compile(r"^batch (\d{4}-\d{2}-\d{2})(?:\.\d+)?$")
_WINDOW = re.compile(r"^predictions after (\S+)$")


class WorkspaceError(RuntimeError):
    """The workspace cannot be written; the message names the path and the fix."""


@dataclass(frozen=True)
class Panel:
    """A dashboard panel: a title, how it plots, and the values (column of the values snapshot, legend) it plots."""

    title: str
    plot: str  # line | bar
    series: tuple[tuple[str, str], ...]
    description: str = ""


def panels(metric: str) -> tuple[Panel, ...]:
    """The dashboard's panels; `metric` is promote.metric."""
    return (
        Panel("Drifted share of feature columns per day", "line",
              (("drift_share", "drifted share"), ("drift_share_threshold", "threshold")),
              "Share of feature columns Evidently flags as drifted against the champion's reference "
              "(threshold: report.drift_share_threshold)"),
        Panel("Prediction drift per day", "line",
              (("prediction_drift", "distance"), ("prediction_drift_threshold", "threshold")),
              "Distance of the champion's predictions from its test predictions "
              "(threshold: report.prediction_drift_threshold)"),
        Panel(f"{metric} on labelled rows vs the champion's test value", "line",
              (("metric_current", f"{metric} on labelled rows"), ("metric_reference", f"champion's test {metric}")),
              "promote.metric on the current rows whose labels arrived, and the champion's on its test rows"),
        Panel("Attribution drift per day", "line",
              (("attribution_drift", "1 - NDCG of top columns"), ("attribution_drift_threshold", "threshold")),
              "How far the champion's ranking of columns by mean |contribution| moved from its reference "
              "(threshold: report.attribution_drift_threshold)"),
        Panel("Rows and quarantined rows per batch", "bar",
              (("rows", "rows"), ("quarantined_rows", "quarantined rows")),
              "Rows collected in the batch (clean + quarantined) and rows validate quarantined"),
        Panel("Champion changes", "bar", (("champion_changed", "new champion"),),
              "1 on the first day a new champion is watched (its version is in the snapshot's tags)"),
    )


def dashboard(metric: str) -> Any:
    """The dashboard as Evidently stores it, with ids that follow from the titles: the same code gives the
    same dashboard, so saving it again changes nothing."""
    from evidently.sdk.models import DashboardModel, DashboardTabModel, PanelMetric
    from evidently.sdk.panels import bar_plot_panel, line_plot_panel

    plots = []
    for panel in panels(metric):
        values = [PanelMetric(legend=legend, metric="MeanValue", metric_labels={"column": column}, tags=[VALUES_TAG])
                  for column, legend in panel.series]
        plot = (line_plot_panel(panel.title, values, panel.description, size="half") if panel.plot == "line"
                else bar_plot_panel(panel.title, values, panel.description, size="half"))
        plot.id = uuid.uuid5(NAMESPACE, f"panel:{panel.title}")
        plots.append(plot)
    tab = DashboardTabModel(id=uuid.uuid5(NAMESPACE, f"tab:{TAB}"), title=TAB, panels=[p.id for p in plots])
    return DashboardModel(tabs=[tab], panels=plots)


def open_project(folder: Path, metric: str) -> Path:
    """The project's folder in the workspace at `folder`, with the project and its dashboard as this code
    defines them (created, or rewritten where their files are missing, unreadable or out of date).

    The files are written as Evidently's local workspace writes them (same names, same JSON), atomically, and
    without `evidently.ui.workspace.Workspace`: that one parses every snapshot of every project when it opens,
    which grows with each day and stops at the first damaged file."""
    from evidently.sdk.models import ProjectModel

    _writable(folder)
    project_dir = folder / str(PROJECT_ID)
    wanted = ProjectModel(id=PROJECT_ID, name=PROJECT_NAME, description=PROJECT_DESCRIPTION)
    for file, model, what, indent in ((project_dir / METADATA_FILE, wanted, "project", 2),
                                      (project_dir / DASHBOARD_FILE, dashboard(metric), "dashboard", None)):
        text = _evidently_json(model, indent)
        if _json(file, what) != json.loads(text):
            _guarded(folder, lambda file=file, text=text: write_text(file, text))
    return project_dir


def window_time(described: str, window_hours: float) -> dt.datetime | None:
    """When a batch or window happened, from the report's description of it: a day batch (`batch 2026-01-03`,
    or `.2` for a second batch of that day) is its day, a prediction window its end; None where it says no time
    (a batch of a files source without a time column)."""
    if day := _DAY.match(described):
        return dt.datetime.fromisoformat(day[1])
    if window := _WINDOW.match(described):
        start = dt.datetime.fromisoformat(window[1])
        end = start + dt.timedelta(hours=window_hours)
        return end.astimezone(dt.UTC).replace(tzinfo=None) if end.tzinfo else end
    return None


def snapshot_id(window: str, kind: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"snapshot:{window}:{kind}")


def champion_tag(champion: str | None) -> str:
    return f"champion:{champion or 'none'}"


def add_run(folder: Path, metric: str, window: str, when: dt.datetime, champion: str | None,
            values: Mapping[str, float | None], snapshots: Mapping[str, Any]) -> dict[str, str]:
    """Add one report run to the workspace: its Evidently snapshots (`snapshots`: kind -> Snapshot) and the
    values snapshot, all tagged with the champion and the batch/window and stamped `when`; a kind this run made
    no snapshot of drops that batch's older one. The ids written, by kind."""
    unknown = set(snapshots) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown snapshot kind(s) {sorted(unknown)}: one of {', '.join(KINDS)}")
    open_project(folder, metric)
    runs = {**snapshots, "values": values_snapshot(values)}
    tags = ["amaas", champion_tag(champion), _window_tag(window)]
    written: dict[str, str] = {}
    for kind in KINDS:
        target = _snapshot_file(folder, window, kind)
        if kind not in runs:
            _guarded(folder, lambda target=target: target.unlink(missing_ok=True))
            continue
        model = runs[kind].to_snapshot_model()
        model.name = f"{kind.replace('_', ' ')}: {window}"
        model.timestamp = when
        model.tags = [*tags, kind, *([VALUES_TAG] if kind == "values" else [])]
        model.metadata = {"champion": champion or "none", "window": window, "kind": kind}
        text = _evidently_json(model)
        _guarded(folder, lambda target=target, text=text: write_text(target, text))
        written[kind] = target.stem
    return written


def values_snapshot(values: Mapping[str, float | None]) -> Any:
    """An Evidently snapshot holding `values` (None: no point that day), one MeanValue metric per value of a
    one-row table: built-in metrics, so `evidently ui` reads it without this package."""
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MeanValue

    kept = {name: float(value) for name, value in values.items() if value is not None}
    frame = pd.DataFrame({name: [value] for name, value in kept.items()} or {"none": [0.0]})
    definition = DataDefinition(numerical_columns=list(frame.columns))
    return Report([MeanValue(column=c) for c in kept]).run(Dataset.from_pandas(frame, data_definition=definition))


def set_aside_damaged(folder: Path) -> list[Path]:
    """Move the project's snapshot files that do not parse to <workspace>/damaged/ (else `evidently ui` fails
    every project page); the files moved, at their new place."""
    from evidently.core.serialization import SnapshotModel

    snapshots = folder / str(PROJECT_ID) / SNAPSHOTS_DIR
    moved = []
    for file in sorted(snapshots.glob("*.json")) if snapshots.is_dir() else []:
        try:
            SnapshotModel.parse_obj(json.loads(file.read_text()))
        except Exception as exc:  # noqa: BLE001 - whatever Evidently cannot read must go
            target = folder / DAMAGED_DIR / file.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(file), target)
            log.warning("snapshot %s cannot be read (%s): moved to %s", file.name, str(exc).splitlines()[0][:200],
                        target)
            moved.append(target)
    return moved


def _evidently_json(model: Any, indent: int | None = None) -> str:
    """A project, dashboard or snapshot model as Evidently's local workspace stores it (indented: the project)."""
    from evidently.legacy.utils import NumpyEncoder

    return json.dumps(model.dict(), cls=NumpyEncoder, indent=indent)


def _snapshot_file(folder: Path, window: str, kind: str) -> Path:
    return folder / str(PROJECT_ID) / SNAPSHOTS_DIR / f"{snapshot_id(window, kind)}.json"


def _window_tag(window: str) -> str:
    return window.replace("batch ", "batch:", 1).replace("predictions after ", "window-end:", 1)


def _json(file: Path, what: str) -> Any:
    """The JSON in `file`, or None where it is missing or damaged (then rewritten from code, with a warning)."""
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except ValueError:
        log.warning("the Evidently %s file %s is damaged: rewritten from the definition in code", what, file)
        return None


def _writable(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise WorkspaceError(f"{folder} is not a folder: the Evidently workspace goes there. Move that file away; "
                             f"the next `amaas report` creates the workspace again")
    _guarded(folder, lambda: folder.mkdir(parents=True, exist_ok=True))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise WorkspaceError(f"cannot write the Evidently workspace {folder}: give this user write permission "
                             f"there, or move the folder away (the next `amaas report` starts a new one)")


def _guarded(folder: Path, write: Any) -> Any:
    try:
        return write()
    except OSError as exc:
        raise WorkspaceError(f"cannot write the Evidently workspace {folder}: {exc}. Free space or fix the "
                             f"permissions, or move the folder away (the next `amaas report` starts a new one); "
                             f"the verdict of this run is in reports/drift.json") from exc
