"""The interface every learner and ensemble shares, and the one place that picks the device."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


@functools.cache
def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return bool(torch.cuda.is_available())


def resolve_device(requested: str = "auto") -> str:
    """'cuda' when asked for or available, else 'cpu'; every learner asks here."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cuda" and not cuda_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA device is visible; use 'auto' or 'cpu'")
    device = "cuda" if requested == "cuda" or (requested == "auto" and cuda_available()) else "cpu"
    log.debug("device resolved: requested=%s -> %s", requested, device)
    return device


class Learner:
    """scikit-learn style: params only in __init__, fit returns self, learned attributes end in `_`."""

    kind: ClassVar[str]

    def __init__(self, **params: Any) -> None:
        self.params = params

    def get_params(self) -> dict[str, Any]:
        return dict(self.params)

    def clone(self) -> Self:
        return type(self)(**self.get_params())

    def fit(self, X: pd.DataFrame, y: np.ndarray, X_valid: pd.DataFrame | None = None,
            y_valid: np.ndarray | None = None) -> Self:
        raise NotImplementedError

    def predict_output(self, X: pd.DataFrame) -> np.ndarray:
        """Class probabilities (n, k) for classification, values (n,) for regression (pipelines.metrics)."""
        raise NotImplementedError

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        """Class probabilities (n, k), like scikit-learn."""
        if self.params.get("task") == "regression":
            raise TypeError("a regression model has no class probabilities: use predict_output")
        return self.predict_output(X)

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "learner.json").write_text(json.dumps({"kind": self.kind, "params": self.params,
                                                        **self._state()}, indent=2, sort_keys=True))
        self._save_model(path)

    @classmethod
    def load(cls, path: Path) -> Learner:
        meta = json.loads((path / "learner.json").read_text())
        from pipelines.models import LEARNERS

        learner = LEARNERS[meta.pop("kind")](**meta.pop("params"))
        learner._load_model(path, meta)
        return learner

    def _state(self) -> dict[str, Any]:
        return {}

    def _save_model(self, path: Path) -> None:
        raise NotImplementedError

    def _load_model(self, path: Path, state: dict[str, Any]) -> None:
        raise NotImplementedError


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
    """What early stopping, tuning and blend weights minimize: log loss (probabilities) or mean squared error."""
    y = np.asarray(y)
    if output.ndim == 2:
        p = np.clip(output[np.arange(len(y)), y.astype("int64")], 1e-7, 1.0)
        return float(-np.mean(np.log(p)))
    return float(np.mean((y.astype("float64") - output) ** 2))
