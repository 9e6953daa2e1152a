"""The learners and the ensemble are scikit-learn estimators: clone, get/set_params, Pipeline, cross_val_score,
and the estimator checks that apply to estimators of transformed frames with categorical code columns."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone, is_classifier, is_regressor
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import estimator_checks
from sklearn.utils.validation import check_is_fitted

from pipelines.models import LEARNERS, Ensemble, Learner

TINY = {"lightgbm": {"n_estimators": 8, "min_child_samples": 5}, "xgboost": {"n_estimators": 8},
        "mlp": {"epochs": 3, "hidden": [8], "batch_size": 32}}
TASKS = ("binary", "multiclass", "regression")
CATEGORICAL = {"color": 4}  # code 0 is "unknown", as the transform writes it


def learner(kind: str, task: str = "binary", **params) -> Learner:
    return LEARNERS[kind](task=task, **TINY[kind], **params)


def table(task: str, rows: int = 150, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """A transformed frame (two numeric columns, one categorical code column) and an encoded target."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame({"x1": rng.normal(0, 1, rows), "x2": rng.uniform(0, 10, rows),
                      "color": rng.integers(1, 4, rows)})
    signal = 1.5 * X["x1"] + 0.3 * X["x2"] - 1.5 + 0.8 * (X["color"] == 1) + rng.normal(0, 0.3, rows)
    if task == "binary":
        y = (signal > 0).astype("int64")
    elif task == "multiclass":
        y = np.digitize(signal, [-0.5, 0.7])
    else:
        y = 10 * signal + 50
    return X, np.asarray(y)


@pytest.mark.parametrize("kind", sorted(LEARNERS))
def test_clone_has_equal_params_and_is_unfitted(kind):
    X, y = table("binary")
    original = learner(kind, categorical=CATEGORICAL).fit(X, y)
    copy = clone(original)
    assert copy.get_params() == original.get_params() and copy is not original
    assert copy.categorical is not original.categorical  # params are deep-copied, not shared
    with pytest.raises(NotFittedError):
        check_is_fitted(copy)
    with pytest.raises(NotFittedError):
        copy.predict(X)


@pytest.mark.parametrize("kind", sorted(LEARNERS))
def test_set_params_and_params_as_given(kind):
    est = learner(kind)
    assert est.categorical is None and est.n_classes is None  # stored as given; defaults resolved in fit
    assert est.set_params(learning_rate=0.2, random_state=7) is est
    assert est.get_params()["learning_rate"] == 0.2 and est.random_state == 7
    with pytest.raises(ValueError, match="Invalid parameter"):
        est.set_params(seed=1)  # renamed to random_state


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("kind", sorted(LEARNERS))
def test_fitting_a_clone_predicts_the_same(kind, task):
    X, y = table(task)
    Xv, yv = table(task, 60, seed=1)
    original = learner(kind, task, categorical=CATEGORICAL, random_state=3).fit(X, y, Xv, yv)
    again = clone(original).fit(X, y, Xv, yv)
    np.testing.assert_array_equal(again.predict_output(Xv), original.predict_output(Xv))
    prediction = original.predict(Xv)
    assert prediction.shape == (len(Xv),)
    if task == "regression":
        assert is_regressor(original) and not hasattr(original, "predict_proba")
        np.testing.assert_array_equal(prediction, original.predict_output(Xv))
    else:
        assert is_classifier(original) and set(prediction) <= set(original.classes_)
        np.testing.assert_array_equal(original.classes_, np.arange(3 if task == "multiclass" else 2))
        np.testing.assert_array_equal(prediction, original.predict_proba(Xv).argmax(axis=1))


