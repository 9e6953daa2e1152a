"""evaluate: score the trained ensemble on held-out test rows; write DVC metrics and plots.

What is measured follows schema.task (pipelines.metrics): ranking, threshold and calibration metrics for
binary; accuracy, macro/weighted F1, kappa, log loss and a per-class table for multiclass; RMSE, MAE and
R² for regression. A metric undefined on the test rows is null with the reason, never NaN.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from pipelines.bundle import ModelBundle
from pipelines.config import Paths, Settings
from pipelines.contracts import Plot, stage
from pipelines.explain import importance
from pipelines.io import atomic_dir, write_json
from pipelines.metrics import Decision, decision_of, labels_of, score, slice_metrics, task_metrics

log = logging.getLogger(__name__)


def calibration_table(y: np.ndarray, proba: np.ndarray, bins: int) -> pd.DataFrame:
    """Per equal-width probability bin: rows, mean predicted probability, observed positive share.

    The row-weighted mean gap between the last two is the expected calibration error (ECE).
    """
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(proba, edges[1:-1]), 0, bins - 1)
    table = pd.DataFrame({"bin": which, "p": proba, "y": y}).groupby("bin").agg(
        rows=("y", "size"), mean_predicted=("p", "mean"), fraction_positive=("y", "mean"))
    return table.reset_index()


def calibration_error(y: np.ndarray, proba: np.ndarray, bins: int) -> float:
    table = calibration_table(y, proba, bins)
    return float((table["mean_predicted"] - table["fraction_positive"]).abs().mul(table["rows"]).sum() / len(y))


def model_metrics(task: str, y: np.ndarray, output: np.ndarray, threshold: Decision, bins: int
                  ) -> dict[str, float | None]:
    """The task's metrics, plus for classification the Brier score and the calibration error of the
    positive class (binary) or of the top class's confidence (multiclass)."""
    result = task_metrics(task, y, output, threshold)
    if task == "binary":
        result["brier"] = float(skm.brier_score_loss(y, output[:, 1]))
        result["calibration_error"] = calibration_error(y, output[:, 1], bins)
    elif task == "multiclass":
        hit = (labels_of(output) == y).astype(float)
        result["calibration_error"] = calibration_error(hit, output.max(axis=1), bins)
    return result


def per_class(y: np.ndarray, output: np.ndarray, classes: list[Any], threshold: Decision) -> dict[str, Any]:
    """Precision, recall, F1 and support of each class."""
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, labels_of(output, threshold), labels=list(range(len(classes))), zero_division=0)
    return {str(c): {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                     "support": int(support[i])} for i, c in enumerate(classes)}


def plots(task: str, y: np.ndarray, output: np.ndarray, threshold: Decision, bins: int, classes: list[Any] | None
          ) -> dict[str, pd.DataFrame]:
    """The DVC plots of the task, by their `Paths` property: ROC, precision-recall and calibration curves
    (binary), the confusion matrix (classification), predicted against actual values and residuals (regression)."""
    if task == "regression":
        return {"residuals_plot": pd.DataFrame({"actual": y, "predicted": output, "residual": y - output})}
    assert classes is not None
    names = np.asarray([str(c) for c in classes], dtype=object)
    out = {"confusion_plot": pd.DataFrame({"actual": names[y], "predicted": names[labels_of(output, threshold)]})}
    if task == "binary":
        fpr, tpr, _ = skm.roc_curve(y, output[:, 1]) if len(np.unique(y)) == 2 else ([], [], None)
        precision, recall, _ = skm.precision_recall_curve(y, output[:, 1])
        out |= {"roc_plot": pd.DataFrame({"fpr": fpr, "tpr": tpr}),
                "pr_plot": pd.DataFrame({"recall": recall, "precision": precision}),
                "calibration_plot": calibration_table(y, output[:, 1], bins)}
    return out


def global_importance(bundle: ModelBundle, test: pd.DataFrame, rows: int, seed: int) -> dict[str, Any]:
    """reports/explain.json: the trained ensemble's mean |contribution| per input column (per class too, by class
    label, for classification) on a seeded sample of at most `rows` test rows (pipelines.explain)."""
    sample = test if len(test) <= rows else test.iloc[np.sort(np.random.default_rng([seed, 13]).choice(
        len(test), rows, replace=False))]
    found = importance(bundle.explanation(sample))
    names = [str(c) for c in bundle.classes] if bundle.classes is not None else None
    return {"version": bundle.version, "rows": found["rows"], "method": found["method"],
            "output": "value" if names is None else "probability",
            "mean_abs_contribution": found["mean_abs"],
            "per_class": None if names is None or found["per_class"] is None else dict(zip(
                names, found["per_class"], strict=True))}


