"""report: monitoring with Evidently. Has the world moved away from the champion, and does it still do well?

Reference = the champion's own training rows and its held-out test predictions, kept with it in the
registry (before there is a champion: this run's training rows and the challenger). Current = the newest
validated batch scored by that model (`report.current: batch`), or the served predictions of the newest
`report.window_hours` from the prediction log (`prediction_log`). Labels join the current rows by the
schema's key column as they arrive in validated data. Three checks decide "retrain needed", each with its
reason:
- data drift: the share of feature columns that Evidently flags as drifted (its own verdict per column:
  p-value tests on small references, distances on large ones);
- prediction drift: the distance of what the model predicts (normed Wasserstein of P(positive) or of the
  predicted values, Jensen-Shannon of the predicted class shares), flagged only when it passes
  `report.prediction_drift_threshold` and is significant against resamples of the reference of the same
  sizes (p <= `report.max_p_value`), so a small day is not drift by chance;
- performance decay: promote.metric on labelled rows worse than the champion's test value by more than
  the allowed drop, in the metric's own direction, significant by a bootstrap over those rows;
- attribution drift: the champion's ranking of the input columns by mean |contribution| (pipelines.explain) on
  the current rows against its reference rows, 1 - NDCG of its top ATTRIBUTION_TOP columns, past
  `report.attribution_drift_threshold` (at most `report.explain_rows` rows explained on each side). It sees
  what the model's use of its inputs does on the new rows (a column arriving constant or broken, a shift into a
  region the model reads differently); a change of the label alone, with the same inputs, is performance decay.
HTML for people (reports/drift.html, prediction_drift.html, performance.html; a short page saying why
where there is nothing to show), JSON for machines (no NaN: None plus a note saying why). With a canary
(serve.canary_share > 0) it also writes the A/B test of champion against challenger (reports/ab_test.json,
pipelines/abtest.py) and carries out serve.canary_policy.
"""

from __future__ import annotations

import functools
import html as html_text
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from pipelines import abtest
from pipelines.alerts import alert
from pipelines.bundle import METADATA_FILE, ModelBundle
from pipelines.config import Paths, SchemaConfig, Settings, experiment_name
from pipelines.contracts import Out, stage
from pipelines.explain import attribution_drift, importance
from pipelines.io import read_json, write_json, write_text
from pipelines.labels import (
    ACTUAL,
    KEY_NAME,
    PREDICTION,
    ROUTE,
    TIME,
    VERSION,
    join_labels,
    logged_frame,
    model_output,
    proba_columns,
)
from pipelines.metrics import Decision, bootstrap_resamples, higher_is_better, improvement, score
from pipelines.registry import MONITORING_DIR, Registry
from pipelines.state import Shared, shared
from pipelines.transform import normalize_category
from pipelines.workspace import add_run, window_time

log = logging.getLogger(__name__)
MISSING_CATEGORY = "<missing>"  # a missing category is a value of its own for drift (a surge of nulls is drift)
METRIC_KEYS = ("current", "current_rows", "drift_share", "n_drifted", "n_columns", "prediction_drift",
               "prediction_drift_p_value", "prediction_drift_detected", "labeled_rows", "metric_current",
               "metric_reference", "decay_p_value", "attribution_drift", "attribution_drift_detected",
               "retrain_needed")
# Evidently's drift methods whose score is a p-value (drift: a small score); the others are distances
# (drift: a large score). Used only where a snapshot carries no test verdict of Evidently's own.
TWO_SAMPLE_CHI2 = "chisquare_two_sample"  # the name a column's drift method has in a snapshot
SMALL_SAMPLE_ROWS = 1000  # fewer rows on either side: p-value tests that account for both samples' size
P_VALUE_METHODS = frozenset({"K-S p_value", "ks", "chi-square p_value", TWO_SAMPLE_CHI2, "Z-test p_value",
                             "Anderson-Darling", "Cramer-von Mises", "Epps-Singleton", "Fisher's Exact test", "g_test",
                             "Mann-Whitney U-rank test", "empirical_mmd", "Total-Variation-Distance", "t_test"})
MAX_DRIFT_ROWS = 20_000  # prediction drift: larger samples are subsampled (the distance is exact enough by then)
ATTRIBUTION_TOP = 10  # attribution drift: the NDCG of this many top columns


class MonitoringError(RuntimeError):
    """There is nothing to monitor yet (no batch, no predictions in the window)."""


