"""Base learners and ensembles behind one interface (fit, predict_proba, save, load)."""

from pipelines.models.base import Learner, resolve_device
from pipelines.models.ensemble import Ensemble
from pipelines.models.gbm import LightGBMLearner, XGBoostLearner
from pipelines.models.mlp import MLPLearner

LEARNERS: dict[str, type[Learner]] = {
    "lightgbm": LightGBMLearner,
    "xgboost": XGBoostLearner,
    "mlp": MLPLearner,
}

__all__ = ["LEARNERS", "Ensemble", "Learner", "LightGBMLearner", "MLPLearner", "XGBoostLearner", "resolve_device"]
