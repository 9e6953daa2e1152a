"""Metrics of every task in one place: how each is computed, and which direction is better.

A model's output is canonical everywhere: for classification the class probabilities, shape (n, k), with
labels `y` encoded as 0..k-1 in the order of the bundle's classes; for regression the predicted values,
shape (n,), with `y` the true values. Binary label metrics (accuracy, F1, kappa) take the bundle's cut-off.
A metric that is undefined on the rows given (ROC-AUC on one class) is None, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn import metrics as skm

from pipelines.transform import normalize_category

if TYPE_CHECKING:
    import pandas as pd

# How labels are read off class probabilities: the positive-class cut-off (binary), or one weight per class
# (multiclass: the label is the argmax of probability x weight; all 1 is the plain argmax)
Decision = float | tuple[float, ...]
LOWER_IS_BETTER = frozenset({"log_loss", "rmse", "mae", "brier", "calibration_error"})


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def improvement(metric: str, new: float, old: float) -> float:
    """How much better `new` is than `old` (positive: better), whatever the metric's direction."""
    return new - old if higher_is_better(metric) else old - new


def labels_of(output: np.ndarray, threshold: Decision = 0.5) -> np.ndarray:
    """Encoded class labels from class probabilities: the cut-off on the positive class for two classes; for
    more, the argmax, of the probabilities times the class weights where `threshold` gives them."""
    if output.shape[1] == 2:
        return (output[:, 1] >= (threshold if isinstance(threshold, float | int) else 0.5)).astype("int64")
    if isinstance(threshold, tuple) and len(threshold) == output.shape[1]:
        return np.argmax(output * np.asarray(threshold), axis=1).astype("int64")
    return np.argmax(output, axis=1).astype("int64")


def decision_of(choice: dict[str, Any]) -> Decision:
    """The Decision a recorded choice stands for (a model's `threshold_choice`: a cut-off, or class weights)."""
    if "class_weights" in choice:
        return tuple(float(w) for w in choice["class_weights"])
    return float(choice.get("threshold", 0.5))


def _two_classes(y: np.ndarray) -> bool:
    return len(np.unique(y)) == 2


def _binary(name: str) -> Callable[[np.ndarray, np.ndarray, Decision], float | None]:
    ranking = {"roc_auc": skm.roc_auc_score, "pr_auc": skm.average_precision_score}[name]
    return lambda y, p, t: float(ranking(y, p[:, 1])) if _two_classes(y) else None


def _label_metric(fn: Callable[..., float], **kw: Any) -> Callable[[np.ndarray, np.ndarray, Decision], float | None]:
    return lambda y, p, t: float(fn(y, labels_of(p, t), **kw))


def _kappa(y: np.ndarray, p: np.ndarray, t: Decision) -> float | None:
    predicted = labels_of(p, t)
    if len(np.union1d(y, predicted)) < 2:
        return None  # one class in truth and prediction: kappa is 0/0
    return float(skm.cohen_kappa_score(y, predicted))


def _log_loss(y: np.ndarray, p: np.ndarray, t: Decision) -> float:
    clipped = np.clip(p, 1e-7, 1 - 1e-7)
    clipped = clipped / clipped.sum(axis=1, keepdims=True)
    return float(skm.log_loss(y, clipped, labels=list(range(p.shape[1]))))


