"""The interface every learner and ensemble shares, and the one place that picks the device."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils import Tags
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted

log = logging.getLogger(__name__)

TASKS = ("binary", "multiclass", "regression")
# fit's optional `monitor`: called with (step, validation loss) after each boosting round or epoch, the loss as
# valid_loss measures it; whatever it raises stops the fit and propagates (tuning prunes a trial that way)
Monitor = Callable[[int, float], None]


@functools.cache
def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return bool(torch.cuda.is_available())


_CUDA_RESOLUTIONS = [0]  # how often resolve_device picked cuda in this process (pipelines.accounting bills it)


def cuda_resolutions() -> int:
    return _CUDA_RESOLUTIONS[0]


def wants_cuda(requested: str) -> bool:
    """Whether `requested` would resolve to cuda here (what resolve_device picks, without billing or raising)."""
    return requested == "cuda" or (requested == "auto" and cuda_available())


def resolve_device(requested: str = "auto") -> str:
    """'cuda' when asked for or available, else 'cpu'; every learner asks here."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cuda" and not cuda_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA device is visible; use 'auto' or 'cpu'")
    device = "cuda" if requested == "cuda" or (requested == "auto" and cuda_available()) else "cpu"
    _CUDA_RESOLUTIONS[0] += device == "cuda"
    log.debug("device resolved: requested=%s -> %s", requested, device)
    return device


class TaskEstimatorMixin(ClassifierMixin, RegressorMixin):
    """A classifier or a regressor, as the estimator's task says.

    One learner class serves binary and multiclass classification and regression (its `task` param,
    for an ensemble its learners' task), so the class inherits both scikit-learn mixins and the task
    picks which one applies: `__sklearn_tags__` reports estimator_type "classifier" (with classifier
    tags) or "regressor" (with regressor tags), so `sklearn.base.is_classifier` / `is_regressor`,
    cross-validation splitters and scorers follow the task; `score` is accuracy or R²; `predict`
    returns class indices (`classes_`: the encoded classes 0..k-1) or values; `predict_proba` exists
    for classifiers only (`hasattr(regressor, "predict_proba")` is False).

    Subclasses implement `_output(X)`, the canonical output of pipelines.metrics, and set `classes_`
    in fit for classification.
    """

    @property
    def _task(self) -> str:
        raise NotImplementedError

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()  # both mixins applied: undo the one the task rules out
        if self._task == "regression":
            tags.estimator_type, tags.classifier_tags = "regressor", None
        else:
            tags.estimator_type, tags.regressor_tags = "classifier", None
        return tags

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        mixin = RegressorMixin if self._task == "regression" else ClassifierMixin
        return float(mixin.score(self, X, y, sample_weight))

    def predict_output(self, X: Any) -> np.ndarray:
        """Class probabilities (n, k) for classification, values (n,) for regression (pipelines.metrics)."""
        check_is_fitted(self)
        X = as_frame(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input")
        return self._output(X)

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class index of each row (classification), or the predicted value (regression)."""
        output = self.predict_output(X)
        return output if self._task == "regression" else self.classes_[np.argmax(output, axis=1)]

    def _is_classifier(self) -> bool:
        if self._task == "regression":
            raise AttributeError("a regression model has no class probabilities: use predict_output")
        return True

    @available_if(_is_classifier)
    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n, k), like scikit-learn."""
        return self.predict_output(X)

    def _output(self, X: pd.DataFrame) -> np.ndarray:
        raise NotImplementedError


class Learner(TaskEstimatorMixin, BaseEstimator):
    """A scikit-learn estimator over one booster or network.

    The rules: every __init__ param is stored unchanged under its own name (defaults such as
    `categorical=None` are resolved in fit), fit returns self, learned attributes end in `_`,
    get_params/set_params come from BaseEstimator and `sklearn.base.clone` works. `fit(X, y)` is enough;
    `X_valid, y_valid` are optional validation rows for early stopping, and `monitor` (see Monitor) follows
    the validation loss as training goes (it needs the validation rows). X is the transformed frame
    (categorical columns as integer codes, named in `categorical` with their cardinalities) or a
    plain numeric array; y holds class indices 0..k-1 (classification) or values (regression).
    `n_classes=None` takes k from y. On disk (learner.json) the seed keeps its old name, "seed".
    """

    kind: ClassVar[str]
    gpu_capable: ClassVar[bool] = True  # whether it trains on CUDA when its device resolves there

    @property
    def _task(self) -> str:
        return str(self.task)

    @property
    def uses_gpu(self) -> bool:
        """Whether fit would train on a GPU here (the ensemble overlaps such learners with the CPU ones)."""
        return self.gpu_capable and wants_cuda(str(self.device))

    def fit(self, X: Any, y: Any, X_valid: Any = None, y_valid: Any = None, monitor: Monitor | None = None) -> Self:
        raise NotImplementedError

    def distill(self, X: Any, soft: np.ndarray, X_valid: Any = None, soft_valid: np.ndarray | None = None) -> Self:
        """Fit to a teacher's outputs instead of labels (knowledge distillation): class probabilities (n, k)
        or values (n,) as pipelines.metrics has them; `soft_valid` early-stops on the teacher's outputs."""
        raise NotImplementedError(f"{type(self).__name__} cannot be distilled into")

    def _prepare_distill(self, X: Any, soft: np.ndarray, X_valid: Any, soft_valid: np.ndarray | None
                         ) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame | None, np.ndarray | None]:
        """distill's inputs as frames and arrays; sets `classes_` from the width of the soft labels."""
        X, soft, X_valid, soft_valid = fit_inputs(self, X, soft, X_valid, soft_valid)
        soft = soft.astype("float64")
        if self._task == "regression" and soft.ndim != 1:
            raise ValueError(f"a regression student takes the teacher's values (n,), got shape {soft.shape}")
        if self._task != "regression":
            if soft.ndim != 2 or (self._task == "binary" and soft.shape[1] != 2):
                raise ValueError(f"a {self._task} student takes the teacher's class probabilities (n, k), "
                                 f"got shape {soft.shape}")
            self.classes_ = np.arange(soft.shape[1])
        return X, soft, X_valid, soft_valid

    def _prepare_fit(self, X: Any, y: Any, X_valid: Any, y_valid: Any, monitor: Monitor | None = None
                     ) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame | None, np.ndarray | None]:
        """Frames and arrays from whatever fit got; sets `classes_` for classification."""
        if monitor is not None and X_valid is None:
            raise ValueError("a monitor follows the validation loss: pass X_valid and y_valid to fit")
        X, y, X_valid, y_valid = fit_inputs(self, X, y, X_valid, y_valid)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self._task != "regression":
            self.classes_ = np.arange(self._n_classes(y))
            for labels in (y, y_valid):
                if labels is not None and not np.isin(labels, self.classes_).all():
                    raise ValueError(f"a {self._task} learner takes class indices 0..{len(self.classes_) - 1} "
                                     f"as y, got {np.unique(labels)[:10].tolist()}")
        return X, y, X_valid, y_valid

    def _n_classes(self, y: np.ndarray | None = None) -> int:
        """k: 2 for binary, else the n_classes param, or (None) the largest class index in y + 1."""
        if self._task == "binary":
            return 2
        if self.n_classes is not None:
            return int(self.n_classes)
        return int(np.max(y)) + 1 if self._task == "multiclass" and y is not None and len(y) else 0

    @property
    def _categorical(self) -> dict[str, int]:
        return dict(self.categorical or {})

    @property
    def _seed(self) -> int:
        return 0 if self.random_state is None else int(self.random_state)

    def _saved_params(self) -> dict[str, Any]:
        """The params as learner.json has always held them: defaults resolved, the seed as "seed"."""
        params = self.get_params()
        params["seed"] = params.pop("random_state")
        params["categorical"] = self._categorical
        if self._task != "regression":
            params["n_classes"] = len(self.classes_)
        return params

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "learner.json").write_text(json.dumps({"kind": self.kind, "params": self._saved_params(),
                                                        **self._state()}, indent=2, sort_keys=True))
        self._save_model(path)

    @classmethod
    def load(cls, path: Path, device: str = "auto") -> Learner:
        """A saved learner, on `device` (auto: a GPU where there is one). The device it trained on is a choice of
        the training machine, not of this one: a model trained on CUDA loads on a machine without a GPU."""
        meta = json.loads((path / "learner.json").read_text())
        from pipelines.models import LEARNERS

        params = meta.pop("params")
        params["random_state"] = params.pop("seed")
        params["device"] = device
        learner = LEARNERS[meta.pop("kind")](**params)
        if learner._task != "regression":
            learner.classes_ = np.arange(learner._n_classes())
        learner._load_model(path, meta)
        return learner

    def _state(self) -> dict[str, Any]:
        return {}

    def _save_model(self, path: Path) -> None:
        raise NotImplementedError

    def _load_model(self, path: Path, state: dict[str, Any]) -> None:
        raise NotImplementedError


