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

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        """Probabilities of shape (n, 2), like scikit-learn."""
        raise NotImplementedError

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


def as_proba(p1: np.ndarray) -> np.ndarray:
    p1 = np.clip(np.asarray(p1, dtype="float64"), 0.0, 1.0)
    return np.column_stack([1.0 - p1, p1])


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Binary log loss with probabilities clipped away from 0 and 1."""
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
