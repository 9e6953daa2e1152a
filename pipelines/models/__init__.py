"""Base learners and ensembles behind one interface (fit, predict_proba, save, load)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.models.base import Learner, resolve_device
from pipelines.models.ensemble import Ensemble
from pipelines.models.gbm import LightGBMLearner, XGBoostLearner
from pipelines.models.mlp import MLPLearner

LEARNERS: dict[str, type[Learner]] = {
    "lightgbm": LightGBMLearner,
    "xgboost": XGBoostLearner,
    "mlp": MLPLearner,
}

if TYPE_CHECKING:
    from pipelines.config import Settings
    from pipelines.transform import FeatureTransform


def build_learners(settings: Settings, transform: FeatureTransform) -> list[Learner]:
    """One learner per name in train.learners, configured from its params section, for the schema's task."""
    cfg = settings.train
    common = {"categorical": transform.cardinalities, "random_state": settings.seed, "threads": cfg.threads,
              "device": cfg.device, "task": transform.task, "n_classes": len(transform.classes or ())}
    return [LEARNERS[name](**common, **getattr(cfg, name).model_dump()) for name in cfg.learners]

__all__ = ["LEARNERS", "Ensemble", "Learner", "LightGBMLearner", "MLPLearner", "XGBoostLearner", "build_learners",
           "resolve_device"]