def drift_summary(snapshot: dict[str, Any], share_threshold: float) -> dict[str, Any]:
    """Per-column drift from an Evidently snapshot dict, and whether the drifted share passes the threshold.

    A column is drifted when Evidently's own test for it failed (the snapshot's tests, `include_tests=True`);
    without that verdict, by the direction of its method: a p-value under the threshold, a distance at or
    over it.
    """
    verdicts = {t["metric_config"]["metric_id"]: t["status"] for t in snapshot.get("tests", [])
                if t.get("metric_config", {}).get("params", {}).get("type") == "evidently:metric_v2:ValueDrift"}
    columns: dict[str, dict[str, Any]] = {}
    for metric in snapshot["metrics"]:
        config = metric.get("config", {})
        if config.get("type") != "evidently:metric_v2:ValueDrift":
            continue
        method, threshold, value = str(config["method"]), float(config["threshold"]), _finite(metric["value"])
        p_value = method in P_VALUE_METHODS
        status = verdicts.get(metric.get("id"))
        entry: dict[str, Any] = {"method": method, "score": None if value is None else round(value, 6),
                                 "threshold": threshold, "p_value_test": p_value}
        if value is None:
            entry |= {"drifted": False, "verdict_by": "none",
                      "note": "Evidently gave no score for this column (too few values?)"}
        elif status in ("FAIL", "SUCCESS"):
            entry |= {"drifted": status == "FAIL", "verdict_by": "evidently"}
        else:
            entry |= {"drifted": value <= threshold if p_value else value >= threshold, "verdict_by": "direction"}
        columns[str(config["column"])] = entry
    drifted = sorted(c for c, r in columns.items() if r["drifted"])
    share = len(drifted) / len(columns) if columns else 0.0
    return {"drift_share": round(share, 6), "drifted_columns": drifted, "n_drifted": len(drifted),
            "n_columns": len(columns), "data_drift": share >= share_threshold, "columns": columns}


