"""Training device and serving device are separate choices, the MLP's batch follows rows and device, and the
ensemble overlaps GPU learners with CPU ones (sequential without a GPU). All on CPU: the CUDA paths themselves
are checked by benchmarks/train.py on a GPU machine."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from pipelines.models import Ensemble, LightGBMLearner, MLPLearner, XGBoostLearner, build_learners
from pipelines.models import base as models_base
from tests.unit.test_transform_models import _small


def test_a_bundle_trained_on_cuda_loads_and_predicts_on_cpu(data, blended, tmp_path):
    """What a GPU machine writes (every learner asked for cuda and trained there) loads where there is none."""
    Xv, ens = data[4], blended
    expected = ens.predict_proba(Xv)
    ens.save(tmp_path / "e")
    for name in ens.names:  # as train.device: cuda leaves them
        meta_file = tmp_path / "e" / name / "learner.json"
        meta = json.loads(meta_file.read_text())
        meta["params"]["device"] = "cuda"
        meta["device_"] = "cuda" if name != "lightgbm" else "cpu"
        meta_file.write_text(json.dumps(meta))
    loaded = Ensemble.load(tmp_path / "e")
    np.testing.assert_allclose(loaded.predict_proba(Xv), expected, rtol=1e-6, atol=1e-7)
    by_name = dict(zip(loaded.names, loaded.members_, strict=True))
    assert by_name["mlp"].device_ == "cpu" and by_name["mlp"].trained_on_ == "cuda"
    assert by_name["xgboost"].device_ == "cpu" and by_name["xgboost"].trained_on_ == "cuda"
    loaded.save(tmp_path / "again")  # where it trained is kept on a re-save
    assert json.loads((tmp_path / "again" / "mlp" / "learner.json").read_text())["device_"] == "cuda"
    with pytest.raises(RuntimeError, match="no CUDA device"):  # asking for the GPU here is still an error
        Ensemble.load(tmp_path / "e", device="cuda")


@pytest.mark.parametrize(("rows", "device", "batch"), [(300, "cpu", 256), (50_000, "cpu", 256),
                                                      (200_000, "cpu", 1024), (1_000_000, "cpu", 4096),
                                                      (200_000, "cuda", 4096), (1_000_000, "cuda", 16384)])
def test_auto_batch_grows_with_rows_and_device(rows, device, batch):
    mlp = MLPLearner(learning_rate=0.002)
    mlp.device_ = device
    assert mlp._batch(rows) == (batch, pytest.approx(0.002 * (batch / 256) ** 0.5))
    fixed = MLPLearner(batch_size=512, learning_rate=0.002)
    fixed.device_ = device
    assert fixed._batch(rows) == (512, 0.002)


@pytest.mark.parametrize("task", ["binary", "multiclass", "regression"])
def test_mlp_defaults_learn_a_users_table(task, tmp_path):
    """The new defaults (auto batch, device-side validation and best weights) still learn, on every task, and
    keep the best epoch's weights: the validation loss it reports is the one its predictions have."""
    settings, transform, X, y, Xv, yv = _small(task, tmp_path)
    mlp = next(lr for lr in build_learners(settings, transform) if lr.kind == "mlp")
    curve: list[float] = []
    mlp.set_params(epochs=40, patience=40).fit(X, y, Xv, yv, monitor=lambda _, loss: curve.append(loss))
    assert mlp.batch_size == "auto"
    final = models_base.valid_loss(yv, mlp.predict_output(Xv))
    assert final == pytest.approx(min(curve), rel=1e-6)  # the best epoch's weights, not the last epoch's
    if task == "regression":
        assert final < 0.8 * np.var(yv)
    else:  # beats predicting the class frequencies
        freq = np.bincount(y, minlength=len(mlp.classes_)) / len(y)
        assert final < models_base.valid_loss(yv, np.tile(freq, (len(yv), 1))) - 0.05


class _Recorder:
    """Records which thread fits each learner, when, and with how many threads."""

    def __init__(self) -> None:
        self.calls: dict[str, tuple[str, float, float, int]] = {}
        self.lock = threading.Lock()

    def wrap(self, cls, monkeypatch):
        fit = cls.fit

        def recorded(learner, *args, **kwargs):
            start = time.perf_counter()
            time.sleep(0.3)  # long enough for two fits to be seen overlapping
            out = fit(learner, *args, **kwargs)
            with self.lock:
                self.calls[learner.kind] = (threading.current_thread().name, start, time.perf_counter(),
                                            learner.threads)
            return out

        monkeypatch.setattr(cls, "fit", recorded)


def test_learners_overlap_when_some_train_on_a_gpu(data, monkeypatch):
    settings, transform, X, y, Xv, yv = data
    rec = _Recorder()
    for cls in (LightGBMLearner, XGBoostLearner, MLPLearner):
        rec.wrap(cls, monkeypatch)
    # as on a GPU machine: XGBoost and the MLP would train on CUDA (they train on the CPU here)
    monkeypatch.setattr(models_base, "wants_cuda", lambda requested: True)
    learners = [lr.set_params(threads=8) for lr in build_learners(settings, transform)]
    ens = Ensemble(learners, "blending").fit(X, y, Xv, yv)
    lgb, xgb, mlp = (rec.calls[k] for k in ("lightgbm", "xgboost", "mlp"))
    assert xgb[0] == mlp[0] != lgb[0] == threading.current_thread().name  # the GPU ones in their own thread
    assert xgb[1] < lgb[2] and lgb[1] < xgb[2]  # LightGBM overlapped with them
    assert (lgb[3], xgb[3], mlp[3]) == (6, 2, 2)  # a quarter feeds the GPU, the CPU learner gets the rest
    assert all(m.threads == 8 for m in ens.members_)  # and the params are as configured afterwards
    assert ens.predict_proba(Xv).shape == (len(Xv), 2)


def test_without_a_gpu_learners_train_one_after_another(data, monkeypatch):
    settings, transform, X, y, Xv, yv = data
    rec = _Recorder()
    for cls in (LightGBMLearner, XGBoostLearner, MLPLearner):
        rec.wrap(cls, monkeypatch)
    small = [lr.set_params(**{"epochs" if lr.kind == "mlp" else "n_estimators": 5})  # what runs when, not how
             for lr in build_learners(settings, transform)]                            # well: a few rounds each
    Ensemble(small, "blending").fit(X, y, Xv, yv)
    spans = sorted((c[1], c[2]) for c in rec.calls.values())
    assert {c[0] for c in rec.calls.values()} == {threading.current_thread().name}
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # no overlap
    assert {c[3] for c in rec.calls.values()} == {settings.train.threads}  # each with all the threads
