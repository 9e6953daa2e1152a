"""The monitoring decision: which findings mean "retrain", and the significance of a performance drop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.config import Paths, load_settings
from pipelines.stages.report import MonitoringError, decay_p_value, decide, drift_summary, load_reference
from tests.conftest import write_params

CALM = {"data_drift": False, "drift_share": 0.08, "n_drifted": 1, "n_columns": 13, "drifted_columns": ["age"],
        "prediction_drift": 0.03, "prediction_drift_p_value": 0.6, "labeled_rows": 4000, "metric_current": 0.78,
        "metric_reference": 0.79, "decay_p_value": None}


@pytest.fixture
def settings(tmp_path):
    return load_settings(write_params(tmp_path))


def _scores(n: int, separation: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and two-column class probabilities of a model that separates the classes this well."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + separation * y)))
    return y, np.column_stack([1 - p, p])


def test_calm_findings_need_no_retraining(settings):
    assert decide(settings, CALM) == []


def test_each_finding_is_a_reason_in_words(settings):
    reasons = decide(settings, {**CALM, "data_drift": True, "drift_share": 0.46, "n_drifted": 6,
                                "drifted_columns": ["credit_score", "income"], "prediction_drift": 0.4,
                                "prediction_drift_p_value": 0.01, "metric_current": 0.70, "decay_p_value": 0.0})
    assert [r.split(":")[0] for r in reasons] == ["data drift", "prediction drift", "performance decay"]
    assert "credit_score, income" in reasons[0] and "distance 0.4 of" in reasons[1] and "p=0.010" in reasons[1]
    assert "0.0900 under" in reasons[2]


def test_a_far_prediction_distance_that_chance_explains_is_no_drift(settings):
    assert decide(settings, {**CALM, "prediction_drift": 0.15, "prediction_drift_p_value": 0.5}) == []
    assert decide(settings, {**CALM, "prediction_drift": 0.05, "prediction_drift_p_value": 0.001}) == []
    assert decide(settings, {**CALM, "prediction_drift": None, "prediction_drift_p_value": None}) == []


def test_a_drop_that_is_not_significant_is_no_decay(settings):
    assert decide(settings, {**CALM, "metric_current": 0.75, "decay_p_value": 0.2}) == []


def test_decay_of_a_lower_is_better_metric_reads_over(tmp_path):
    settings = load_settings(write_params(tmp_path, **{"schema.task": "regression", "promote.metric": "rmse",
                                                       "evaluate.slices": []}))
    reasons = decide(settings, {**CALM, "metric_current": 1.5, "metric_reference": 1.2, "decay_p_value": 0.0})
    assert reasons == [reasons[0]] and "rmse 1.5000" in reasons[0] and "0.3000 over the champion's test 1.2000" \
        in reasons[0]


def test_decay_p_value_tells_noise_from_a_real_drop():
    y, proba = _scores(600, 1.6)  # ROC-AUC about 0.87 on few rows
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(y, proba[:, 1])
    # 100 resamples, as the small params of the other tests: the noise's p-value is about 0.36 (0.36 with 300 too)
    assert decay_p_value(y, proba, auc + 0.01, "roc_auc", 100, seed=1) > 0.05  # just under the bound: noise
    assert decay_p_value(y, proba, auc + 0.10, "roc_auc", 100, seed=1) == 0.0  # far under it: a real drop
    big_y, big_proba = _scores(200_000, 1.6)
    p = decay_p_value(big_y, big_proba, roc_auc_score(big_y, big_proba[:, 1]) + 0.02, "roc_auc", 20, seed=1)
    assert p == 0.0  # many rows: even a small drop is certain (and only 50,000 rows are resampled)


def test_decay_p_value_follows_the_metric_direction_for_regression():
    rng = np.random.default_rng(3)
    y = rng.normal(0, 1, 400)
    predicted = y + rng.normal(0, 1.0, 400)  # rmse about 1.0
    rmse = float(np.sqrt(np.mean((y - predicted) ** 2)))
    # lower is better: a bound well under the rmse is out of reach, one just under it is within the noise
    assert decay_p_value(y, predicted, rmse - 0.3, "rmse", 200, seed=1, classification=False) == 0.0
    assert decay_p_value(y, predicted, rmse - 0.02, "rmse", 200, seed=1, classification=False) > 0.05


def test_drift_summary_without_evidently_verdicts_uses_each_method_direction():
    """p-value tests drift on a small score, distances on a large one; a missing score is no verdict."""
    def metric(column: str, method: str, threshold: float, value: float) -> dict:
        return {"id": column, "metric_name": f"ValueDrift(column={column},method={method},threshold={threshold})",
                "config": {"type": "evidently:metric_v2:ValueDrift", "column": column, "method": method,
                           "threshold": threshold}, "value": value}

    snapshot = {"metrics": [
        {"id": "n", "metric_name": "DriftedColumnsCount(...)", "config": {"type": "x"}, "value": {"count": 2}},
        metric("ks_calm", "K-S p_value", 0.05, 0.8), metric("ks_drift", "K-S p_value", 0.05, 0.001),
        metric("chi_drift", "chi-square p_value", 0.05, 0.01), metric("wd_calm", "Wasserstein distance (normed)",
                                                                      0.1, 0.02),
        metric("wd_drift", "Wasserstein distance (normed)", 0.1, 0.7), metric("nan", "K-S p_value", 0.05, math.nan)],
        "tests": []}
    summary = drift_summary(snapshot, 0.5)
    assert summary["drifted_columns"] == ["chi_drift", "ks_drift", "wd_drift"]
    assert summary["n_columns"] == 6 and summary["data_drift"] is True
    assert {r["verdict_by"] for c, r in summary["columns"].items() if c != "nan"} == {"direction"}
    assert summary["columns"]["nan"]["score"] is None and "no score" in summary["columns"]["nan"]["note"]


def test_monitoring_before_any_training_says_what_to_run(tmp_path, settings):
    """No champion, no challenger, no training rows: a clear message naming what to run (the CLI exits 2)."""
    with pytest.raises(MonitoringError, match="run the training pipeline first"):
        load_reference(settings, Paths(tmp_path))
