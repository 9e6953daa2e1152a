"""The monitoring decision: which findings mean "retrain", and the significance of a performance drop."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.config import load_settings
from pipelines.report import decay_p_value, decide
from tests.conftest import amaas, write_params

CALM = {"data_drift": False, "drift_share": 0.08, "n_drifted": 1, "n_columns": 13, "drifted_columns": ["age"],
        "prediction_drift": 0.03, "labeled_rows": 4000, "metric_current": 0.78, "metric_reference": 0.79,
        "decay_p_value": None}


@pytest.fixture
def settings(tmp_path):
    return load_settings(write_params(tmp_path))


def _scores(n: int, separation: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(int)
    return y, 1 / (1 + np.exp(-(rng.normal(0, 1, n) + separation * y)))


def test_calm_findings_need_no_retraining(settings):
    assert decide(settings, CALM) == []


def test_each_finding_is_a_reason_in_words(settings):
    reasons = decide(settings, {**CALM, "data_drift": True, "drift_share": 0.46, "n_drifted": 6,
                                "drifted_columns": ["credit_score", "income"], "prediction_drift": 0.4,
                                "metric_current": 0.70, "decay_p_value": 0.0})
    assert [r.split(":")[0] for r in reasons] == ["data drift", "prediction drift", "performance decay"]
    assert "credit_score, income" in reasons[0] and "0.400" in reasons[1] and "0.0900 under" in reasons[2]


def test_a_drop_that_is_not_significant_is_no_decay(settings):
    assert decide(settings, {**CALM, "metric_current": 0.75, "decay_p_value": 0.2}) == []


def test_decay_p_value_tells_noise_from_a_real_drop():
    y, proba = _scores(600, 1.6)  # ROC-AUC about 0.87 on few rows
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(y, proba)
    assert decay_p_value(y, proba, auc + 0.01, "roc_auc", 300, seed=1) > 0.05  # just under the bound: noise
    assert decay_p_value(y, proba, auc + 0.10, "roc_auc", 300, seed=1) == 0.0  # far under it: a real drop
    big_y, big_proba = _scores(200_000, 1.6)
    p = decay_p_value(big_y, big_proba, roc_auc_score(big_y, big_proba) + 0.02, "roc_auc", 50, seed=1)
    assert p == 0.0  # many rows: even a small drop is certain (and only 50,000 rows are resampled)


def test_monitoring_before_any_training_says_what_to_run(tmp_path):
    write_params(tmp_path)
    for stage in ("collect", "validate"):
        assert amaas(stage, root=tmp_path).returncode == 0
    failed = amaas("report", root=tmp_path, check=False)
    assert failed.returncode == 2 and "run the training pipeline first" in failed.stderr