@stage(
    params=("seed", "schema", "clean.normalize_categories", "report", "promote.metric", "promote.bootstrap_samples",
            "promote.max_p_value", "serve.canary_share", "serve.shadow", "serve.canary_policy", "serve.ab_test"),
    runtime=("alerts", "state"),
    # it reads the champion's reference from models/registry too (not a dep: promote, later, writes it)
    deps=("reference", "validated", "quarantine", "challenger", "test_predictions"),
    outs=(Out("drift_html", cache=False), Out("prediction_drift_html", cache=False),
          Out("performance_html", cache=False), Out("drift_details", cache=False), Out("ab_test", cache=False),
          Out("monitoring_history", cache=False, persist=True),
          Out("workspace", cache=False, persist=True)),  # accumulates: one set of snapshots per run
    metrics=("drift_report",),
    description="Drift and performance of the champion on the newest data (Evidently); retrain or not",
    atomic_outs=True,  # each written to a temp file or folder and renamed: DVC need not delete them first
)
def run(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Compare the current window with the champion's reference; write the reports and the decision."""
    os.environ.setdefault("EVIDENTLY_DISABLE_TELEMETRY", "1")
    cfg, schema = settings.report, settings.data_schema
    reference = load_reference(settings, paths)
    model = reference["model"]
    current, described = current_rows(settings, paths, model)
    labeled, label_info = join_labels(current, paths, schema, model)

    summary: dict[str, Any] = {"current": described, "current_rows": len(current), "task": schema.task,
                               "reference": reference["name"], "reference_rows": len(reference["rows"])}
    snapshots: dict[str, Any] = {}  # Evidently's snapshots of this run, by kind, for the workspace
    snapshot = data_drift_report(settings, current, reference["rows"], paths.drift_html, snapshots)
    summary |= drift_summary(snapshot, cfg.drift_share_threshold)
    summary["out_of_reference"] = out_of_reference(current, schema)
    summary |= prediction_drift_report(settings, current, reference["predictions"], paths, model, snapshots)
    summary |= label_info | performance_report(settings, labeled, reference, paths, snapshots)
    summary |= attribution_drift_report(settings, current, reference["rows"], model)
    reasons = decide(settings, summary)
    summary |= {"retrain_needed": bool(reasons), "reasons": reasons,
                "not_judged": [summary[k] for k in ("prediction_drift_note", "metric_note", "attribution_note")
                               if summary.get(k)]}

    write_json(paths.drift_details, _strict(summary))
    scores = {c: r["score"] for c, r in summary["columns"].items()}
    write_json(paths.drift_report, _strict({**{k: summary[k] for k in METRIC_KEYS}, "columns": scores,
                                            "attribution_drift_columns": summary["attribution_drift_columns"],
                                            "out_of_reference": {c: r["rows"]
                                                                 for c, r in summary["out_of_reference"].items()}}))
    history = _record(paths, {**{k: summary[k] for k in (*METRIC_KEYS, "reference", "reasons", "drifted_columns",
                                                         "not_judged")}, "champion": reference.get("champion")})
    log.info("monitoring %s against %s: retrain_needed=%s %s", described, reference["name"],
             summary["retrain_needed"], "; ".join(reasons))
    for note in summary["not_judged"]:
        log.info("not judged: %s", note)
    if reasons:
        alert(settings, paths, "drift", f"retraining needed for {described}: " + "; ".join(reasons),
              _strict({k: summary[k] for k in (*METRIC_KEYS, "drifted_columns", "reasons")}))
    ab = abtest.ab_report(settings, paths)  # the canary's A/B test, and what serve.canary_policy does with it
    ab["action"] = abtest.apply_policy(settings, paths, ab)
    write_json(paths.ab_test, _strict(ab))
    verdict: dict[str, Any] = _strict({**{k: summary[k] for k in METRIC_KEYS},
                                       "drifted_columns": summary["drifted_columns"],
                                       "reasons": reasons, "not_judged": summary["not_judged"],
                                       "ab_test": ab["verdict"]})
    if experiment_name() is None:  # a `dvc exp run` must not replace the day's points on the operators' dashboard
        _to_workspace(settings, paths, summary, snapshots, reference.get("champion"), history)
    return verdict


def _to_workspace(settings: Settings, paths: Paths, summary: dict[str, Any], snapshots: dict[str, Any],
                  champion: str | None, history: list[dict[str, Any]]) -> None:
    """This run's snapshots into the Evidently workspace (reports/workspace), with what the dashboard plots."""
    cfg, window = settings.report, summary["current"]
    when = window_time(window, cfg.window_hours)
    if when is None:  # a batch of a files source without a time column: it happened when it was judged
        when = pd.Timestamp.now(tz="UTC").tz_localize(None).to_pydatetime()
        log.info("%s names no day: its snapshots in the workspace are stamped with the time of this run", window)
    earlier = [h for h in history if h.get("current") != window]
    changed = bool(champion) and (not earlier or earlier[-1].get("champion") != champion)
    values = {"drift_share": summary["drift_share"], "drift_share_threshold": cfg.drift_share_threshold,
              "prediction_drift": summary["prediction_drift"],
              "prediction_drift_threshold": cfg.prediction_drift_threshold,
              "metric_current": summary["metric_current"], "metric_reference": summary["metric_reference"],
              "attribution_drift": summary["attribution_drift"],
              "attribution_drift_threshold": cfg.attribution_drift_threshold, "champion_changed": float(changed),
              **batch_rows(paths, window, summary["current_rows"])}
    add_run(paths.workspace, settings.promote.metric, window, when, champion, values, snapshots)


def batch_rows(paths: Paths, window: str, current_rows: int) -> dict[str, float | None]:
    """Rows collected in the batch (clean + quarantined) and rows quarantined; a prediction window: its rows."""
    if not window.startswith("batch "):
        return {"rows": float(current_rows), "quarantined_rows": None}
    batch = window.removeprefix("batch ")
    clean = pd.read_parquet(paths.validated_rows, columns=["batch"])["batch"].astype(str)
    quarantined = 0
    if paths.quarantined_rows.is_file():
        bad = pd.read_parquet(paths.quarantined_rows, columns=["batch"])["batch"].astype(str)
        quarantined = int((bad == batch).sum())
    return {"rows": float(int((clean == batch).sum()) + quarantined), "quarantined_rows": float(quarantined)}


def decide(settings: Settings, summary: dict[str, Any]) -> list[str]:
    """The reasons to retrain, in words (none: the champion is fine)."""
    cfg, metric = settings.report, settings.promote.metric
    reasons = []
    if summary["data_drift"]:
        reasons.append(f"data drift: {summary['n_drifted']} of {summary['n_columns']} feature columns drifted "
                       f"(share {summary['drift_share']:.2f} >= {cfg.drift_share_threshold}): "
                       + ", ".join(summary["drifted_columns"]))
    distance, p = summary["prediction_drift"], summary.get("prediction_drift_p_value")
    if distance is not None and p is not None and distance >= cfg.prediction_drift_threshold and p <= cfg.max_p_value:
        what = {"binary": "predicted probabilities", "multiclass": "predicted class shares",
                "regression": "predicted values"}[settings.data_schema.task]
        reasons.append(f"prediction drift: distance {distance:.3g} of the {what} >= "
                       f"{cfg.prediction_drift_threshold}, and larger than resamples of the reference of the "
                       f"same size give (p={p:.3f} <= {cfg.max_p_value})")
    now, before, p = summary["metric_current"], summary["metric_reference"], summary.get("decay_p_value")
    if p is not None and p <= cfg.max_p_value:  # p is there only when `now` is past the allowed drop
        side = "under" if higher_is_better(metric) else "over"
        reasons.append(f"performance decay: {metric} {now:.4f} on {summary['labeled_rows']} labelled rows, "
                       f"{abs(before - now):.4f} {side} the champion's test {before:.4f} "
                       f"(allowed drop {cfg.max_metric_drop}, bootstrap p={p:.3f} <= {cfg.max_p_value})")
    if summary.get("attribution_drift_detected"):
        reasons.append(f"attribution drift: the champion's ranking of columns by mean |contribution| moved "
                       f"{summary['attribution_drift']:.3f} (1 - NDCG of its top {summary['attribution_top']} columns) "
                       f">= {cfg.attribution_drift_threshold}; moved most: "
                       + ", ".join(summary["attribution_drift_columns"]))
    return reasons


def attribution_drift_report(settings: Settings, current: pd.DataFrame, reference: pd.DataFrame,
                             model: ModelBundle | None) -> dict[str, Any]:
    """The champion's mean |contribution| per column on (a seeded sample of report.explain_rows of) the current
    rows against its reference rows, and whether the ranking moved past report.attribution_drift_threshold."""
    cfg = settings.report
    out: dict[str, Any] = {"attribution_drift": None, "attribution_drift_detected": False,
                           "attribution_drift_columns": [], "attribution_top": ATTRIBUTION_TOP}
    features = [*settings.data_schema.numeric, *settings.data_schema.categorical]
    if model is None:
        return out | {"attribution_note": "no model to explain yet: no attribution drift"}
    if current.empty:
        return out | {"attribution_note": "no current rows: no attribution drift"}
    sides = {name: judged_sample(rows[features].reset_index(drop=True), cfg.explain_rows, settings.seed)
             for name, rows in (("reference", reference), ("current", current))}
    found = {name: importance(model.explanation(rows)) for name, rows in sides.items()}
    out |= attribution_drift(found["reference"]["mean_abs"], found["current"]["mean_abs"], ATTRIBUTION_TOP)
    out |= {"attribution_drift_detected": out["attribution_drift"] >= cfg.attribution_drift_threshold,
            "attribution_rows": {name: len(rows) for name, rows in sides.items()},
            "attribution_method": found["current"]["method"]}
    return out


def load_reference(settings: Settings, paths: Paths) -> dict[str, Any]:
    """The model to watch with its training-row sample, test predictions and test metric."""
    registry = Registry.of(paths, settings)
    champion = registry.champion
    metric = settings.promote.metric
    if champion is not None:
        folder = registry.champion_dir()  # a missing folder stops here with the fix, not a bare Errno 2
        monitoring = folder / MONITORING_DIR
        if (monitoring / Paths.SAMPLE_FILE).is_file():
            predictions = monitoring / Paths.TEST_PREDICTIONS_FILE
            return {"name": f"champion {champion}", "champion": champion, "model": ModelBundle.load(folder),
                    "rows": pd.read_parquet(monitoring / Paths.SAMPLE_FILE),
                    "predictions": pd.read_parquet(predictions) if predictions.is_file() else None,
                    "metric": _finite(read_json(folder / METADATA_FILE).get("metrics", {}).get(metric))}
        log.warning("champion %s was registered without its monitoring reference: using this run's training "
                    "rows instead", champion)
        model: ModelBundle | None = ModelBundle.load(folder)
        name = f"champion {champion} (training rows of this run)"
    else:  # the first run: nothing is in production yet, the challenger is what would be
        model = ModelBundle.load(paths.challenger) if (paths.challenger / METADATA_FILE).is_file() else None
        name = "training rows of this run" + (f", challenger {model.version}" if model else "")
    sample = paths.train_sample
    if not sample.is_file() and not paths.train_rows.is_file():
        raise MonitoringError("nothing to compare with: no champion and no training rows yet; run the training "
                              "pipeline first (`amaas run`, `dvc repro` or the training_pipeline DAG)")
    metrics = paths.metrics
    predictions = paths.test_predictions
    return {"name": name, "champion": champion, "model": model,
            "rows": pd.read_parquet(sample if sample.is_file() else paths.train_rows),
            "predictions": pd.read_parquet(predictions) if model and predictions.is_file() else None,
            "metric": _finite(read_json(metrics).get(metric)) if model and metrics.is_file() else None}


def current_rows(settings: Settings, paths: Paths, model: ModelBundle | None) -> tuple[pd.DataFrame, str]:
    """The rows to judge, with the model's monitored prediction (and class probabilities) for each, and a
    description of the window."""
    schema = settings.data_schema
    cfg = settings.report
    if cfg.current == "prediction_log":
        window, described = _logged_window(shared(settings, paths), schema, cfg.window_hours, model,
                                           cfg.max_key_share)
        return judged_sample(window, cfg.max_rows, settings.seed), described
    batches = pd.read_parquet(paths.validated_rows, columns=["batch"])["batch"].astype(str)
    if batches.empty:
        raise MonitoringError(f"{paths.validated_rows} has no rows: collect a batch first")
    newest = str(batches.max())  # only its rows are read
    rows = pd.read_parquet(paths.validated_rows, filters=[("batch", "==", newest)]).drop(columns=[schema.target])
    rows = judged_sample(rows.reset_index(drop=True), cfg.max_rows, settings.seed)
    return (scored(rows, model) if model is not None else rows), f"batch {newest}"


def judged_sample(rows: pd.DataFrame, max_rows: int | None, seed: int) -> pd.DataFrame:
    """`rows`, or a seeded sample of `max_rows` of them (report.max_rows, report.explain_rows) in their order."""
    if max_rows is None or len(rows) <= max_rows:
        return rows
    log.info("judging a seeded sample of %d of %d rows", max_rows, len(rows))
    keep = np.sort(np.random.default_rng([seed, 11]).choice(len(rows), max_rows, replace=False))
    return rows.iloc[keep].reset_index(drop=True)


def scored(rows: pd.DataFrame, model: ModelBundle) -> pd.DataFrame:
    """`rows` with the model's monitored prediction and, for classification, its class probabilities."""
    output = model.predict(rows)
    rows = rows.copy()
    rows[PREDICTION] = model.monitored(output)
    if model.task != "regression":
        for i, column in enumerate(proba_columns(output.shape[1])):
            rows[column] = output[:, i]
    return rows


def _logged_window(state: Shared, schema: SchemaConfig, hours: float, model: ModelBundle | None,
                   max_key_share: float = 1.0) -> tuple[pd.DataFrame, str]:
    """The newest `hours` of the prediction log (every replica's, in a fleet)."""
    records = state.predictions()
    if not records:
        raise MonitoringError(f"no predictions in {state.prediction_log_name}: serve the model (`amaas serve`) "
                              f"first, or set report.current: batch")
    classes = model.classes if model is not None else schema.classes
    log_frame = logged_frame(records, schema, classes)
    times = pd.to_datetime(log_frame[TIME], utc=True)
    start = times.max() - pd.Timedelta(hours=hours)  # the newest window of the log, not of the wall clock
    window = log_frame.loc[(times > start).to_numpy()].drop(columns=[TIME, ROUTE, VERSION])
    window = cap_key_share(window, max_key_share).drop(columns=[KEY_NAME]).reset_index(drop=True)
    return window, f"predictions after {start.isoformat(timespec='seconds')}"


def cap_key_share(window: pd.DataFrame, share: float) -> pd.DataFrame:
    """`window` with no API key's rows over `share` of it: one key holder cannot steer monitoring. A key over
    its share keeps evenly spaced rows (deterministic); rows of no key (auth off, older lines) are not capped.
    A window of one source alone is kept whole."""
    counts = window[KEY_NAME].dropna().value_counts()
    unkeyed = int(window[KEY_NAME].isna().sum())
    if share >= 1 or counts.empty or len(counts) + (unkeyed > 0) < 2:
        return window

    def fits(cap: int) -> bool:  # the largest cap with cap <= share * rows kept: a concave test, so bisect
        return cap <= share * (int(counts.clip(upper=cap).sum()) + unkeyed)

    low, high = 0, int(counts.max())
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    keep = window[KEY_NAME].isna().to_numpy().copy()
    for name, count in counts.items():
        rows = np.flatnonzero((window[KEY_NAME] == name).to_numpy())
        keep[rows[(np.arange(min(count, low)) * count) // max(low, 1)] if count > low else rows] = True
    if (dropped := len(window) - int(keep.sum())):
        log.warning("monitoring window: %d rows of API keys over report.max_key_share=%.2f left out", dropped, share)
    return window.loc[keep]


def out_of_reference(current: pd.DataFrame, schema: SchemaConfig) -> dict[str, dict[str, Any]]:
    """Per numeric column with a reference range that current values leave: the rows outside it, their share,
    the range and the values seen beyond it. Such values were validated and served (only hard bounds refuse):
    this is where they show, beside the drift test of the column."""
    out: dict[str, dict[str, Any]] = {}
    for column, rule in schema.numeric.items():
        if rule.reference is None or column not in current.columns:
            continue
        values = pd.to_numeric(current[column], errors="coerce")
        outside = values[rule.outside_reference(values)]
        if len(outside):
            out[column] = {"rows": len(outside), "share": round(len(outside) / len(current), 6),
                           "reference": list(rule.reference), "seen": [float(outside.min()), float(outside.max())]}
    return out


def _drift_frame(frame: pd.DataFrame, schema: SchemaConfig, normalize: bool) -> pd.DataFrame:
    """The feature columns as drift compares them: numbers as floats, categories spelled as the model's
    transform spells them, with missing as a category of its own."""
    out = pd.DataFrame(index=frame.index)
    for column in schema.numeric:
        out[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    for column in schema.categorical:
        values = frame[column]
        text = normalize_category(values) if normalize else values.where(values.isna(), values.astype(str))
        out[column] = text.fillna(MISSING_CATEGORY).astype(str)
    return out


def data_drift_report(settings: Settings, current: pd.DataFrame, reference: pd.DataFrame, html: Path,
                      keep: dict[str, Any] | None = None) -> dict[str, Any]:
    """Data drift of the feature columns; the HTML report is written, the snapshot dict (with Evidently's
    test verdict per column) returned, and the snapshot kept in `keep` as data_drift."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    schema, normalize = settings.data_schema, settings.clean.normalize_categories
    definition = DataDefinition(numerical_columns=list(schema.numeric), categorical_columns=list(schema.categorical))
    # Evidently picks its test by the reference's size alone: over 1,000 rows, distances (Wasserstein,
    # Jensen-Shannon) whose noise at a small current window passes their thresholds; at or under it, a
    # chi-square that takes the reference's shares as exact, which flags a category in about half of stable
    # 100-row days against a 210-row reference. With a small sample on either side, both samples' sizes count.
    small = min(len(current), len(reference)) <= SMALL_SAMPLE_ROWS
    methods = {"num_method": "ks", "cat_method": _two_sample_chi_square()} if small else {}
    snapshot = Report([DataDriftPreset(columns=schema.feature_columns, **methods)], include_tests=True).run(
        Dataset.from_pandas(_drift_frame(current, schema, normalize), data_definition=definition),
        Dataset.from_pandas(_drift_frame(reference, schema, normalize), data_definition=definition))
    _save_html(snapshot, html)
    if keep is not None:
        keep["data_drift"] = snapshot
    details: dict[str, Any] = snapshot.dict()  # evidently ships no types
    return details


@functools.cache
def _two_sample_chi_square() -> Any:
    """A chi-square test of independence of (sample, category): the two-sample test Evidently lacks,
    registered with Evidently once so its drift verdict and report use it."""
    from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
    from evidently.legacy.core import ColumnType

    test = StatTest(name=TWO_SAMPLE_CHI2, display_name="two-sample chi-square p_value",
                    allowed_feature_types=[ColumnType.Categorical, ColumnType.Numerical])
    register_stattest(test, default_impl=two_sample_chi_square)
    return test


def two_sample_chi_square(reference: pd.Series, current: pd.Series, feature_type: Any, threshold: float
                          ) -> tuple[float, bool]:
    """p-value that both samples come from one distribution over the categories (missing values left out),
    and whether it is under `threshold`."""
    from scipy.stats import chi2_contingency

    ref, cur = reference.dropna().astype(str).value_counts(), current.dropna().astype(str).value_counts()
    table = pd.concat([ref, cur], axis=1).fillna(0).to_numpy().T
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 1.0, False
    p_value = float(chi2_contingency(table, correction=False)[1])
    return p_value, p_value < threshold


def prediction_drift_test(current: np.ndarray, reference: np.ndarray, categorical: bool, samples: int, seed: int,
                          max_rows: int = MAX_DRIFT_ROWS) -> dict[str, Any]:
    """Distance of the current predictions from the reference ones, and how often resamples of the
    reference of the same sizes are at least as far apart (the p-value: small means real drift).

    Numbers: the Wasserstein distance normed by the reference's spread (Evidently's `wasserstein`); class
    labels: the Jensen-Shannon distance of the class shares (Evidently's `jensenshannon`, natural log).
    Under no drift both samples come from the reference's distribution: each resample draws a reference of
    the reference's size and a current of the current's size from it (with replacement).
    """
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(seed)
    if len(current) > max_rows:
        current = current[rng.choice(len(current), max_rows, replace=False)]
    if len(reference) > max_rows:
        reference = reference[rng.choice(len(reference), max_rows, replace=False)]
    n_cur, n_ref = len(current), len(reference)
    if categorical:
        classes = sorted(set(map(str, reference)) | set(map(str, current)))
        ref_shares = pd.Series(list(map(str, reference))).value_counts(normalize=True).reindex(classes, fill_value=0.0)
        cur_shares = pd.Series(list(map(str, current))).value_counts(normalize=True).reindex(classes, fill_value=0.0)
        p_ref = ref_shares.to_numpy()
        observed = float(jensenshannon(cur_shares.to_numpy(), p_ref))
        null = np.asarray([jensenshannon(rng.multinomial(n_cur, p_ref) / n_cur, rng.multinomial(n_ref, p_ref) / n_ref)
                           for _ in range(samples)])
        shares: dict[str, Any] = {"prediction_shares": {c: round(float(s), 6) for c, s in cur_shares.items()},
                                  "prediction_shares_reference": {c: round(float(s), 6) for c, s in ref_shares.items()}}
    else:
        current, reference = current.astype("float64"), reference.astype("float64")
        norm = max(float(np.std(reference)), 0.001)  # as Evidently norms it
        observed = float(wasserstein_distance(reference, current)) / norm
        null = np.asarray([wasserstein_distance(rng.choice(reference, n_ref), rng.choice(reference, n_cur)) / norm
                           for _ in range(samples)])
        shares = {"prediction_mean": round(float(np.mean(current)), 6),
                  "prediction_mean_reference": round(float(np.mean(reference)), 6)}
    p_value = (1 + int(np.sum(null >= observed - 1e-12))) / (samples + 1)
    return {"prediction_drift": round(observed, 6), "prediction_drift_p_value": round(p_value, 6),
            "prediction_drift_null_median": round(float(np.median(null)), 6),
            "prediction_drift_null_q95": round(float(np.quantile(null, 0.95)), 6),
            "prediction_drift_resamples": samples, "prediction_drift_rows": n_cur,
            "prediction_drift_reference_rows": n_ref, **shares}


def prediction_drift_report(settings: Settings, current: pd.DataFrame, reference: pd.DataFrame | None,
                            paths: Paths, model: ModelBundle | None, keep: dict[str, Any] | None = None
                            ) -> dict[str, Any]:
    """Prediction drift of the monitored prediction: the verdict (distance and its significance) and
    reports/prediction_drift.html (a page saying why where there is nothing to compare)."""
    cfg, task = settings.report, settings.data_schema.task
    html = paths.prediction_drift_html
    categorical = task == "multiclass"
    method = "jensenshannon" if categorical else "wasserstein"
    out: dict[str, Any] = {"prediction_drift": None, "prediction_drift_p_value": None,
                           "prediction_drift_detected": False, "prediction_drift_method": method}
    field = {"binary": "probability", "multiclass": "label", "regression": "value"}[task]
    now = current[PREDICTION].dropna() if PREDICTION in current else pd.Series(dtype=object)
    before = reference[PREDICTION].dropna() if reference is not None and PREDICTION in reference else None
    if PREDICTION not in current and settings.report.current == "prediction_log":
        note = (f"the prediction log holds no {field!r} for task {task}: no prediction drift from the log")
    elif model is None:
        note = "no model to score with yet: no prediction drift"
    elif before is None or before.empty:
        note = "the model has no test predictions to compare with (test_predictions.parquet): no prediction drift"
    elif now.empty:
        note = "no predictions in the current window: no prediction drift"
    else:
        note = None
    if note is not None:
        _placeholder_html(html, "Prediction drift", note)
        return out | {"prediction_drift_note": note}
    assert before is not None  # no note: there is a reference to compare with
    out |= prediction_drift_test(now.to_numpy(), before.to_numpy(), categorical,
                                 settings.promote.bootstrap_samples, settings.seed)
    out["prediction_drift_detected"] = bool(out["prediction_drift"] >= cfg.prediction_drift_threshold
                                            and out["prediction_drift_p_value"] <= cfg.max_p_value)
    banner = (f"amaas verdict: prediction drift {'DETECTED' if out['prediction_drift_detected'] else 'not detected'}"
              f" - distance {out['prediction_drift']:.4f} (threshold {cfg.prediction_drift_threshold}), "
              f"p={out['prediction_drift_p_value']:.4f} (max {cfg.max_p_value}) against "
              f"{out['prediction_drift_resamples']} resamples of the reference at {len(now)} current and "
              f"{len(before)} reference rows. Evidently's own flag below uses the distance alone.")
    _prediction_drift_html(now, before, categorical, method, cfg.prediction_drift_threshold, html, banner, keep)
    return out


def _prediction_drift_html(now: pd.Series, before: pd.Series, categorical: bool, method: str, threshold: float,
                           html: Path, banner: str, keep: dict[str, Any] | None = None) -> None:
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    kind = "categorical_columns" if categorical else "numerical_columns"
    definition = DataDefinition(**{kind: [PREDICTION]})
    cast: type[str] | Literal["float64"] = str if categorical else "float64"
    snapshot = Report([ValueDrift(column=PREDICTION, method=method, threshold=threshold)]).run(
        Dataset.from_pandas(now.astype(cast).to_frame(PREDICTION), data_definition=definition),
        Dataset.from_pandas(before.astype(cast).to_frame(PREDICTION), data_definition=definition))
    _save_html(snapshot, html, banner)
    if keep is not None:
        keep["prediction_drift"] = snapshot


def performance_report(settings: Settings, labeled: pd.DataFrame, reference: dict[str, Any], paths: Paths,
                       keep: dict[str, Any] | None = None) -> dict[str, Any]:
    """promote.metric on the labelled current rows against the model's own test value, and whether the
    drop is decay; reports/performance.html either way."""
    cfg, metric, task = settings.report, settings.promote.metric, settings.data_schema.task
    model, before = reference["model"], _finite(reference["metric"])
    html = paths.performance_html
    out: dict[str, Any] = {"labeled_rows": len(labeled), "metric": metric, "metric_current": None,
                           "metric_reference": None if before is None else round(before, 6), "decay_p_value": None}
    output = model_output(labeled, task, len(model.classes or []) if model is not None else 0)
    if model is None:
        note = "no model to score with yet: no performance verdict"
    elif len(labeled) < cfg.min_labeled_rows:
        note = (f"not enough labelled rows: {len(labeled)} of the {cfg.min_labeled_rows} needed "
                f"(report.min_labeled_rows): no performance verdict")
    elif output is None:
        note = "the current rows carry no class probabilities to score (prediction log): no performance verdict"
    else:
        note = None
    if note is not None:
        _placeholder_html(html, "Model performance", note)
        return out | {"metric_note": note}
    assert model is not None and output is not None
    y = labeled[ACTUAL].to_numpy()
    now = score(metric, y, output, model.decision)
    if now is None:
        out["metric_note"] = f"{metric} is undefined on these {len(labeled)} labelled rows (one class only?)"
    elif before is None:
        out["metric_note"] = f"the model has no recorded test {metric}: no decay verdict"
    if now is not None:
        out["metric_current"] = round(now, 6)
    if now is not None and before is not None and improvement(metric, now, before) < -cfg.max_metric_drop:
        bound = before - cfg.max_metric_drop if higher_is_better(metric) else before + cfg.max_metric_drop
        out["decay_p_value"] = decay_p_value(y, output, bound, metric, settings.promote.bootstrap_samples,
                                             settings.seed, model.decision, task != "regression")
    _performance_html(labeled, reference["predictions"], model, task, html, keep)
    return out


def decay_p_value(y: np.ndarray, output: np.ndarray, bound: float, metric: str, samples: int, seed: int,
                  threshold: Decision = 0.5, classification: bool = True, max_rows: int = 50_000) -> float | None:
    """Share of bootstrap resamples whose metric still reaches `bound` (in the metric's direction): small
    means it really fell past it. None where the metric is undefined on every resample."""
    rng = np.random.default_rng(seed)
    if len(y) > max_rows:  # the metric's error is tiny by then; resampling fewer rows only widens it (cautious)
        keep = rng.choice(len(y), max_rows, replace=False)
        y, output = y[keep], output[keep]
    values = [v for idx in bootstrap_resamples(y, samples, rng, classification)
              if (v := score(metric, y[idx], output[idx], threshold)) is not None]
    if not values:
        return None
    return round(float(np.mean([improvement(metric, v, bound) >= 0 for v in values])), 6)


def _performance_frame(frame: pd.DataFrame, model: ModelBundle, task: str) -> pd.DataFrame:
    """Scored rows with ACTUAL as Evidently's performance presets read them."""
    if task == "regression":
        return pd.DataFrame({"target": frame[ACTUAL].to_numpy(dtype="float64"),
                             "prediction": frame[PREDICTION].to_numpy(dtype="float64")})
    if task == "binary":
        output = model_output(frame, task, 2)
        assert output is not None
        return pd.DataFrame({"target": frame[ACTUAL].to_numpy(dtype="int64"), "prediction": output[:, 1]})
    names = [str(c) for c in model.classes or []]
    output = model_output(frame, task, len(names))
    assert output is not None
    return pd.DataFrame({"actual class": [names[int(i)] for i in frame[ACTUAL]],
                         "predicted class": [names[int(i)] for i in np.argmax(output, axis=1)],
                         **{name: output[:, i] for i, name in enumerate(names)}})


def _performance_html(labeled: pd.DataFrame, reference: pd.DataFrame | None, model: ModelBundle, task: str,
                      html: Path, keep: dict[str, Any] | None = None) -> None:
    """Evidently's classification or regression report of the labelled rows, against the test rows."""
    from evidently import BinaryClassification, DataDefinition, Dataset, MulticlassClassification, Regression, Report
    from evidently.presets import ClassificationPreset, RegressionPreset

    if task == "regression":
        definition = DataDefinition(numerical_columns=["target", "prediction"],
                                    regression=[Regression(target="target", prediction="prediction")])
        preset: Any = RegressionPreset()
    elif task == "binary":
        definition = DataDefinition(numerical_columns=["prediction"], classification=[
            BinaryClassification(target="target", prediction_probas="prediction")])
        preset = ClassificationPreset(probas_threshold=model.threshold)
    else:
        names = [str(c) for c in model.classes or []]
        definition = DataDefinition(numerical_columns=names, categorical_columns=["actual class", "predicted class"],
                                    classification=[MulticlassClassification(
                                        target="actual class", prediction_labels="predicted class",
                                        prediction_probas=names)])
        preset = ClassificationPreset()
    ref = None
    k = len(model.classes or [])
    if reference is not None and ACTUAL in reference and model_output(reference, task, k) is not None:
        ref = Dataset.from_pandas(_performance_frame(reference, model, task), data_definition=definition)
    try:
        snapshot = Report([preset]).run(
            Dataset.from_pandas(_performance_frame(labeled, model, task), data_definition=definition), ref)
        _save_html(snapshot, html)
        if keep is not None:
            keep["performance"] = snapshot
    except Exception as exc:  # noqa: BLE001 - the verdict is computed above; the page must exist (dvc outs)
        log.warning("Evidently could not build the performance report: %s", exc)
        _placeholder_html(html, "Model performance", f"Evidently could not build this report: {exc}")


def _save_html(snapshot: Any, html: Path, banner: str | None = None) -> None:
    page = snapshot.get_html_str(as_iframe=False)
    if banner:
        note = (f'<div style="padding:12px;margin:8px;border:2px solid #555;font:16px sans-serif">'
                f"{html_text.escape(banner)}</div>")
        page = re.sub(r"(<body[^>]*>)", lambda m: m[1] + note, page, count=1)
    write_text(html, page)


def _placeholder_html(html: Path, title: str, reason: str) -> None:
    """A short page in place of a report that cannot be made now, saying why (the file must exist)."""
    title, reason = html_text.escape(title), html_text.escape(reason)
    write_text(html, f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>\n'
                     f"<body><h1>{title}</h1>\n<p>No report for this run: {reason}.</p></body></html>\n")


def _finite(value: Any) -> float | None:
    """A float, or None for a missing, NaN or infinite one."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _strict(obj: Any, where: str = "") -> Any:
    """`obj` as strict JSON holds it: numpy scalars as Python ones, NaN and infinities as None (logged)."""
    if isinstance(obj, dict):
        return {str(k): _strict(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        if not math.isfinite(float(obj)):
            log.warning("monitoring value %s is %s: written as null", where.lstrip(".") or "<value>", obj)
            return None
        return float(obj)
    return obj


def _record(paths: Paths, decision: dict[str, Any]) -> list[dict[str, Any]]:
    """Append the decision and its reasons to reports/monitoring_history.json (the audit trail); the history
    before it."""
    history_file = paths.monitoring_history
    history: list[dict[str, Any]] = read_json(history_file) if history_file.is_file() else []
    write_json(history_file, _strict([*history, decision]))  # older entries may hold NaN: made strict too
    return history
