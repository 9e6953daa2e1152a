"""Explanations: base + contributions = the answer for every task and every model that can serve (the ensemble
blended or stacked, the student, the int8 copy); a column no model reads gets exactly 0; tree contributions keep
the signs of the boosters' own tree SHAP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipelines.bundle import ModelBundle
from pipelines.compression import quantized
from pipelines.config import load_settings
from pipelines.explain import attribution_drift, column_groups, explain
from pipelines.models import Ensemble, LightGBMLearner, MLPLearner, XGBoostLearner
from pipelines.stages import report
from pipelines.transform import FeatureTransform
from tests.conftest import write_params
from tests.unit.test_compress import SCHEMAS, _table

TASKS = list(SCHEMAS)


def _params(task: str) -> dict[str, Any]:
    """params.yaml for the small table of test_compress with a constant column `flat`."""
    spec = SCHEMAS[task]
    schema = {"task": task, "target": spec["target"], "id_column": None, "time_column": None,
              "classes": spec.get("classes"),
              "numeric": {"size": {"min": 0, "max": 100}, "weight": {"min": 0, "max": 200, "nullable": True},
                          "flat": {"min": 0, "max": 10}},
              "categorical": {"region": ["North", "South", "East"], "colour": {"values": ["Red", "Blue"],
                                                                               "nullable": True}}}
    return {"source.kind": "files", "schema": schema, "evaluate.slices": [], "prepare.split": "random",
            "promote.metric": spec["metric"]}


def _fitted(task: str, root: Path) -> dict[str, Any]:
    """A transform and every kind of model that can serve, on a small table with a constant column `flat`."""
    spec = SCHEMAS[task]
    settings = load_settings(write_params(root, **_params(task)))
    table = _table(700).assign(flat=3.0)
    train, valid, test = table.iloc[:400], table.iloc[400:550], table.iloc[550:]
    transform = FeatureTransform.fit(train, settings.data_schema, settings.clean)
    X, Xv = transform.transform(train), transform.transform(valid)
    y, yv = (transform.encode_target(t[spec["target"]]) for t in (train, valid))
    common = {"categorical": transform.cardinalities, "task": task, "n_classes": len(transform.classes or ()),
              "random_state": 0}

    def learners() -> list[Any]:
        return [LightGBMLearner(**common, n_estimators=40), XGBoostLearner(**common, n_estimators=40),
                MLPLearner(**common, epochs=4)]

    blended = Ensemble(learners(), "blending").fit(X, y, Xv, yv)
    stacked = Ensemble(learners(), "stacking", folds=2).fit(X, y, Xv, yv)
    student = LightGBMLearner(**common, n_estimators=30).distill(X, blended.predict_output(X))
    mlp_student = MLPLearner(**common, epochs=4).distill(X, blended.predict_output(X))
    models = {"blending": blended, "stacking": stacked, "student": Ensemble.of_fitted([student], ["student"]),
              "mlp_student": Ensemble.of_fitted([mlp_student], ["student_mlp"]),
              "int8": quantized(blended), "int8_stacking": quantized(stacked)}
    return {"transform": transform, "models": models, "rows": test.drop(columns=[spec["target"]]),
            "settings": settings, "train": train.drop(columns=[spec["target"]])}


@pytest.fixture(scope="module", params=TASKS)
def fitted(request, tmp_path_factory) -> dict[str, Any]:
    return {"task": request.param, **_fitted(request.param, tmp_path_factory.mktemp(request.param))}


@pytest.mark.parametrize("model", ["blending", "stacking", "student", "mlp_student", "int8", "int8_stacking"])
def test_base_plus_contributions_is_the_answer(fitted, model):
    transform, ensemble, rows = fitted["transform"], fitted["models"][model], fitted["rows"]
    found = explain(transform, ensemble, rows)
    answer = ensemble.predict_output(transform.transform(rows)).reshape(len(rows), -1)
    total = found.base + found.contributions.sum(axis=1)
    np.testing.assert_allclose(total, answer, rtol=1e-6, atol=1e-12)
    assert found.columns == ["size", "weight", "flat", "region", "colour"]
    assert found.contributions.shape == (len(rows), 5, 1 if fitted["task"] == "regression" else answer.shape[1])
    assert np.ptp(found.base, axis=0).max() < 1e-9  # one base value for every row
    assert np.abs(found.contributions).sum(axis=(0, 2)).min() == 0  # flat: read by no model
    assert (np.abs(found.contributions[:, found.columns.index("size")]).mean() >
            np.abs(found.contributions[:, found.columns.index("colour")]).mean())  # the signal is in size


def test_a_column_no_model_reads_gets_zero_in_every_row(fitted):
    for name, ensemble in fitted["models"].items():
        found = explain(fitted["transform"], ensemble, fitted["rows"])
        assert (found.contributions[:, found.columns.index("flat")] == 0).all(), name


def test_tree_contributions_keep_the_signs_of_the_boosters_tree_shap(fitted):
    if fitted["task"] != "binary":
        pytest.skip("the binary margin is one number: its signs are the probability's")
    transform, rows = fitted["transform"], fitted["rows"]
    member = fitted["models"]["blending"].members_[0]
    X = transform.transform(rows)
    raw = member.booster_.predict(X.to_numpy(dtype="float64"), pred_contrib=True)[:, :-1]
    _, groups = column_groups(transform)
    margin = raw @ groups
    found = explain(transform, Ensemble.of_fitted([member], ["lightgbm"]), rows)
    positive = found.contributions[:, :, 1]
    assert np.array_equal(np.sign(positive[np.abs(margin) > 1e-12]), np.sign(margin[np.abs(margin) > 1e-12]))
    np.testing.assert_allclose(found.base[:, 1], 1 / (1 + np.exp(-raw_bias(member, X))), rtol=1e-9)


def raw_bias(member: LightGBMLearner, X: pd.DataFrame) -> np.ndarray:
    """The booster's expected margin (tree SHAP's bias term)."""
    return member.booster_.predict(X.to_numpy(dtype="float64"), pred_contrib=True)[:, -1]


def test_the_bundle_answers_with_the_explanation(fitted, tmp_path):
    transform, ensemble, rows = fitted["transform"], fitted["models"]["student"], fitted["rows"].head(3)
    bundle = ModelBundle(transform, ensemble, {"version": "v1"})
    answers = bundle.explained(rows)
    plain = bundle.answers(rows)
    for answer, same in zip(answers, plain, strict=True):
        explanation = answer.pop("explanation")
        assert answer == same
        if fitted["task"] == "regression":
            assert explanation["base"] + sum(explanation["contributions"].values()) == pytest.approx(same["value"])
        else:
            for name, p in same["probabilities"].items():
                total = explanation["base"][name] + sum(explanation["contributions"][name].values())
                assert total == pytest.approx(p, rel=1e-6)
            assert set(explanation["contributions"][name]) == {"size", "weight", "flat", "region", "colour"}


@pytest.mark.parametrize("model", ["blending", "student"])
def test_attribution_drift_flags_a_column_switched_off_and_not_an_iid_batch(fitted, model):
    """The champion's ranking of columns by mean |contribution|, reference rows against a new batch: a batch where
    `size` no longer varies (a source that sends one value: its effect on the label is gone) moves it past the
    threshold and names `size`; a fresh batch of the same table does not."""
    if fitted["task"] != "binary":
        pytest.skip("one task is enough: the ranking is over columns, summed over classes")
    settings, transform = fitted["settings"], fitted["transform"]
    bundle = ModelBundle(transform, fitted["models"][model], {"version": "v1"})
    iid = _table(300, seed=5).assign(flat=3.0)
    off = iid.assign(size=float(fitted["train"]["size"].mean()))
    calm = report.attribution_drift_report(settings, iid, fitted["train"], bundle)
    moved = report.attribution_drift_report(settings, off, fitted["train"], bundle)
    threshold = settings.report.attribution_drift_threshold
    assert calm["attribution_drift"] < threshold and not calm["attribution_drift_detected"], calm
    assert moved["attribution_drift"] >= threshold and moved["attribution_drift_detected"], moved
    assert moved["attribution_drift_columns"][0] == "size"
    assert moved["attribution_rows"] == {"reference": 400, "current": 300}
    reasons = report.decide(settings, {**moved, "data_drift": False, "prediction_drift": None,
                                       "metric_current": None, "metric_reference": None})
    assert len(reasons) == 1 and reasons[0].startswith("attribution drift") and "size" in reasons[0]


def test_attribution_drift_samples_at_most_explain_rows(fitted, tmp_path):
    if fitted["task"] != "regression":
        pytest.skip("one task is enough")
    settings = load_settings(write_params(tmp_path, **_params("regression"), **{"report.explain_rows": 50}))
    bundle = ModelBundle(fitted["transform"], fitted["models"]["student"], {"version": "v1"})
    found = report.attribution_drift_report(settings, fitted["rows"], fitted["train"], bundle)
    assert found["attribution_rows"] == {"reference": 50, "current": 50}
    assert report.attribution_drift_report(settings, fitted["rows"], fitted["train"], None)["attribution_note"]


def test_attribution_drift_is_a_rank_measure_that_weighs_the_top_columns_most():
    ranked = {f"c{i}": 10.0 - i for i in range(10)}
    assert attribution_drift(ranked, {c: 3 * v for c, v in ranked.items()}, 10)["attribution_drift"] == 0  # scale
    swapped = {**ranked, "c0": ranked["c1"], "c1": ranked["c0"]}
    fallen = {**ranked, "c0": ranked["c2"] - 0.5}
    tail = {**ranked, "c8": ranked["c9"], "c9": ranked["c8"]}
    drift = {name: attribution_drift(ranked, moved, 10) for name, moved in
             (("swapped", swapped), ("fallen", fallen), ("tail", tail))}
    assert drift["tail"]["attribution_drift"] < 0.001
    assert drift["swapped"]["attribution_drift"] == pytest.approx(0.12, abs=0.01)
    assert drift["fallen"]["attribution_drift"] == pytest.approx(0.18, abs=0.01)
    assert drift["fallen"]["attribution_drift_columns"] == ["c0"]


def test_an_mlp_whose_categories_are_listed_in_another_order_than_its_columns_is_explained(fitted):
    """The MLP takes the codes in the order of its `categorical` mapping, which need not be the columns' (a table
    from `amaas init` had them apart: the explanation once fed each embedding another column's codes)."""
    transform, rows = fitted["transform"], fitted["rows"]
    X = transform.transform(fitted["train"])
    soft = fitted["models"]["blending"].predict_output(X)
    task = fitted["task"]
    reordered = dict(reversed(list(transform.cardinalities.items())))
    assert list(reordered) != [c for c in X.columns if c in reordered]
    mlp = MLPLearner(categorical=reordered, task=task, n_classes=len(transform.classes or ()), random_state=0,
                     epochs=2).distill(X, soft)
    from pipelines.explain import _mlp_forward

    encoded = transform.transform(rows)
    # the function the permutations evaluate is the model's own (a final correction would hide the difference)
    np.testing.assert_allclose(_mlp_forward(mlp, list(encoded.columns))(encoded.to_numpy(dtype="float64")),
                               mlp.predict_output(encoded).reshape(len(rows), -1), rtol=1e-5, atol=1e-6)
    ensemble = Ensemble.of_fitted([mlp], ["student_mlp"])
    found = explain(transform, ensemble, rows)
    answer = ensemble.predict_output(encoded).reshape(len(rows), -1)
    np.testing.assert_allclose(found.base + found.contributions.sum(axis=1), answer, rtol=1e-6, atol=1e-12)
