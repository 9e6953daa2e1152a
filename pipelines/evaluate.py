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

log = logging.getLogger(__name__)


def classification_metrics(y: np.ndarray, proba: np.ndarray, threshold: float) -> dict[str, float]:
    """Threshold and ranking metrics of positive-class probabilities `proba` against labels `y`."""
    label = (proba >= threshold).astype(int)
    return {
        "accuracy": float(skm.accuracy_score(y, label)),
        "precision": float(skm.precision_score(y, label, zero_division=0)),
        "recall": float(skm.recall_score(y, label, zero_division=0)),
        "f1": float(skm.f1_score(y, label, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(y, proba)),
        "pr_auc": float(skm.average_precision_score(y, proba)),
        "log_loss": float(skm.log_loss(y, np.clip(proba, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "brier": float(skm.brier_score_loss(y, proba)),
    }


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
    result = classification_metrics(y, proba, settings.evaluate.threshold)
    for i, name in enumerate(bundle.ensemble.names):
        result[f"roc_auc_{name}"] = float(skm.roc_auc_score(y, member_preds[:, i]))
    result["version"] = bundle.version
    result["test_rows"] = len(test)
    write_json(paths.reports / "metrics.json", result)

    fpr, tpr, _ = skm.roc_curve(y, proba)
    _write_csv(paths.reports / "plots" / "roc.csv", pd.DataFrame({"fpr": fpr, "tpr": tpr}))
    precision, recall, _ = skm.precision_recall_curve(y, proba)
    _write_csv(paths.reports / "plots" / "pr.csv", pd.DataFrame({"recall": recall, "precision": precision}))
    write_parquet(paths.reports / "test_predictions.parquet",
                  pd.DataFrame({schema.id_column: test[schema.id_column].to_numpy(), "actual": y, "prediction": proba}))
    log.info("challenger %s: roc_auc=%.4f log_loss=%.4f", bundle.version, result["roc_auc"], result["log_loss"])
    return {k: result[k] for k in ("version", "roc_auc", "pr_auc", "log_loss", "f1")}