@pytest.mark.parametrize("kind", sorted(LEARNERS))
def test_save_keeps_the_seed_key_and_load_reads_it(kind, tmp_path):
    X, y = table("multiclass")
    est = learner(kind, "multiclass", categorical=CATEGORICAL, random_state=5).fit(X, y)
    est.save(tmp_path)
    params = json.loads((tmp_path / "learner.json").read_text())["params"]
    assert params["seed"] == 5 and "random_state" not in params
    assert params["categorical"] == CATEGORICAL and params["n_classes"] == 3  # resolved, as before
    loaded = Learner.load(tmp_path)
    assert loaded.random_state == 5 and loaded.n_features_in_ == 3
    np.testing.assert_allclose(loaded.predict_proba(X), est.predict_proba(X), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(loaded.predict(X), est.predict(X))


def test_classifier_refuses_labels_that_are_not_class_indices():
    X, y = table("binary")
    with pytest.raises(ValueError, match="class indices 0..1"):
        learner("lightgbm").fit(X, y + 1)


def test_learners_in_a_pipeline_and_cross_validated():
    X, y = table("binary", 240)
    # a plain numeric array through a scaler (no categorical columns)
    pipe = make_pipeline(StandardScaler(), learner("lightgbm")).fit(X[["x1", "x2"]].to_numpy(), y)
    assert (pipe.predict(X[["x1", "x2"]].to_numpy()) == y).mean() > 0.8
    # the frame with its categorical column; classifiers get stratified folds and accuracy
    scores = cross_val_score(learner("xgboost", categorical=CATEGORICAL), X, y, cv=3)
    assert scores.shape == (3,) and scores.mean() > 0.7
    Xr, yr = table("regression", 240)
    r2 = cross_val_score(learner("lightgbm", "regression", categorical=CATEGORICAL, learning_rate=0.3), Xr, yr, cv=3)
    assert r2.mean() > 0.5  # R², the regressor's score


def ensemble(task: str = "binary", **params) -> Ensemble:
    return Ensemble([learner("lightgbm", task, categorical=CATEGORICAL), learner("mlp", task, categorical=CATEGORICAL)],
                    **params)


def test_ensemble_clone_get_and_set_params():
    X, y = table("binary")
    Xv, yv = table("binary", 60, seed=1)
    ens = ensemble(method="blending", random_state=2).fit(X, y, Xv, yv)
    copy = clone(ens)
    assert copy.learners is not ens.learners and copy.learners[0] is not ens.learners[0]
    assert [lr.get_params() for lr in copy.learners] == [lr.get_params() for lr in ens.learners]
    assert {k: v for k, v in copy.get_params().items() if k != "learners"} == \
        {k: v for k, v in ens.get_params().items() if k != "learners"}
    with pytest.raises(NotFittedError):
        check_is_fitted(copy)
    assert not any(hasattr(lr, "booster_") or hasattr(lr, "net_") for lr in ens.learners)  # members_ are fitted
    np.testing.assert_array_equal(copy.fit(X, y, Xv, yv).predict_proba(Xv), ens.predict_proba(Xv))
    assert copy.set_params(method="stacking", folds=2) is copy and copy.method == "stacking"
    assert ens.get_params(deep=True)["random_state"] == 2


def test_ensemble_keeps_the_seed_key_on_disk(tmp_path):
    X, y = table("multiclass")
    ens = ensemble("multiclass", method="averaging", random_state=4).fit(X, y)
    assert is_classifier(ens) and ens.member_valid_log_loss_ == {}  # no validation rows given
    ens.save(tmp_path)
    assert json.loads((tmp_path / "ensemble.json").read_text())["seed"] == 4
    loaded = Ensemble.load(tmp_path)
    assert loaded.random_state == 4
    np.testing.assert_array_equal(loaded.predict(X), ens.predict(X))


def test_ensemble_cross_validated_and_blending_needs_validation_rows():
    X, y = table("regression", 200)
    est = ensemble("regression", method="stacking", folds=2)
    assert is_regressor(est) and not hasattr(est, "predict_proba")
    assert cross_val_score(est, X, y, cv=2).mean() > 0.3
    with pytest.raises(ValueError, match="blending fits its weights on validation rows"):
        ensemble(method="blending").fit(*table("binary"))


API_CHECKS = [
    "check_estimator_cloneable", "check_estimator_tags_renamed", "check_valid_tag_types", "check_estimator_repr",
    "check_no_attributes_set_in_init", "check_parameters_default_constructible", "check_get_params_invariance",
    "check_set_params", "check_do_not_raise_errors_in_init_or_set_params", "check_mixin_order",
    "check_fit_score_takes_y", "check_estimators_fit_returns_self", "check_estimators_overwrite_params",
    "check_dont_overwrite_parameters", "check_estimators_unfitted", "check_fit_check_is_fitted",
    "check_n_features_in", "check_n_features_in_after_fitting", "check_fit2d_predict1d", "check_fit2d_1sample",
    "check_methods_subset_invariance", "check_dict_unchanged", "check_estimators_dtypes",
]
ESTIMATORS = {  # the checks feed numeric arrays: 3-class blobs to classifiers, continuous targets to regressors
    **{f"{kind}-{task}": (lambda kind=kind, task=task: learner(kind, task))
       for kind in sorted(LEARNERS) for task in ("multiclass", "regression")},
    "ensemble-multiclass": lambda: Ensemble([learner("lightgbm", "multiclass"), learner("mlp", "multiclass")],
                                            method="averaging"),
}


@pytest.mark.parametrize("name", ESTIMATORS)
def test_sklearn_estimator_checks(name):
    est = ESTIMATORS[name]()
    for check in API_CHECKS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            getattr(estimator_checks, check)(type(est).__name__, est)
    if name.endswith("regression"):
        estimator_checks.check_regressor_data_not_an_array(type(est).__name__, est)
    else:
        estimator_checks.check_classifier_data_not_an_array(type(est).__name__, est)
        if not name.startswith("mlp"):  # a few epochs of an MLP do not reach the check's accuracy on blobs
            estimator_checks.check_classifiers_train(type(est).__name__, est)


@pytest.mark.parametrize("task", TASKS)
def test_xgboost_predicts_from_an_array_what_a_categorical_frame_gives(task):
    """Scoring goes in place from a float32 array (a tenth of the time of a pandas DMatrix for a small batch): the
    same numbers, for category codes out of range, fractional or missing too; columns out of order are refused."""
    import xgboost as xgb

    from pipelines.models.base import as_output

    X, y = table(task, rows=200)
    model = learner("xgboost", task, categorical=CATEGORICAL).fit(X, y)
    odd = X.astype({"color": "float64"}).copy()
    odd.loc[::5, "color"] = [-1.0, 4.0, 7.0, 1.5, np.nan, 0.0, 2.0, 3.0] * 5
    odd.loc[::11, "x1"] = np.nan
    expected = model.booster_.predict(xgb.DMatrix(model._categorized(odd), enable_categorical=True))
    assert np.array_equal(model._output(odd), as_output(expected, task))
    with pytest.raises(ValueError, match="not those it was trained on"):
        model._output(odd[["x2", "color", "x1"]])
