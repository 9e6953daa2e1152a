"""report: monitoring with Evidently. Has the world moved away from the champion, and does it still do well?

Reference = the champion's own training rows and its held-out test predictions, kept with it in the
registry (before there is a champion: this run's training rows and the challenger). Current = the newest
validated batch scored by that model (`report.current: batch`), or the served predictions of the newest
`report.window_hours` from the prediction log (`prediction_log`). Labels join the current rows by id as
they arrive in collected data. Three checks decide "retrain needed", each with its reason:
data drift (share of drifted feature columns), prediction drift (distance of the predicted probabilities)
and performance decay (promote.metric on labelled rows under the champion's test value by more than
the allowed drop, significant by a bootstrap over those rows).
HTML for people (reports/drift.html, prediction_drift.html, performance.html), JSON for machines.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.alerts import alert
from pipelines.bundle import METADATA_FILE, ModelBundle
from pipelines.config import Paths, SchemaConfig, Settings
from pipelines.io import atomic_path, read_json, write_json
from pipelines.registry import MONITORING_DIR, SAMPLE_FILE, TEST_PREDICTIONS_FILE, Registry
from pipelines.serving import read_prediction_log

log = logging.getLogger(__name__)
PREDICTION = "prediction"
METRIC_KEYS = ("current", "current_rows", "drift_share", "n_drifted", "n_columns", "prediction_drift",
               "labeled_rows", "metric_current", "metric_reference", "decay_p_value", "retrain_needed")
_VALUE_DRIFT = re.compile(r"ValueDrift\(column=(?P<column>[^,]+),method=(?P<method>[^,]+),threshold=(?P<thr>[^)]+)\)")


class MonitoringError(RuntimeError):
    """There is nothing to monitor yet (no batch, no predictions in the window)."""


def drift_summary(snapshot: dict[str, Any], share_threshold: float) -> dict[str, Any]:
    """Per-column drift scores from an Evidently snapshot dict, and whether the share passes the threshold."""
    columns: dict[str, dict[str, Any]] = {}
    for metric in snapshot["metrics"]:
        match = _VALUE_DRIFT.match(metric["metric_name"])
        if match:
            score, threshold = float(metric["value"]), float(match["thr"])
            columns[match["column"]] = {"method": match["method"], "score": round(score, 6),
                                        "threshold": threshold, "drifted": score >= threshold}
    drifted = sorted(c for c, r in columns.items() if r["drifted"])
    share = len(drifted) / len(columns) if columns else 0.0
    return {"drift_share": round(share, 6), "drifted_columns": drifted, "n_drifted": len(drifted),
            "n_columns": len(columns), "data_drift": share >= share_threshold, "columns": columns}


def run(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Compare the current window with the champion's reference; write the reports and the decision."""
    os.environ.setdefault("EVIDENTLY_DISABLE_TELEMETRY", "1")
    cfg, schema = settings.report, settings.data_schema
    reference = load_reference(settings, paths)
    current, described = current_rows(settings, paths, reference["model"])
    labeled = join_labels(current, paths, schema)

    summary: dict[str, Any] = {"current": described, "current_rows": len(current),
                               "reference": reference["name"], "reference_rows": len(reference["rows"])}
    snapshot = data_drift_report(settings, current, reference["rows"], paths.reports / "drift.html")
    summary |= drift_summary(snapshot, cfg.drift_share_threshold)
    summary |= prediction_drift_report(settings, current, reference["predictions"], paths)
    summary |= {"decay_p_value": None} | performance_report(settings, labeled, reference, paths)
    reasons = decide(settings, summary)
    summary |= {"retrain_needed": bool(reasons), "reasons": reasons}

    write_json(paths.reports / "drift_details.json", summary)
    write_json(paths.reports / "drift.json", {**{k: summary[k] for k in METRIC_KEYS},
                                              "columns": {c: r["score"] for c, r in summary["columns"].items()}})
    _record(paths, {k: summary[k] for k in (*METRIC_KEYS, "reference", "reasons", "drifted_columns")})
    log.info("monitoring %s against %s: retrain_needed=%s %s", described, reference["name"],
             summary["retrain_needed"], "; ".join(reasons))
    if reasons:
        alert(settings, paths, "drift", f"retraining needed for {described}: " + "; ".join(reasons),
              {k: summary[k] for k in (*METRIC_KEYS, "drifted_columns", "reasons")})
    return {**{k: summary[k] for k in METRIC_KEYS}, "drifted_columns": summary["drifted_columns"],
            "reasons": reasons}


