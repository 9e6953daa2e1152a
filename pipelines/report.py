"""report: Evidently data-drift report of the newest batch against the training data."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import pandas as pd

from pipelines.alerts import alert
from pipelines.config import Paths, Settings
from pipelines.io import atomic_path, write_json

log = logging.getLogger(__name__)
METRIC_KEYS = ("current_batch", "drift_share", "n_drifted", "n_columns", "retrain_needed")
_VALUE_DRIFT = re.compile(r"ValueDrift\(column=(?P<column>[^,]+),method=(?P<method>[^,]+),threshold=(?P<thr>[^)]+)\)")


def drift_summary(snapshot: dict[str, Any], share_threshold: float) -> dict[str, Any]:
    """Per-column drift scores from an Evidently snapshot dict, and whether retraining is needed."""
    columns: dict[str, dict[str, Any]] = {}
    for metric in snapshot["metrics"]:
        match = _VALUE_DRIFT.match(metric["metric_name"])
        if match:
            score, threshold = float(metric["value"]), float(match["thr"])
            columns[match["column"]] = {"method": match["method"], "score": round(score, 6),
                                        "threshold": threshold, "drifted": score >= threshold}
    drifted = sorted(c for c, r in columns.items() if r["drifted"])
    share = len(drifted) / len(columns) if columns else 0.0
    return {
        "drift_share": round(share, 6),
        "drifted_columns": drifted,
        "n_drifted": len(drifted),
        "n_columns": len(columns),
        "retrain_needed": share >= share_threshold,
        "columns": columns,
    }


def run(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Compare the newest validated batch with the champion's training rows; HTML + JSON out."""
    os.environ.setdefault("EVIDENTLY_DISABLE_TELEMETRY", "1")
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    schema = settings.data_schema
    features = schema.feature_columns
    reference = pd.read_parquet(paths.reference / "train.parquet", columns=features)
    validated = pd.read_parquet(paths.validated / "data.parquet", columns=[*features, "batch"])
    newest = str(validated["batch"].max())
    current = validated.loc[validated["batch"] == newest, features]

    definition = DataDefinition(numerical_columns=list(schema.numeric), categorical_columns=list(schema.categorical))
    snapshot = Report([DataDriftPreset()]).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )
    with atomic_path(paths.reports / "drift.html") as tmp:
        snapshot.save_html(str(tmp))
    summary = {"current_batch": newest, "current_rows": len(current), "reference_rows": len(reference),
               **drift_summary(snapshot.dict(), settings.report.drift_share_threshold)}
    write_json(paths.reports / "drift_details.json", summary)
    write_json(paths.reports / "drift.json", {k: summary[k] for k in METRIC_KEYS})
    log.info("drift: %d/%d columns drifted in batch %s (retrain_needed=%s)", summary["n_drifted"],
             summary["n_columns"], newest, summary["retrain_needed"])
    if summary["retrain_needed"]:
        alert(settings, paths, "drift", f"{summary['n_drifted']} of {summary['n_columns']} columns drifted in "
              f"batch {newest} (threshold {settings.report.drift_share_threshold:.0%})",
              {k: summary[k] for k in (*METRIC_KEYS, "drifted_columns")})
    return {**{k: summary[k] for k in METRIC_KEYS}, "drifted_columns": summary["drifted_columns"]}
