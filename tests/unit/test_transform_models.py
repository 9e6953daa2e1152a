import numpy as np
import pandas as pd
import pytest

from pipelines.models import LEARNERS, Ensemble, Learner, resolve_device
from pipelines.train import build_learners
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
    learner = next(lr for lr in build_learners(settings, transform.cardinalities) if lr.kind == kind)
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
    a, b = (build_learners(settings, transform.cardinalities)[2].fit(X, y, Xv, yv) for _ in range(2))
    np.testing.assert_array_equal(a.predict_proba(Xv), b.predict_proba(Xv))


@pytest.mark.parametrize("method", ["averaging", "blending", "stacking", "bagging"])
def test_ensemble_methods_round_trip(method, data, tmp_path):
    settings, transform, X, y, Xv, yv = data
    learners = build_learners(settings, transform.cardinalities)
    ens = Ensemble(learners, method, folds=2, seed=0, bags=2).fit(X, y, Xv, yv)
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
