"""Splits, metrics, the cut-off and the first-champion rule on small tables of every task."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines.config import ConfigError, load_settings
from pipelines.metrics import choose_threshold, improvement, paired_bootstrap, score
from pipelines.stages import promote
from pipelines.stages.prepare import SplitError, duplicates_of, split_rows
from tests.tables import make_table, params_for


def _settings(tmp_path, task: str, **overrides):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_for(task, **overrides)))
    return load_settings(tmp_path / "params.yaml")


@pytest.mark.parametrize("how", ["time", "random"])
def test_every_class_lands_in_every_split_even_a_rare_one(tmp_path, how):
    schema = _settings(tmp_path, "multiclass").data_schema
    table = make_table("multiclass", 300, seed=1)
    table["_row_key"] = np.arange(len(table))
    assert (table["label"] == "extreme").sum() == 12  # 4%: stratified, it reaches valid and test too
    splits = split_rows(table, schema, how, 0.15, 0.15, seed=0)
    assert sum(len(s) for s in splits.values()) == len(table)
    for name, rows in splits.items():
        assert set(rows["label"]) == {"low", "mid", "high", "extreme"}, name
    if how == "time":  # within each class, no look-ahead: train rows are older than test rows
        for label in table["label"].unique():
            last_train = splits["train"].loc[splits["train"]["label"] == label, "day"].max()
            assert (splits["test"].loc[splits["test"]["label"] == label, "day"] >= last_train).all()


def test_time_split_keeps_the_newest_rows_for_test_and_moves_only_what_a_class_needs(tmp_path):
    schema = _settings(tmp_path, "multiclass").data_schema
    table = make_table("multiclass", 300, seed=4).sort_values("day").reset_index(drop=True)
    table["_row_key"] = np.arange(len(table))
    table.loc[table["label"] == "extreme", "label"] = "mid"
    table.loc[[3, 10, 20, 30], "label"] = "extreme"  # a class seen only in the oldest rows
    splits = split_rows(table, schema, "time", 0.15, 0.15, seed=0)
    assert [len(splits[n]) for n in ("train", "valid", "test")] == [208, 46, 46]  # two rows moved
    for name, rows in splits.items():
        assert "extreme" in set(rows["label"]), name
    # the other classes keep the plain time split: the test rows are the newest ones but for the moved rows
    moved = splits["test"]["label"] == "extreme"
    assert splits["test"].loc[~moved, "day"].min() >= splits["train"]["day"].max()
    assert set(splits["train"].loc[splits["train"]["label"] == "extreme", "_row_key"]) == {3, 10}


def test_a_class_too_rare_to_split_stops_with_the_counts(tmp_path):
    schema = _settings(tmp_path, "multiclass").data_schema
    table = make_table("multiclass", 200, seed=2)
    table.loc[table.index[:2], "label"] = "unicorn"
    table = table[(table["label"] != "extreme")]
    with pytest.raises(SplitError, match=r"'unicorn' \(2 rows\).*class counts: .*unicorn: 2"):
        split_rows(table, schema, "time", 0.15, 0.15, seed=0)


def test_duplicate_rows_of_train_are_found_whatever_their_id():
    train = pd.DataFrame({"a": [1.0, 2.0, None], "c": ["x", "y", None], "label": [0, 1, 1]})
    test = pd.DataFrame({"a": [1.0, 2.0, None, 9.0], "c": ["x", "y", None, "x"], "label": [0, 0, 1, 1]})
    assert duplicates_of(test, train, ["a", "c", "label"]).tolist() == [True, False, True, False]


def test_metric_direction_and_undefined_metrics():
    assert improvement("rmse", 1.0, 2.0) == 1.0 and improvement("roc_auc", 0.7, 0.8) == pytest.approx(-0.1)
    one_class = np.zeros(5, dtype=int)
    proba = np.column_stack([np.full(5, 0.7), np.full(5, 0.3)])
    assert score("roc_auc", one_class, proba) is None  # never NaN
    assert score("accuracy", one_class, proba) == 1.0
    assert score("r2", np.ones(3), np.ones(3)) is None


def test_regression_gate_prefers_lower_error():
    rng = np.random.default_rng(0)
    y = rng.normal(0, 1, 500)
    stats = paired_bootstrap("rmse", y, y + rng.normal(0, 1, 500), y + rng.normal(0, 0.3, 500), 200, seed=0,
                             classification=False)
    assert stats["gain"] > 0.5 and stats["p_value"] == 0.0


def test_threshold_auto_maximizes_f1_or_minimizes_cost():
    rng = np.random.default_rng(1)
    y = (rng.random(2000) < 0.13).astype(int)
    p = np.clip(0.08 + 0.3 * y + rng.normal(0, 0.12, 2000), 0, 1)
    f1 = choose_threshold(y, p)
    cost = choose_threshold(y, p, (1.0, 5.0))
    at_half = score("f1", y, np.column_stack([1 - p, p]), 0.5)
    assert f1["value_on_valid"] > at_half  # the default 0.5 misses most positives here
    assert score("f1", y, np.column_stack([1 - p, p]), f1["threshold"]) == pytest.approx(f1["value_on_valid"],
                                                                                       abs=1e-6)
    assert cost["threshold"] < f1["threshold"]  # a missed positive costs 5: cut lower, flag more


def test_first_champion_needs_a_defined_metric_that_reaches_the_floor():
    assert not promote.first_champion("roc_auc", None, None)["promoted"]
    assert not promote.first_champion("roc_auc", 0.55, 0.6)["promoted"]
    assert promote.first_champion("rmse", 3.0, 4.0)["promoted"]  # lower is better: 3 reaches a floor of 4
    assert not promote.first_champion("rmse", 5.0, 4.0)["promoted"]


def test_config_refuses_what_does_not_fit_the_task(tmp_path):
    with pytest.raises(ConfigError, match="promote.metric roc_auc does not apply to task regression"):
        _settings(tmp_path, "regression", **{"promote.metric": "roc_auc"})
    with pytest.raises(ConfigError, match="threshold: auto applies to task binary only"):
        _settings(tmp_path, "multiclass", **{"evaluate.threshold": "auto"})
    params = params_for("binary")
    params["schema"]["classes"] = ["low", "mid", "high"]
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match="task binary needs exactly 2 classes.*set schema.task: multiclass"):
        load_settings(tmp_path / "params.yaml")


def test_binary_target_with_three_labels_says_what_to_change(tmp_path):
    from pipelines.transform import FeatureTransform

    settings = _settings(tmp_path, "binary")
    table = make_table("binary", 100, seed=3)
    table["label"] = np.resize(["low", "mid", "high"], len(table))
    with pytest.raises(ValueError, match="must have 2 classes for task binary; set schema.task: multiclass for 3 "
                                         "classes found: high, low, mid"):
        FeatureTransform.fit(table, settings.data_schema, settings.clean)
