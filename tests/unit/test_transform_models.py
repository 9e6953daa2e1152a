import numpy as np
import pandas as pd
import pytest

from pipelines.models import LEARNERS, Ensemble, Learner, build_learners, resolve_device
from pipelines.transform import UNKNOWN, FeatureTransform


def test_transform_normalizes_and_handles_unknowns(data, tmp_path):
    _, transform, *_ = data
    rows = pd.DataFrame([{c: 1.0 for c in transform.numeric} | {"home_ownership": " RENT ", "purpose": "crypto",
                                                                "region": None}])
    out = transform.transform(rows)
    assert out.loc[0, "home_ownership"] == transform.vocab["home_ownership"].index("rent") + 1
    assert out.loc[0, "purpose"] == UNKNOWN and out.loc[0, "region"] == UNKNOWN
    transform.save(tmp_path / "t.json")
    pd.testing.assert_frame_equal(FeatureTransform.load(tmp_path / "t.json").transform(rows), out)


def test_transform_rejects_missing_feature(data):
    _, transform, *_ = data
    with pytest.raises(KeyError, match="credit_score"):
        transform.transform(pd.DataFrame({"age": [30]}))


@pytest.mark.parametrize("kind", sorted(LEARNERS))
def test_learner_fit_predict_save_load(kind, data, tmp_path):
    settings, transform, X, y, Xv, yv = data
    learner = next(lr for lr in build_learners(settings, transform) if lr.kind == kind)
    assert learner.fit(X, y, Xv, yv) is learner
    proba = learner.predict_proba(Xv)
    assert proba.shape == (len(Xv), 2) and np.allclose(proba.sum(axis=1), 1)
    assert ((proba[:, 1] > 0.5) == yv).mean() > 0.8
    learner.save(tmp_path / kind)
    loaded = Learner.load(tmp_path / kind)
    np.testing.assert_allclose(loaded.predict_proba(Xv), proba, rtol=1e-6, atol=1e-7)
    assert learner.device_ == "cpu"  # no GPU here: the CPU fallback


def test_learner_is_reproducible(data):
    settings, transform, X, y, Xv, yv = data
    a, b = (build_learners(settings, transform)[2].fit(X, y, Xv, yv) for _ in range(2))
    np.testing.assert_array_equal(a.predict_proba(Xv), b.predict_proba(Xv))


@pytest.mark.parametrize("method", ["averaging", "blending", pytest.param("stacking", marks=pytest.mark.slow),
                                    pytest.param("bagging", marks=pytest.mark.slow)])  # slow: fits per fold/bag
def test_ensemble_methods_round_trip(method, data, tmp_path, request):
    settings, transform, X, y, Xv, yv = data
    learners = build_learners(settings, transform)
    if method == "blending":  # the session's: fitted as this would fit it (folds and bags are not blending's)
        ens = request.getfixturevalue("blended")
    else:
        ens = Ensemble(learners, method, folds=2, random_state=0, bags=2).fit(X, y, Xv, yv)
    if method != "stacking":
        assert np.isclose(ens.weights_.sum(), 1) and (ens.weights_ >= 0).all()
    if method == "bagging":  # every learner twice, each fit on its own bootstrap resample
        assert ens.names == [f"{lr.kind}_bag{b}" for lr in learners for b in range(2)]
        first, second = ens.members_[0].predict_proba(Xv), ens.members_[1].predict_proba(Xv)
        assert not np.allclose(first, second)
    proba = ens.predict_proba(Xv)
    ens.save(tmp_path / "e")
    loaded = Ensemble.load(tmp_path / "e")
    assert loaded.names == ens.names
    np.testing.assert_allclose(loaded.predict_proba(Xv), proba, rtol=1e-6, atol=1e-7)


def test_device_resolution_without_gpu():
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError):
        resolve_device("tpu")


def _small(task: str, tmp_path) -> tuple:
    """A few hundred rows of a user's table (tests/tables.py), transformed and split 70/30."""
    import yaml

    from pipelines.config import load_settings
    from tests.tables import make_table, params_for

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_for(task)))
    settings = load_settings(tmp_path / "params.yaml")
    table = make_table(task, 400, seed=3)
    train, valid = table.iloc[:280], table.iloc[280:]
    transform = FeatureTransform.fit(train, settings.data_schema, settings.clean)
    return (settings, transform, transform.transform(train), transform.encode_target(train["label"]),
            transform.transform(valid), transform.encode_target(valid["label"]))


def test_nullable_category_gets_its_own_code_and_labels_round_trip(tmp_path):
    settings, transform, *_ = _small("multiclass", tmp_path)
    assert transform.classes == ["extreme", "high", "low", "mid"]  # as the data spells them, sorted
    codes = transform.transform(pd.DataFrame([{"x1": 0.0, "x2": None, "color": " RED", "size": s}
                                              for s in (None, "small", "Medium")]))["size"].tolist()
    missing = len(transform.vocab["size"]) + 1
    assert codes == [missing, transform.vocab["size"].index("small") + 1, UNKNOWN]
    assert transform.cardinalities["size"] == missing + 1
    assert transform.decode_labels(transform.encode_target(pd.Series(["mid", "extreme"]))) == ["mid", "extreme"]
    with pytest.raises(ValueError, match="not among the model's classes"):
        transform.encode_target(pd.Series(["huge"]))


@pytest.mark.parametrize("task", ["multiclass", "regression"])
@pytest.mark.parametrize("method", ["blending", pytest.param("stacking", marks=pytest.mark.slow),
                                    pytest.param("bagging", marks=pytest.mark.slow)])  # slow: fits per fold/bag
def test_ensembles_of_every_task_beat_chance_and_round_trip(task, method, tmp_path):
    from pipelines.metrics import score

    settings, transform, X, y, Xv, yv = _small(task, tmp_path)
    learners = build_learners(settings, transform)
    assert all(lr.get_params()["task"] == task for lr in learners)
    ens = Ensemble(learners, method, folds=3, random_state=0, bags=2).fit(X, y, Xv, yv)
    out = ens.predict_output(Xv)
    if task == "multiclass":
        assert out.shape == (len(Xv), 4) and np.allclose(out.sum(axis=1), 1)
        assert score("accuracy", yv, out) > 0.6  # the majority class is ~40%
    else:
        assert out.shape == (len(Xv),)
        assert score("r2", yv, out) > 0.5
    assert ens.member_weights.shape == (len(ens.names),)
    ens.save(tmp_path / "e")
    np.testing.assert_allclose(Ensemble.load(tmp_path / "e").predict_output(Xv), out, rtol=1e-6, atol=1e-7)