def decide(settings: Settings, summary: dict[str, Any]) -> list[str]:
    """The reasons to retrain, in words (none: the champion is fine)."""
    cfg, metric = settings.report, settings.promote.metric
    reasons = []
    if summary["data_drift"]:
        reasons.append(f"data drift: {summary['n_drifted']} of {summary['n_columns']} feature columns drifted "
                       f"(share {summary['drift_share']:.2f} >= {cfg.drift_share_threshold}): "
                       + ", ".join(summary["drifted_columns"]))
    if summary["prediction_drift"] is not None and summary["prediction_drift"] >= cfg.prediction_drift_threshold:
        reasons.append(f"prediction drift: distance {summary['prediction_drift']:.3f} of the predicted "
                       f"probabilities >= {cfg.prediction_drift_threshold}")
    now, before, p = summary["metric_current"], summary["metric_reference"], summary.get("decay_p_value")
    if p is not None and p <= cfg.max_p_value:  # p is there only when `now` is under the allowed drop
        reasons.append(f"performance decay: {metric} {now:.4f} on {summary['labeled_rows']} labelled rows, "
                       f"{before - now:.4f} under the champion's test {before:.4f} "
                       f"(allowed drop {cfg.max_metric_drop}, bootstrap p={p:.3f} <= {cfg.max_p_value})")
    return reasons


def load_reference(settings: Settings, paths: Paths) -> dict[str, Any]:
    """The model to watch with its training-row sample, test predictions and test metric."""
    registry = Registry(paths.registry)
    champion = registry.champion
    if champion is not None:
        folder = registry.version_dir(champion)
        monitoring = folder / MONITORING_DIR
        if (monitoring / SAMPLE_FILE).is_file():
            return {"name": f"champion {champion}", "model": ModelBundle.load(folder),
                    "rows": pd.read_parquet(monitoring / SAMPLE_FILE),
                    "predictions": pd.read_parquet(monitoring / TEST_PREDICTIONS_FILE),
                    "metric": read_json(folder / METADATA_FILE).get("metrics", {}).get(settings.promote.metric)}
        log.warning("champion %s was registered without its monitoring reference: using this run's training "
                    "rows instead", champion)
        model: ModelBundle | None = ModelBundle.load(folder)
        name = f"champion {champion} (training rows of this run)"
    else:  # the first run: nothing is in production yet, the challenger is what would be
        model = ModelBundle.load(paths.challenger) if (paths.challenger / METADATA_FILE).is_file() else None
        name = "training rows of this run" + (f", challenger {model.version}" if model else "")
    sample = paths.reference / SAMPLE_FILE
    if not sample.is_file() and not (paths.reference / "train.parquet").is_file():
        raise MonitoringError("nothing to compare with: no champion and no training rows yet; run the training "
                              "pipeline first (`amaas run`, `dvc repro` or the training_pipeline DAG)")
    metrics = paths.reports / "metrics.json"
    predictions = paths.reports / "test_predictions.parquet"
    return {"name": name, "model": model,
            "rows": pd.read_parquet(sample if sample.is_file() else paths.reference / "train.parquet"),
            "predictions": pd.read_parquet(predictions) if model and predictions.is_file() else None,
            "metric": read_json(metrics).get(settings.promote.metric) if model and metrics.is_file() else None}


def current_rows(settings: Settings, paths: Paths, model: ModelBundle | None) -> tuple[pd.DataFrame, str]:
    """The rows to judge, with the model's prediction for each, and a description of the window."""
    schema = settings.data_schema
    if settings.report.current == "prediction_log":
        return _logged_window(paths, schema, settings.report.window_hours)
    validated = pd.read_parquet(paths.validated / "data.parquet")
    if validated.empty:
        raise MonitoringError(f"{paths.validated / 'data.parquet'} has no rows: collect a batch first")
    newest = str(validated["batch"].max())
    rows = validated.loc[validated["batch"] == newest].drop(columns=[schema.target]).reset_index(drop=True)
    if model is not None:
        rows[PREDICTION] = model.predict_proba(rows)
    return rows, f"batch {newest}"


def _logged_window(paths: Paths, schema: SchemaConfig, hours: float) -> tuple[pd.DataFrame, str]:
    records = read_prediction_log(paths.prediction_log)
    if not records:
        raise MonitoringError(f"no predictions in {paths.prediction_log}: serve the model (`amaas serve`) first, "
                              f"or set report.current: batch")
    log_frame = pd.DataFrame.from_records(
        [{schema.id_column: r.get("id"), "time": r["time"], PREDICTION: r["probability"], **r["features"]}
         for r in records])
    times = pd.to_datetime(log_frame["time"], utc=True)
    start = times.max() - pd.Timedelta(hours=hours)  # the newest window of the log, not of the wall clock
    window = log_frame.loc[(times > start).to_numpy()].drop(columns=["time"]).reset_index(drop=True)
    return window, f"predictions after {start.isoformat(timespec='seconds')}"


def join_labels(current: pd.DataFrame, paths: Paths, schema: SchemaConfig) -> pd.DataFrame:
    """Current rows whose label has arrived in the collected data (joined by id), with the label."""
    if PREDICTION not in current or schema.id_column not in current:
        return current.head(0)
    labels = pd.read_parquet(paths.validated / "data.parquet", columns=[schema.id_column, schema.target])
    labels = labels.drop_duplicates(schema.id_column)
    keyed = current.dropna(subset=[schema.id_column]).astype({schema.id_column: labels[schema.id_column].dtype})
    return keyed.merge(labels, on=schema.id_column, how="inner")


