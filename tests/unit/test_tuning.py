"""Budgeted, seeded random search: never worse than the configured parameters on validation, reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.config import SearchRange, TuningConfig
from pipelines.stages.train import build_learners
from pipelines.tuning import sample, tune


def test_sampling_respects_ranges_and_seed():
    space = {"a": SearchRange(low=0.01, high=0.2, scale="log"), "b": SearchRange(low=3, high=9, scale="int")}
    draws = [sample(space, np.random.default_rng([1, 0, k])) for k in range(200)]
    assert all(0.01 <= d["a"] <= 0.2 and 3 <= d["b"] <= 9 and isinstance(d["b"], int) for d in draws)
    assert {d["b"] for d in draws} == set(range(3, 10))
    assert draws[5] == sample(space, np.random.default_rng([1, 0, 5]))


@pytest.mark.slow  # two searches of 4 LightGBM trials
def test_tuning_keeps_the_best_trial_and_is_reproducible(data):
    settings, transform, X, y, Xv, yv = data
    cfg = TuningConfig(trials=4, time_budget_s=600, space={"lightgbm": {
        "learning_rate": SearchRange(low=0.02, high=0.3, scale="log"),
        "num_leaves": SearchRange(low=4, high=64, scale="int")}})
    learners = [lr for lr in build_learners(settings, transform) if lr.kind in ("lightgbm", "mlp")]
    tuned, report = tune(learners, cfg, settings.seed, X, y, Xv, yv)
    assert list(report) == ["lightgbm"]  # the MLP has no search space here: left as configured
    assert tuned[1] is learners[1]
    lgb = report["lightgbm"]
    assert len(lgb["trials"]) == 4 and lgb["trials"][0]["params"] == {}  # trial 0: the configured params
    assert lgb["best_valid_log_loss"] == min(t["valid_log_loss"] for t in lgb["trials"])
    assert lgb["best_valid_log_loss"] <= lgb["baseline_valid_log_loss"]
    assert {k: tuned[0].get_params()[k] for k in lgb["best_params"]} == lgb["best_params"]

    again, report_again = tune(learners, cfg, settings.seed, X, y, Xv, yv)
    assert report_again["lightgbm"]["trials"] == lgb["trials"]


def test_time_budget_stops_the_search(data):
    settings, transform, X, y, Xv, yv = data
    cfg = TuningConfig(trials=50, time_budget_s=0.001, space={"lightgbm": {
        "num_leaves": SearchRange(low=4, high=64, scale="int")}})
    learner = next(lr for lr in build_learners(settings, transform) if lr.kind == "lightgbm")
    _, report = tune([learner], cfg, settings.seed, X, y, Xv, yv)
    assert 1 <= len(report["lightgbm"]["trials"]) < 50