SCORERS: dict[str, Callable[[np.ndarray, np.ndarray, Decision], float | None]] = {
    "roc_auc": _binary("roc_auc"),
    "pr_auc": _binary("pr_auc"),
    "log_loss": _log_loss,
    "accuracy": _label_metric(skm.accuracy_score),
    "f1": _label_metric(skm.f1_score, zero_division=0),
    "precision": _label_metric(skm.precision_score, zero_division=0),
    "recall": _label_metric(skm.recall_score, zero_division=0),
    "f1_macro": _label_metric(skm.f1_score, average="macro", zero_division=0),
    "f1_weighted": _label_metric(skm.f1_score, average="weighted", zero_division=0),
    "precision_macro": _label_metric(skm.precision_score, average="macro", zero_division=0),
    "recall_macro": _label_metric(skm.recall_score, average="macro", zero_division=0),
    "cohen_kappa": _kappa,
    "rmse": lambda y, v, t: float(np.sqrt(np.mean((np.asarray(y, float) - v) ** 2))),
    "mae": lambda y, v, t: float(np.mean(np.abs(np.asarray(y, float) - v))),
    "r2": lambda y, v, t: float(skm.r2_score(y, v)) if len(y) > 1 and np.var(y) > 0 else None,
}
REPORTED: dict[str, tuple[str, ...]] = {
    "binary": ("roc_auc", "pr_auc", "log_loss", "accuracy", "precision", "recall", "f1", "cohen_kappa"),
    "multiclass": ("accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro", "cohen_kappa",
                   "log_loss"),
    "regression": ("rmse", "mae", "r2"),
}


def score(metric: str, y: np.ndarray, output: np.ndarray, threshold: Decision = 0.5) -> float | None:
    """One metric of `output` against `y`; None where it is undefined on these rows."""
    if len(y) == 0:
        return None
    value = SCORERS[metric](np.asarray(y), np.asarray(output), threshold)
    return None if value is None or not math.isfinite(value) else value


def task_metrics(task: str, y: np.ndarray, output: np.ndarray, threshold: Decision = 0.5) -> dict[str, float | None]:
    """Every metric reported for `task` (amaas evaluate, slices, the model card)."""
    return {name: score(name, y, output, threshold) for name in REPORTED[task]}


def bootstrap_resamples(y: np.ndarray, samples: int, rng: np.random.Generator, classification: bool = True
                        ) -> list[np.ndarray]:
    """Row indexes of `samples` resamples with replacement; for classification, less those with one class
    (ranking metrics are undefined on them)."""
    out = []
    for _ in range(samples):
        idx = rng.integers(0, len(y), len(y))
        if not classification or y[idx].min() != y[idx].max():
            out.append(idx)
    return out


def paired_bootstrap(metric: str, y: np.ndarray, champion: np.ndarray, challenger: np.ndarray, samples: int,
                     seed: int, thresholds: tuple[Decision, Decision] = (0.5, 0.5), classification: bool = True
                     ) -> dict[str, Any]:
    """Gain of challenger over champion on the same rows (positive: better, in the metric's direction),
    with a one-sided bootstrap p-value (share of resamples where the gain is <= 0) and a 95% interval.
    `thresholds`: the binary cut-offs of (champion, challenger), each model's own."""
    def gain(idx: np.ndarray | slice) -> float | None:
        new = score(metric, y[idx], challenger[idx], thresholds[1])
        old = score(metric, y[idx], champion[idx], thresholds[0])
        return None if new is None or old is None else improvement(metric, new, old)

    observed = gain(slice(None))
    draws = [g for idx in bootstrap_resamples(y, samples, np.random.default_rng(seed), classification)
             if (g := gain(idx)) is not None]
    if observed is None or not draws:
        return {"gain": None, "p_value": None, "ci_low": None, "ci_high": None, "bootstrap_samples": len(draws)}
    arr = np.asarray(draws)
    return {"gain": observed, "p_value": float(np.mean(arr <= 0)), "ci_low": float(np.quantile(arr, 0.025)),
            "ci_high": float(np.quantile(arr, 0.975)), "bootstrap_samples": len(arr)}