def importance_frame(explained: dict[str, Any]) -> pd.DataFrame:
    """The plot data of reports/explain.json: one row per column, most important first (per class columns too)."""
    frame = pd.DataFrame({"column": list(explained["mean_abs_contribution"]),
                          "mean_abs_contribution": list(explained["mean_abs_contribution"].values())})
    for name, values in (explained["per_class"] or {}).items():
        frame[f"class_{name}"] = [values[c] for c in frame["column"]]
    return frame.sort_values("mean_abs_contribution", ascending=False, kind="stable").reset_index(drop=True)


@stage(
    params=("schema", "evaluate", "promote.metric", "scale.score_chunk_rows", "seed"),
    deps=("trained", "reference"),
    metrics=("metrics", "slices", "explain_report"),
    atomic_outs=True,  # each written to a temp file or folder and renamed: DVC need not delete them first
    plots_dir="plots",  # the plots of the task: ROC, PR, calibration (binary), confusion (classes), residuals
    plots=(Plot("roc_plot", x="fpr", y="tpr", title="ROC"),
           Plot("pr_plot", x="recall", y="precision", title="Precision-recall"),
           Plot("calibration_plot", x="mean_predicted", y="fraction_positive", title="Calibration"),
           Plot("confusion_plot", x="actual", y="predicted", title="Confusion matrix", template="confusion"),
           Plot("residuals_plot", x="predicted", y="residual", title="Residuals", template="scatter"),
           Plot("explain_plot", x="mean_abs_contribution", y="column", title="Mean |contribution| per column",
                template="bar_horizontal_sorted")),
    description="Score the trained ensemble and its learners on the held-out test rows: metrics, slices, plots",
)
def run(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Metrics of the trained ensemble and of each of its learners on data/reference/test.parquet (the
    compress stage measures the candidates it makes of it, and picks the challenger)."""
    schema, cfg, metric = settings.data_schema, settings.evaluate, settings.promote.metric
    bundle = ModelBundle.load(paths.trained)
    task, threshold = bundle.task, bundle.decision
    test = pd.read_parquet(paths.test_rows)
    y = bundle.transform.encode_target(test[schema.target])
    size = settings.scale.score_chunk_rows  # scored in chunks: the features of one chunk in memory at a time
    member_preds = np.concatenate([bundle.ensemble.member_predictions(bundle.transform.transform(test.iloc[i:i + size]))
                                   for i in range(0, len(test), size)])
    output = bundle.ensemble.combine(member_preds)  # what bundle.predict gives, members kept
    result: dict[str, Any] = {"task": task, **model_metrics(task, y, output, threshold, cfg.calibration_bins)}
    own = (bundle.metadata.get("combination") or {}).get("decisions", {})  # each member's, picked on valid
    for i, name in enumerate(bundle.ensemble.names):
        decision = decision_of(own[name]) if name in own else threshold
        result[f"{metric}_{name}"] = score(metric, y, member_preds[:, i], decision)
    undefined = sorted(k for k, v in result.items() if v is None)
    if undefined:
        counts: tuple[Iterable[Any], Iterable[Any]] = np.unique(y, return_counts=True) if bundle.classes else ([], [])
        result["undefined"] = {"metrics": undefined, "reason": f"undefined on these {len(y)} test rows (class "
                               f"counts {dict(zip(map(int, counts[0]), map(int, counts[1]), strict=True))})"}
    if task == "binary":
        result["threshold"] = threshold
    if bundle.classes is not None:
        result["per_class"] = per_class(y, output, bundle.classes, threshold)
    result["version"] = bundle.version
    result["test_rows"] = len(test)
    write_json(paths.metrics, result)
    explained = global_importance(bundle, test, cfg.explain_rows, settings.seed)
    write_json(paths.explain_report, explained)
    with atomic_dir(paths.plots) as folder:
        for name, frame in plots(task, y, output, threshold, cfg.calibration_bins, bundle.classes).items():
            frame.to_csv(folder / getattr(paths, name).name, index=False, float_format="%.6g")
        importance_frame(explained).to_csv(folder / paths.explain_plot.name, index=False, float_format="%.6g")
    write_json(paths.slices,
               slice_metrics(test, y, output, cfg.slices, task, metric, threshold))
    log.info("trained %s: %s=%s on %d test rows", bundle.version, metric, result.get(metric), len(test))
    return {k: result.get(k) for k in ("version", "task", metric, "test_rows")}