def fit_inputs(estimator: BaseEstimator, X: Any, y: Any, X_valid: Any, y_valid: Any
               ) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame | None, np.ndarray | None]:
    """fit's inputs as frames and arrays, checked for matching rows; sets the estimator's n_features_in_."""
    X, y = as_frame(X), np.asarray(y)
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
    if X_valid is not None:
        X_valid, y_valid = as_frame(X_valid), np.asarray(y_valid)
    estimator.n_features_in_ = X.shape[1]
    return X, y, X_valid, y_valid


def as_frame(X: Any) -> pd.DataFrame:
    """X as the learners read it: a DataFrame as given, or a numeric array as columns x0, x1, ..."""
    if isinstance(X, pd.DataFrame):
        return X
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-dimensional (rows, features), got shape {X.shape}: "
                         "Reshape your data")
    return pd.DataFrame(X, columns=[f"x{i}" for i in range(X.shape[1])])


def as_output(raw: np.ndarray, task: str) -> np.ndarray:
    """A booster's raw prediction in the canonical shape: (n, 2) from positive-class probabilities,
    (n, k) multiclass probabilities as they are, (n,) values."""
    raw = np.asarray(raw, dtype="float64")
    if task == "binary":
        p1 = np.clip(raw.reshape(-1), 0.0, 1.0)
        return np.column_stack([1.0 - p1, p1])
    if task == "multiclass":
        return raw.reshape(len(raw), -1)
    return raw.reshape(-1)


def valid_loss(y: np.ndarray, output: np.ndarray) -> float:
    """What early stopping, tuning and blend weights minimize: log loss (probabilities) or mean squared error.
    `y` is class indices or values, or a teacher's class probabilities (n, k): then the soft-label log loss."""
    y = np.asarray(y)
    if output.ndim == 2 and y.ndim == 2:
        return float(-np.mean(np.sum(y * np.log(np.clip(output, 1e-7, 1.0)), axis=1)))
    if output.ndim == 2:
        p = np.clip(output[np.arange(len(y)), y.astype("int64")], 1e-7, 1.0)
        return float(-np.mean(np.log(p)))
    return float(np.mean((y.astype("float64") - output) ** 2))