def choose_threshold(y: np.ndarray, p1: np.ndarray, costs: tuple[float, float] | None = None) -> dict[str, Any]:
    """The binary cut-off on the positive-class probability picked on validation rows: the one with the
    highest F1, or, given (false positive cost, false negative cost), the least expected cost per row.
    Candidates are the distinct probabilities (label 1 when p >= cut-off); ties go to the one nearest 0.5."""
    y = np.asarray(y).astype("int64")
    order = np.argsort(-p1, kind="mergesort")
    p_sorted, y_sorted = p1[order], y[order]
    last = np.r_[p_sorted[1:] != p_sorted[:-1], True]  # the last row of each run of equal probabilities
    tp = np.cumsum(y_sorted)[last]
    predicted = (np.arange(len(y)) + 1)[last]
    candidates = p_sorted[last]
    fp, fn = predicted - tp, y.sum() - tp
    if costs is None:
        values = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
        goodness = values
    else:
        values = (costs[0] * fp + costs[1] * fn) / max(len(y), 1)
        goodness = -values
    best = np.flatnonzero(goodness == goodness.max())
    pick = best[np.argmin(np.abs(candidates[best] - 0.5))]
    return {"threshold": float(candidates[pick]), "criterion": "f1" if costs is None else "expected_cost",
            "value_on_valid": round(float(values[pick]), 6)}


MIN_STEP_GAIN = 0.005  # choose_class_weights: what a per-class step must gain on the validation rows


def choose_class_weights(y: np.ndarray, proba: np.ndarray, metric: str) -> dict[str, Any]:
    """Multiclass: the class weights (label = argmax of probability x weight) picked on validation rows for
    `metric`, a label metric where higher is better (f1_macro, accuracy, ...); log loss reads no labels: all 1.

    Candidates: the plain argmax; prior correction (weight = class share ** -a, a in 0.25..1: rare classes get
    predicted), each kept only if better (ties keep the simpler rule); then one pass of mild per-class steps from
    the best, each kept only if it gains MIN_STEP_GAIN (a finer search fits the noise of a small validation set:
    on a 944-row 7-class table it gained 0.1 f1_macro on the validation rows and lost 0.05 on the test rows).
    """
    y = np.asarray(y).astype("int64")
    k = proba.shape[1]
    plain = tuple([1.0] * k)
    if metric not in SCORERS or not higher_is_better(metric) or metric == "log_loss" or len(y) == 0:
        return {"class_weights": list(plain), "criterion": "argmax"}

    def value(weights: tuple[float, ...]) -> float:
        found = score(metric, y, proba, weights)
        return -math.inf if found is None else found

    base = value(plain)
    best, best_value = plain, base
    shares = np.maximum(np.bincount(y, minlength=k) / len(y), 1 / len(y))
    for power in (0.25, 0.5, 0.75, 1.0):
        trial = tuple(float(w) for w in shares ** -power / (shares ** -power).max())
        if (v := value(trial)) > best_value + 1e-9:
            best, best_value = trial, v
    for c in range(k):  # one pass of mild steps, each worth a clear gain: few validation rows are noisy
        for factor in (0.7, 1.4):
            trial = tuple(w * factor if i == c else w for i, w in enumerate(best))
            if (v := value(trial)) > best_value + MIN_STEP_GAIN:
                best, best_value = trial, v
    top = max(best)
    return {"class_weights": [round(w / top, 6) for w in best], "criterion": metric,
            "value_on_valid": round(best_value, 6), "argmax_value_on_valid": round(base, 6)}


def slice_metrics(test: pd.DataFrame, y: np.ndarray, output: np.ndarray, columns: list[str], task: str,
                  metric: str, threshold: Decision) -> dict[str, dict[str, dict[str, Any]]]:
    """promote.metric and the rows of each value of each slice column (categories as the model sees them)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for col in columns:
        values = normalize_category(test[col]).fillna("<missing>").to_numpy()
        out[col] = {}
        for value in sorted(set(values)):
            rows = values == value
            out[col][str(value)] = {"rows": int(rows.sum()), metric: score(metric, y[rows], output[rows], threshold)}
            if task == "binary":
                out[col][str(value)]["positive_rate"] = float(y[rows].mean())
    return out
