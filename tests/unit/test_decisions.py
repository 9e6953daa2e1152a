"""Decisions for the gate's metric: multiclass labels by class weights picked on validation rows, and an
ensemble that never serves a blend worse than its best member on that metric."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines.bundle import ModelBundle
from pipelines.config import ROW_KEY, Paths, load_settings
from pipelines.metrics import choose_class_weights, decision_of, labels_of, score
from pipelines.stages import evaluate, prepare, train
from tests.tables import params_for

SHARES = [0.34, 0.22, 0.14, 0.10, 0.08, 0.07, 0.05]  # 7 classes, imbalanced


def seven_classes(rows: int, seed: int) -> pd.DataFrame:
    """An imbalanced 7-class table: each class a direction in 4 numeric columns and a category, noisy."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (rows, 4))
    color = rng.choice(["Red", "Green", "Blue"], rows)
    weights = np.random.default_rng(99).normal(0, 1.0, (4, 7))
    logits = x @ weights + np.log(SHARES) + 0.6 * (color == "Red")[:, None] * np.arange(7) / 7
    label = np.argmax(logits + rng.gumbel(0, 1, (rows, 7)), axis=1)
    return pd.DataFrame({"x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2], "x4": x[:, 3], "color": color,
                         "day": pd.Timestamp("2026-03-01") + pd.to_timedelta(np.arange(rows) * 600, unit="s"),
                         "label": [f"c{k}" for k in label], ROW_KEY: np.arange(rows)})


def test_class_weights_make_argmax_predict_the_rare_classes_when_f1_macro_rewards_it():
    rng = np.random.default_rng(0)
    y = rng.choice(3, 600, p=[0.7, 0.2, 0.1])
    proba = np.full((600, 3), 0.1)
    proba[:, 0] = 0.6  # the majority class always has the highest probability...
    proba[np.arange(600), y] += 0.25  # ...but the true class gets a margin the argmax never sees
    proba /= proba.sum(axis=1, keepdims=True)
    assert set(labels_of(proba)) == {0}
    chosen = choose_class_weights(y, proba, "f1_macro")
    weights = tuple(chosen["class_weights"])
    assert set(labels_of(proba, weights)) == {0, 1, 2}
    assert score("f1_macro", y, proba, weights) > score("f1_macro", y, proba) + 0.3
    assert chosen["value_on_valid"] == pytest.approx(score("f1_macro", y, proba, weights), abs=1e-6)
    assert choose_class_weights(y, proba, "log_loss")["class_weights"] == [1.0, 1.0, 1.0]  # reads no labels


def test_a_blend_worse_than_its_best_member_is_not_served(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_for("multiclass")))
    settings = load_settings(tmp_path / "params.yaml")
    rng = np.random.default_rng(1)
    y = rng.choice(3, 300)
    good = np.eye(3)[y] * 0.6 + 0.4 / 3  # always right
    bad = np.roll(good, 1, axis=1)  # always wrong
    members = np.stack([bad, good], axis=1)
    blend = 0.7 * bad + 0.3 * good  # what a blend fitted for another objective could give
    found = train.check_combination(settings, "multiclass", y, blend, members, ["lightgbm", "xgboost"])
    assert found["served"] == "xgboost" and found["valid"]["xgboost"] == 1.0 > found["valid"]["ensemble"]
    kept = train.check_combination(settings, "multiclass", y, good, members, ["lightgbm", "xgboost"])
    assert kept["served"] == "ensemble"  # a tie keeps the blend


@pytest.mark.slow
def test_seven_imbalanced_classes_every_common_class_predicted_and_no_member_better(tmp_path):
    """Issue 29: on a 944-row 7-class table the ensemble's f1_macro was 0.281, below its LightGBM (0.324) and
    XGBoost (0.348) members, and classes 2-4 were never predicted. Here the default learners and ensemble on 6,000
    rows (900 test rows: on 300, members' test f1_macro spread over 0.1 by noise alone, measured)."""
    table = seven_classes(6000, seed=3)
    params = params_for("multiclass", **{
        "schema.numeric": {c: {"reference": [-5, 5]} for c in ("x1", "x2", "x3", "x4")},
        "schema.categorical": {"color": ["Red", "Green", "Blue"]},
        "train.learners": ["lightgbm", "xgboost", "mlp"], "train.ensemble": "blending",
        "promote.metric": "f1_macro", "evaluate.slices": []})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    settings, paths = load_settings(tmp_path / "params.yaml"), Paths(tmp_path)
    paths.validated.mkdir(parents=True)
    table.to_parquet(paths.validated_rows)
    prepare.run(settings, paths)
    train.run(settings, paths)
    evaluate.run(settings, paths)
    metrics = json.loads(paths.metrics.read_text())

    bundle = ModelBundle.load(paths.trained)
    combination = bundle.metadata["combination"]
    valid = pd.read_parquet(paths.split_rows("valid"))
    y_valid = bundle.transform.encode_target(valid["label"])
    served_valid = score("f1_macro", y_valid, bundle.predict(valid), bundle.decision)
    assert served_valid == pytest.approx(combination["valid"][combination["served"]])  # what serving does
    members = bundle.ensemble.member_predictions(bundle.transform.transform(valid))
    for i, name in enumerate(bundle.ensemble.names):  # each member with its own decision, picked on valid
        own = decision_of(train.pick_threshold(settings, "multiclass", y_valid, members[:, i]))
        assert served_valid >= score("f1_macro", y_valid, members[:, i], own) - 1e-9, name
    test = pd.read_parquet(paths.test_rows)
    output = bundle.predict(test)
    y_test = bundle.transform.encode_target(test["label"])
    served_test = score("f1_macro", y_test, output, bundle.decision)
    assert served_test == pytest.approx(metrics["f1_macro"])
    tested = bundle.ensemble.member_predictions(bundle.transform.transform(test))
    on_test = {name: score("f1_macro", y_test, tested[:, i], decision_of(train.pick_threshold(
        settings, "multiclass", y_valid, members[:, i]))) for i, name in enumerate(bundle.ensemble.names)}
    assert served_test >= max(on_test.values()) - 0.005, (served_test, on_test)  # the test rows too
    common = {c for c, n in table["label"].value_counts().items() if n >= 0.05 * len(table)}
    assert common <= set(bundle.labels(output)), sorted(common - set(bundle.labels(output)))
    explained = json.loads(paths.explain_report.read_text())  # the global explanation, per class, and its plot data
    assert explained["rows"] == len(test) and set(explained["per_class"]) == {str(c) for c in bundle.classes}
    assert set(explained["mean_abs_contribution"]) == {"x1", "x2", "x3", "x4", "color"}
    assert list(pd.read_csv(paths.explain_plot)["column"])[0] == max(explained["mean_abs_contribution"],
                                                                     key=explained["mean_abs_contribution"].get)
