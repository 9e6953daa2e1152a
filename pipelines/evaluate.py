"""evaluate: score the challenger on held-out test rows; write DVC metrics and plots."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from pipelines.bundle import ModelBundle
from pipelines.config import Paths, Settings
from pipelines.io import atomic_path, write_json, write_parquet
from pipelines.transform import normalize_category

log = logging.getLogger(__name__)


def classification_metrics(y: np.ndarray, proba: np.ndarray, threshold: float, bins: int = 10
                           ) -> dict[str, float | None]:
    """Threshold, ranking and calibration metrics of positive-class probabilities `proba` against labels `y`.

    Kappa and the ranking metrics (ROC-AUC, PR-AUC) need both classes; on rows of one class they are None.
    """
    label = (proba >= threshold).astype(int)
    both = len(np.unique(y)) == 2
    return {
        "accuracy": float(skm.accuracy_score(y, label)),
        "precision": float(skm.precision_score(y, label, zero_division=0)),
        "recall": float(skm.recall_score(y, label, zero_division=0)),
        "f1": float(skm.f1_score(y, label, zero_division=0)),
        "cohen_kappa": float(skm.cohen_kappa_score(y, label)) if both else None,
        "roc_auc": float(skm.roc_auc_score(y, proba)) if both else None,
        "pr_auc": float(skm.average_precision_score(y, proba)) if both else None,
        "log_loss": float(skm.log_loss(y, np.clip(proba, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "brier": float(skm.brier_score_loss(y, proba)),
        "calibration_error": float(calibration_table(y, proba, bins).eval("abs(mean_predicted - fraction_positive)"
                                                                          " * rows").sum() / len(y)),
    }


def calibration_table(y: np.ndarray, proba: np.ndarray, bins: int) -> pd.DataFrame:
    """Per equal-width probability bin: rows, mean predicted probability, observed positive share.

    The row-weighted mean gap between the last two is the expected calibration error (ECE).
    """
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(proba, edges[1:-1]), 0, bins - 1)
    table = pd.DataFrame({"bin": which, "p": proba, "y": y}).groupby("bin").agg(
        rows=("y", "size"), mean_predicted=("p", "mean"), fraction_positive=("y", "mean"))
    return table.reset_index()


def slice_metrics(test: pd.DataFrame, y: np.ndarray, proba: np.ndarray, columns: list[str], threshold: float,
                  bins: int) -> dict[str, dict[str, dict[str, float | None]]]:
    """Metrics per value of each slice column (categories normalized as the model sees them)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for col in columns:
        values = normalize_category(test[col]).fillna("<missing>").to_numpy()
        out[col] = {}
        for value in sorted(set(values)):
            rows = values == value
            stats = classification_metrics(y[rows], proba[rows], threshold, bins)
            out[col][str(value)] = {"rows": int(rows.sum()), "positive_rate": float(y[rows].mean()),
                                    **{k: stats[k] for k in ("roc_auc", "log_loss", "accuracy", "calibration_error")}}
    return out


def _write_csv(path: Any, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")


def run(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Metrics of the challenger and of each of its learners on data/reference/test.parquet."""
    schema = settings.data_schema
    bundle = ModelBundle.load(paths.challenger)
    test = pd.read_parquet(paths.reference / "test.parquet")
    y = test[schema.target].to_numpy()
    member_preds = bundle.ensemble.member_predictions(bundle.transform.transform(test))
    proba = bundle.ensemble.combine(member_preds)[:, 1]  # what bundle.predict_proba gives, members kept
    cfg = settings.evaluate
    result = classification_metrics(y, proba, cfg.threshold, cfg.calibration_bins)
    for i, name in enumerate(bundle.ensemble.names):
        result[f"roc_auc_{name}"] = float(skm.roc_auc_score(y, member_preds[:, i]))
    result["version"] = bundle.version
    result["test_rows"] = len(test)
    write_json(paths.reports / "metrics.json", result)

    fpr, tpr, _ = skm.roc_curve(y, proba)
    _write_csv(paths.reports / "plots" / "roc.csv", pd.DataFrame({"fpr": fpr, "tpr": tpr}))
    precision, recall, _ = skm.precision_recall_curve(y, proba)
    _write_csv(paths.reports / "plots" / "pr.csv", pd.DataFrame({"recall": recall, "precision": precision}))
    _write_csv(paths.reports / "plots" / "calibration.csv", calibration_table(y, proba, cfg.calibration_bins))
    _write_csv(paths.reports / "plots" / "confusion.csv",
               pd.DataFrame({"actual": y, "predicted": (proba >= cfg.threshold).astype(int)}))
    slices = slice_metrics(test, y, proba, cfg.slices, cfg.threshold, cfg.calibration_bins)
    write_json(paths.reports / "slices.json", slices)
    write_parquet(paths.reports / "test_predictions.parquet",
                  pd.DataFrame({schema.id_column: test[schema.id_column].to_numpy(), "actual": y, "prediction": proba}))
    log.info("challenger %s: roc_auc=%.4f log_loss=%.4f", bundle.version, result["roc_auc"], result["log_loss"])
    return {k: result[k] for k in ("version", "roc_auc", "pr_auc", "log_loss", "f1", "calibration_error")}
