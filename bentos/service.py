"""BentoML service: serves one amaas model bundle with adaptive batching.

The model tag, batching limits and label threshold are bento arguments set by `amaas package` from params.yaml
(or `bentoml serve ... --arg model_tag=amaas:<version>` in development). Rows are scored through
`pipelines.bundle.ModelBundle`, the same code path as offline evaluation: no training/serving skew.
"""

from __future__ import annotations

from typing import Any

import bentoml
from pydantic import BaseModel


class ServiceArgs(BaseModel):
    model_tag: str = "amaas:latest"
    max_batch_size: int = 256
    max_latency_ms: int = 20
    threshold: float = 0.5


ARGS = bentoml.use_arguments(ServiceArgs)


@bentoml.service(name="amaas_service", traffic={"timeout": 30})
class AmaasService:
    model_ref = bentoml.models.BentoModel(ARGS.model_tag)

    def __init__(self) -> None:
        from pathlib import Path

        import pandas as pd

        from pipelines.bundle import ModelBundle

        self._pd = pd
        self.bundle = ModelBundle.load(Path(self.model_ref.path))
        self.threshold = ARGS.threshold

    @bentoml.api(batchable=True, max_batch_size=ARGS.max_batch_size, max_latency_ms=ARGS.max_latency_ms)
    def predict(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Probability of default for each row, with the label and the model version."""
        proba = self.bundle.predict_proba(self._pd.DataFrame.from_records(rows))
        version = self.bundle.version
        return [{"probability": float(p), "label": int(p >= self.threshold), "model_version": version}
                for p in proba]