def data_drift_report(settings: Settings, current: pd.DataFrame, reference: pd.DataFrame, html: Path
                      ) -> dict[str, Any]:
    """Data drift of the feature columns; the HTML report is written, the snapshot dict returned."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    schema = settings.data_schema
    definition = DataDefinition(numerical_columns=list(schema.numeric), categorical_columns=list(schema.categorical))
    features = schema.feature_columns
    snapshot = Report([DataDriftPreset(columns=features)]).run(
        Dataset.from_pandas(current[features], data_definition=definition),
        Dataset.from_pandas(reference[features], data_definition=definition))
    _save_html(snapshot, html)
    return snapshot.dict()


def prediction_drift_report(settings: Settings, current: pd.DataFrame, reference: pd.DataFrame | None,
                            paths: Paths) -> dict[str, Any]:
    if reference is None or PREDICTION not in current:
        (paths.reports / "prediction_drift.html").unlink(missing_ok=True)  # no stale report of another window
        return {"prediction_drift": None}
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    definition = DataDefinition(numerical_columns=[PREDICTION])
    snapshot = Report([ValueDrift(column=PREDICTION, method="wasserstein",
                                  threshold=settings.report.prediction_drift_threshold)]).run(
        Dataset.from_pandas(current[[PREDICTION]], data_definition=definition),
        Dataset.from_pandas(reference[[PREDICTION]], data_definition=definition))
    _save_html(snapshot, paths.reports / "prediction_drift.html")
    return {"prediction_drift": round(float(snapshot.dict()["metrics"][0]["value"]), 6),
            "prediction_mean": round(float(current[PREDICTION].mean()), 6),
            "prediction_mean_reference": round(float(reference[PREDICTION].mean()), 6)}


def performance_report(settings: Settings, labeled: pd.DataFrame, reference: dict[str, Any], paths: Paths
                       ) -> dict[str, Any]:
    """promote.metric on the labelled current rows, against the model's own test value."""
    from pipelines.promote import METRICS

    target = settings.data_schema.target
    out = {"labeled_rows": len(labeled), "metric": settings.promote.metric, "metric_current": None,
           "metric_reference": reference["metric"]}
    (paths.reports / "performance.html").unlink(missing_ok=True)  # no stale report of another window
    if len(labeled) < settings.report.min_labeled_rows or labeled[target].nunique() < 2:
        return out
    y, proba = labeled[target].to_numpy().astype(int), labeled[PREDICTION].to_numpy()
    out["metric_current"] = round(float(METRICS[settings.promote.metric](y, proba)), 6)
    allowed = None if reference["metric"] is None else reference["metric"] - settings.report.max_metric_drop
    if allowed is not None and out["metric_current"] < allowed:
        out["decay_p_value"] = decay_p_value(y, proba, allowed, settings.promote.metric,
                                             settings.promote.bootstrap_samples, settings.seed)
    if reference["predictions"] is not None:
        _classification_html(labeled[[target, PREDICTION]],
                             reference["predictions"].rename(columns={"actual": target})[[target, PREDICTION]],
                             target, paths.reports / "performance.html")
    return out


def decay_p_value(y: np.ndarray, proba: np.ndarray, bound: float, metric: str, samples: int, seed: int,
                  max_rows: int = 50_000) -> float:
    """Share of bootstrap resamples whose metric still reaches `bound`: small means it really fell under it."""
    from pipelines.promote import METRICS, bootstrap_resamples

    rng = np.random.default_rng(seed)
    if len(y) > max_rows:  # the metric's error is tiny by then; resampling fewer rows only widens it (cautious)
        keep = rng.choice(len(y), max_rows, replace=False)
        y, proba = y[keep], proba[keep]
    score = METRICS[metric]
    values = np.asarray([score(y[idx], proba[idx]) for idx in bootstrap_resamples(y, samples, rng)])
    return round(float(np.mean(values >= bound)), 6)


def _classification_html(current: pd.DataFrame, reference: pd.DataFrame, target: str, html: Path) -> None:
    from evidently import BinaryClassification, DataDefinition, Dataset, Report
    from evidently.presets import ClassificationPreset

    definition = DataDefinition(numerical_columns=[PREDICTION], classification=[
        BinaryClassification(target=target, prediction_probas=PREDICTION)])
    snapshot = Report([ClassificationPreset()]).run(
        Dataset.from_pandas(current.astype({target: np.int64}), data_definition=definition),
        Dataset.from_pandas(reference.astype({target: np.int64}), data_definition=definition))
    _save_html(snapshot, html)


def _save_html(snapshot: Any, html: Path) -> None:
    with atomic_path(html) as tmp:
        snapshot.save_html(str(tmp))


def _record(paths: Paths, decision: dict[str, Any]) -> None:
    """Append the decision and its reasons to reports/monitoring_history.json (the audit trail)."""
    history_file = paths.reports / "monitoring_history.json"
    history = read_json(history_file) if history_file.is_file() else []
    write_json(history_file, [*history, decision])
