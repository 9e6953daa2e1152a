"""A model bundle: the fitted transform + the ensemble + its metadata, in one folder.

Evaluation, promotion and serving all score raw rows through `ModelBundle.predict_proba`,
so the transform that was fitted in prepare is the one applied everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.io import read_json
from pipelines.models import Ensemble
from pipelines.transform import FeatureTransform

TRANSFORM_FILE = "transform.json"
ENSEMBLE_DIR = "ensemble"
METADATA_FILE = "metadata.json"


@dataclass
class ModelBundle:
    transform: FeatureTransform
    ensemble: Ensemble
    metadata: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.metadata["version"])

    def predict_proba(self, rows: pd.DataFrame) -> np.ndarray:
        """Probability of the positive class for raw rows (as collected or as sent to the API)."""
        return self.ensemble.predict_proba(self.transform.transform(rows))[:, 1]

    @classmethod
    def load(cls, path: Path) -> ModelBundle:
        if not (path / METADATA_FILE).is_file():
            raise FileNotFoundError(f"{path} holds no model bundle ({METADATA_FILE} missing): run `amaas train`")
        return cls(
            transform=FeatureTransform.load(path / TRANSFORM_FILE),
            ensemble=Ensemble.load(path / ENSEMBLE_DIR),
            metadata=read_json(path / METADATA_FILE),
        )
