"""A model bundle: the fitted transform + the ensemble + its metadata, in one folder.

Evaluation, promotion and serving all score raw rows through `ModelBundle.predict_proba`,
so the transform that was fitted in prepare is the one applied everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines.io import read_json
from pipelines.transform import FeatureTransform

if TYPE_CHECKING:  # imported where used: scikit-learn and SciPy come with them, and a stage that only reads a
    # bundle's metadata or packages its folder (package, deploy) need not load them (about a second of imports)
    from pipelines.explain import Explanation
    from pipelines.metrics import Decision
    from pipelines.models import Ensemble

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

    @property
    def task(self) -> str:
        return self.transform.task

    @property
    def classes(self) -> list[str | int] | None:
        return self.transform.classes

    @property
    def threshold(self) -> float:
        """The binary label cut-off chosen at training (evaluate.threshold); 0.5 where none was recorded."""
        return float(self.metadata.get("threshold", 0.5))

    @property
    def decision(self) -> Decision:
        """How labels are read off the probabilities, as chosen on validation rows at training: the binary cut-off,
        or the multiclass class weights (`class_weights`; the plain argmax where none were recorded)."""
        weights = self.metadata.get("class_weights")
        if self.task == "multiclass" and weights:
            return tuple(float(w) for w in weights)
        return self.threshold

    def predict(self, rows: pd.DataFrame) -> np.ndarray:
        """The canonical output for raw rows (as collected or as sent to the API): class probabilities
        (n, k) in the order of `classes`, or predicted values (n,) for regression."""
        return self.ensemble.predict_output(self.transform.transform(rows))

    def labels(self, output: np.ndarray) -> list[str | int]:
        """The predicted class of each row, spelled as in the data (binary: at the bundle's cut-off; multiclass: by
        its class weights)."""
        from pipelines.metrics import labels_of

        return self.transform.decode_labels(labels_of(output, self.decision))

    def monitored(self, output: np.ndarray) -> np.ndarray:
        """One number or label per row that monitoring watches for drift: the positive-class probability
        (binary), the predicted class (multiclass) or the predicted value (regression)."""
        if self.task == "binary":
            return output[:, 1]
        if self.task == "multiclass":
            return np.asarray([str(c) for c in self.labels(output)], dtype=object)
        return output

    def prediction_frame(self, keys: pd.Series, y: np.ndarray, output: np.ndarray, key: str) -> pd.DataFrame:
        """Test predictions as monitoring reads them: key, actual (encoded), prediction (see `monitored`),
        and the class probabilities proba_0..proba_{k-1} for classification."""
        frame = pd.DataFrame({key: keys.to_numpy(), "actual": y, "prediction": self.monitored(output)})
        if output.ndim == 2:
            for i in range(output.shape[1]):
                frame[f"proba_{i}"] = output[:, i]
        return frame

    def answers(self, rows: pd.DataFrame) -> list[dict[str, Any]]:
        """What the API and batch scoring answer for each row: the label and the per-class probabilities,
        or the value."""
        return self._answers(rows, self.predict(rows))

    def explained(self, rows: pd.DataFrame) -> list[dict[str, Any]]:
        """What /explain answers for each row: the answer of `answers` with its `explanation` (base value and
        contributions per input column, in the answer's space; see pipelines.explain)."""
        from pipelines.explain import answer_part

        found = self.explanation(rows)
        names = None if self.classes is None else [str(c) for c in self.classes]
        output = found.output[:, 0] if self.classes is None else found.output
        return [answer | {"explanation": answer_part(found, i, names)}
                for i, answer in enumerate(self._answers(rows, output))]

    def explanation(self, rows: pd.DataFrame) -> Explanation:
        """Base values and contributions per input column of raw `rows` (pipelines.explain)."""
        from pipelines.explain import explain

        return explain(self.transform, self.ensemble, rows)

    def _answers(self, rows: pd.DataFrame, output: np.ndarray) -> list[dict[str, Any]]:
        # never silently: a row with a category the model never saw, or a number outside what it trained on,
        # is answered (the unknown category; the clipped value) and says so (`unseen`, `out_of_reference`)
        notices = self.transform.notices(rows)
        if self.classes is None:
            return [{"value": float(v), **notice} for v, notice in zip(output, notices, strict=True)]
        names = [str(c) for c in self.classes]
        answers = []
        for label, probs, notice in zip(self.labels(output), output.tolist(), notices, strict=True):
            answer: dict[str, Any] = {"label": label, "probabilities": dict(zip(names, probs, strict=True))}
            if self.task == "binary":
                answer["probability"] = probs[1]
            answers.append(answer | notice)
        return answers

    @classmethod
    def load(cls, path: Path, device: str = "auto") -> ModelBundle:
        """The bundle at `path`, its learners on `device` (auto: a GPU where there is one), whatever they
        trained on."""
        if not (path / METADATA_FILE).is_file():
            raise FileNotFoundError(f"{path} holds no model bundle ({METADATA_FILE} missing): run `amaas train`")
        from pipelines.models import Ensemble

        return cls(
            transform=FeatureTransform.load(path / TRANSFORM_FILE),
            ensemble=Ensemble.load(path / ENSEMBLE_DIR, device),
            metadata=read_json(path / METADATA_FILE),
        )
