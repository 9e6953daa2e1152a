"""Gradient-boosted tree learners: LightGBM and XGBoost behind the Learner interface."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Self, cast

import numpy as np
import pandas as pd
from sklearn.base import clone

from pipelines.models.base import Learner, Monitor, as_output, log, resolve_device
from pipelines.models.cluster import current_client, describe, partitioned

_LGB_OBJECTIVES = {
    "binary": lambda k: {"objective": "binary"},
    "multiclass": lambda k: {"objective": "multiclass", "num_class": k},
    "regression": lambda k: {"objective": "regression"},
}
_XGB_OBJECTIVES = {
    "binary": lambda k: {"objective": "binary:logistic", "eval_metric": "logloss"},
    "multiclass": lambda k: {"objective": "multi:softprob", "eval_metric": "mlogloss", "num_class": k},
    "regression": lambda k: {"objective": "reg:squarederror", "eval_metric": "rmse"},
}


class LightGBMLearner(Learner):
    """LightGBM gradient-boosted trees (see Learner for the estimator rules and the task design)."""

    kind = "lightgbm"
    gpu_capable = False  # the PyPI wheel has no CUDA

    def __init__(self, categorical: dict[str, int] | None = None, n_estimators: int = 400,
                 learning_rate: float = 0.05, num_leaves: int = 31, min_child_samples: int = 20,
                 early_stopping_rounds: int = 30, random_state: int | None = 0, threads: int = 1,
                 device: str = "auto", task: str = "binary", n_classes: int | None = None) -> None:
        self.categorical = categorical
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.early_stopping_rounds = early_stopping_rounds
        self.random_state = random_state
        self.threads = threads
        self.device = device
        self.task = task
        self.n_classes = n_classes

    def fit(self, X: Any, y: Any, X_valid: Any = None, y_valid: Any = None, monitor: Monitor | None = None) -> Self:
        import lightgbm as lgb

        X, y, X_valid, y_valid = self._prepare_fit(X, y, X_valid, y_valid, monitor)
        # The PyPI wheel of LightGBM has no CUDA support, so it trains on CPU whatever the device.
        self.device_ = "cpu"
        log.info("lightgbm: device=cpu (PyPI build has no CUDA), requested %s", resolve_device(self.device))
        params = {
            **_LGB_OBJECTIVES[self.task](self._n_classes(y)), "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_child_samples": self.min_child_samples, "seed": self._seed, "num_threads": self.threads,
            "deterministic": True, "force_row_wise": True, "verbosity": -1,
        }
        cats = list(self._categorical)
        client = current_client()
        if client is not None:
            return self._fit_dask(client, params, cats, X, y, X_valid, y_valid, monitor)
        train = lgb.Dataset(X, y, categorical_feature=cats or "auto", free_raw_data=True)
        valid_sets: list[lgb.Dataset] = []
        callbacks: list[Callable[..., Any]] = []
        if X_valid is not None:
            valid_sets = [lgb.Dataset(X_valid, y_valid, reference=train)]
            callbacks = [lgb.early_stopping(self.early_stopping_rounds, verbose=False)]
        if monitor is not None:
            callbacks.append(_lgb_monitor(monitor))
        self.booster_ = lgb.train(params, train, num_boost_round=self.n_estimators, valid_sets=valid_sets,
                                  callbacks=callbacks)
        return self

    def distill(self, X: Any, soft: np.ndarray, X_valid: Any = None, soft_valid: np.ndarray | None = None) -> Self:
        """Fit to a teacher's outputs (see Learner.distill): binary learns the positive-class probability with
        LightGBM's cross-entropy objective; multiclass takes each row once per class, weighted by the teacher's
        probability of that class (which is the soft-label log loss; pairs under 1e-4 are left out); regression
        learns the teacher's values."""
        import lightgbm as lgb

        X, soft, X_valid, soft_valid = self._prepare_distill(X, soft, X_valid, soft_valid)
        self.device_ = "cpu"
        k = soft.shape[1] if soft.ndim == 2 else 0
        objective = ({"objective": "cross_entropy"} if self.task == "binary" else
                     _LGB_OBJECTIVES[self.task](k))
        params = {**objective, "learning_rate": self.learning_rate, "num_leaves": self.num_leaves,
                  "min_child_samples": self.min_child_samples, "seed": self._seed, "num_threads": self.threads,
                  "deterministic": True, "force_row_wise": True, "verbosity": -1}
        cats: list[str] | Literal["auto"] = list(self._categorical) or "auto"

        def dataset(frame: pd.DataFrame, target: np.ndarray, reference: Any = None) -> Any:
            if self.task == "binary":
                return lgb.Dataset(frame, target[:, 1], categorical_feature=cats, reference=reference)
            if self.task == "multiclass":  # (row, class) pairs the teacher gives next to no weight are left out
                rows, labels = np.tile(np.arange(len(frame)), k), np.repeat(np.arange(k), len(frame))
                weight = target.T.reshape(-1)
                keep = weight > 1e-4
                return lgb.Dataset(frame.iloc[rows[keep]].reset_index(drop=True), labels[keep], weight=weight[keep],
                                   categorical_feature=cats, reference=reference)
            return lgb.Dataset(frame, target, categorical_feature=cats, reference=reference)

        train = dataset(X, soft)
        valid_sets: list[lgb.Dataset] = []
        callbacks: list[Callable[..., Any]] = []
        if X_valid is not None and soft_valid is not None:
            valid_sets = [dataset(X_valid, soft_valid.astype("float64"), train)]
            callbacks = [lgb.early_stopping(self.early_stopping_rounds, verbose=False)]
        self.booster_ = lgb.train(params, train, num_boost_round=self.n_estimators, valid_sets=valid_sets,
                                  callbacks=callbacks)
        return self

    @property
    def n_trees_(self) -> int:
        """Boosting rounds used at prediction (the early-stopped count when there was early stopping)."""
        booster = self.booster_  # best_iteration is 0 without early stopping, -1 in a booster read from text
        best = int(booster.best_iteration or 0)
        return best if best > 0 else booster.num_trees() // booster.num_model_per_iteration()

    def pruned(self, rounds: int) -> LightGBMLearner:
        """A copy that keeps only the first `rounds` boosting rounds (its model file shrinks with it)."""
        import lightgbm as lgb

        copy = clone(self)
        for attr in ("classes_", "n_features_in_", "device_"):
            if hasattr(self, attr):
                setattr(copy, attr, getattr(self, attr))
        copy.booster_ = lgb.Booster(model_str=self.booster_.model_to_string(num_iteration=rounds))
        copy.n_estimators = rounds
        return copy

    def _fit_dask(self, client: Any, params: dict[str, Any], cats: list[str], X: pd.DataFrame, y: np.ndarray,
                  X_valid: pd.DataFrame | None, y_valid: np.ndarray | None, monitor: Monitor | None) -> Self:
        """Data-parallel training on the cluster (lightgbm.dask). Its Dask API has no early stopping,
        so every round is trained and the best one on the validation rows is kept, as early stopping
        would have kept it. The monitor sees the validation curve once training is done (callbacks would
        run on the workers)."""
        import lightgbm as lgb

        p = {k: v for k, v in params.items() if k not in ("objective", "num_class", "seed", "num_threads")}
        estimator = lgb.DaskLGBMRegressor if self.task == "regression" else lgb.DaskLGBMClassifier
        model = estimator(client=client, n_estimators=self.n_estimators,
                                       random_state=params["seed"], **p)
        dX, dy = partitioned(client, X, pd.Series(y, index=X.index))
        fit: dict[str, Any] = {"categorical_feature": cats or "auto"}
        if X_valid is not None:
            vX, vy = partitioned(client, X_valid, pd.Series(y_valid, index=X_valid.index))
            fit.update(eval_set=[(vX, vy)], eval_names=["valid"])
        model.fit(dX, dy, **fit)
        self.booster_ = model.booster_
        if X_valid is not None:
            losses = next(iter(model.evals_result_["valid"].values()))
            self.booster_.best_iteration = int(np.argmin(losses)) + 1
            _replay(monitor, losses)
        log.info("lightgbm: trained on %s", describe(client))
        return self

    def _output(self, X: pd.DataFrame) -> np.ndarray:
        # as an array: the columns are in training order (the transform's), and LightGBM's checks of a frame
        # cost more than scoring one row (category codes are integer columns, not pandas categoricals)
        raw = self.booster_.predict(X.to_numpy(dtype="float64"), num_iteration=self.booster_.best_iteration or None)
        return as_output(cast(np.ndarray, raw), self.task)  # dense: sparse output is only for pred_contrib

    def _state(self) -> dict[str, Any]:
        return {"device_": self.device_}

    def _save_model(self, path: Path) -> None:
        self.booster_.save_model(str(path / "model.txt"), num_iteration=self.booster_.best_iteration or None)

    def _load_model(self, path: Path, state: dict[str, Any]) -> None:
        import lightgbm as lgb

        self.booster_ = lgb.Booster(model_file=str(path / "model.txt"))
        self.n_features_in_ = self.booster_.num_feature()
        self.device_ = state["device_"]


class XGBoostLearner(Learner):
    """XGBoost gradient-boosted trees (see Learner for the estimator rules and the task design)."""

    kind = "xgboost"

    def __init__(self, categorical: dict[str, int] | None = None, n_estimators: int = 400,
                 learning_rate: float = 0.05, max_depth: int = 5, early_stopping_rounds: int = 30,
                 random_state: int | None = 0, threads: int = 1, device: str = "auto", task: str = "binary",
                 n_classes: int | None = None) -> None:
        self.categorical = categorical
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.max_depth = max_depth
        self.early_stopping_rounds = early_stopping_rounds
        self.random_state = random_state
        self.threads = threads
        self.device = device
        self.task = task
        self.n_classes = n_classes

    def _categorized(self, X: pd.DataFrame) -> pd.DataFrame:
        X = X.copy()
        for col, card in self._categorical.items():
            X[col] = pd.Categorical(X[col], categories=pd.RangeIndex(card))
        return X

    def _quantile_matrix(self, X: pd.DataFrame, y: np.ndarray, ref: Any = None) -> Any:
        """A training (or, with `ref`, validation) matrix of histogram bins only: the rows are binned once, here,
        and hist training (on a GPU too) starts from the bins, without a copy of the raw values."""
        import xgboost as xgb

        return xgb.QuantileDMatrix(self._categorized(X), label=y, enable_categorical=True, nthread=self.threads,
                                   ref=ref)

    def fit(self, X: Any, y: Any, X_valid: Any = None, y_valid: Any = None, monitor: Monitor | None = None) -> Self:
        import xgboost as xgb

        X, y, X_valid, y_valid = self._prepare_fit(X, y, X_valid, y_valid, monitor)
        self.device_ = resolve_device(self.device)
        log.info("xgboost: device=%s", self.device_)
        params = {
            **_XGB_OBJECTIVES[self.task](self._n_classes(y)), "eta": self.learning_rate,
            "max_depth": self.max_depth, "seed": self._seed, "nthread": self.threads, "tree_method": "hist",
            "device": self.device_, "max_cat_to_onehot": 1,
        }
        client = current_client()
        stop = self.early_stopping_rounds if X_valid is not None else None
        squared = self.task == "regression"  # its metric is rmse; valid_loss is the mean squared error
        if client is None:
            train = self._quantile_matrix(X, y)
            evals = [] if X_valid is None else [(self._quantile_matrix(X_valid, y_valid, ref=train), "valid")]
            callbacks = [] if monitor is None else [_xgb_monitor(monitor, squared)]
            self.booster_ = xgb.train(params, train, num_boost_round=self.n_estimators, evals=evals,
                                      early_stopping_rounds=stop, verbose_eval=False, callbacks=callbacks)
        else:  # data-parallel on the cluster; early stopping works the same there
            import xgboost.dask

            matrix = functools.partial(self._dask_matrix, client)
            evals = [] if X_valid is None else [(matrix(X_valid, y_valid), "valid")]
            trained = xgboost.dask.train(client, params, matrix(X, y), num_boost_round=self.n_estimators,
                                         evals=evals, early_stopping_rounds=stop, verbose_eval=False)
            self.booster_ = trained["booster"]
            if X_valid is not None:  # the monitor sees the curve once training is done (as with lightgbm.dask)
                curve = next(iter(trained["history"]["valid"].values()))
                _replay(monitor, [v**2 if squared else v for v in curve])
            log.info("xgboost: trained on %s", describe(client))
        return self

    def _dask_matrix(self, client: Any, X: pd.DataFrame, y: np.ndarray) -> Any:
        import xgboost.dask

        dX, dy = partitioned(client, self._categorized(X), pd.Series(y, index=X.index))
        return xgboost.dask.DaskDMatrix(client, dX, dy, enable_categorical=True)

    def _output(self, X: pd.DataFrame) -> np.ndarray:
        best = getattr(self.booster_, "best_iteration", None)
        rng = (0, best + 1) if best is not None else (0, 0)
        # in place, from an array (the booster knows its categorical columns from training): a categorical copy
        # of the frame and a DMatrix made from it took 2.5 ms of a 16-row call, this 0.3 ms (measured)
        return as_output(self.booster_.inplace_predict(self._codes(X), iteration_range=rng), self.task)

    def _codes(self, X: pd.DataFrame) -> np.ndarray:
        """X as float32, with what _categorized's categoricals read as missing made missing: a category code that
        is not a whole number in 0..cardinality-1. The columns must be the training columns, in order (as a
        DMatrix of the frame checked)."""
        names = self.booster_.feature_names
        if names is not None and [str(c) for c in X.columns] != names:
            raise ValueError(f"xgboost: the columns {list(X.columns)} are not those it was trained on, in order: "
                             f"{names}")
        out = X.to_numpy(dtype="float32", copy=True)
        for col, card in self._categorical.items():
            codes = out[:, X.columns.get_loc(col)]
            codes[~((codes >= 0) & (codes < card) & (codes == np.floor(codes)))] = np.nan
        return out

    def _state(self) -> dict[str, Any]:
        return {"device_": getattr(self, "trained_on_", self.device_)}

    def _save_model(self, path: Path) -> None:
        self.booster_.save_model(str(path / "model.ubj"))

    def _load_model(self, path: Path, state: dict[str, Any]) -> None:
        import xgboost as xgb

        self.booster_ = xgb.Booster(model_file=str(path / "model.ubj"))
        self.n_features_in_ = self.booster_.num_features()
        self.device_ = resolve_device(self.device)  # where it predicts here; trained_on_: where it trained
        self.booster_.set_param({"nthread": self.threads, "device": self.device_})
        self.trained_on_ = state["device_"]


def _lgb_monitor(monitor: Monitor) -> Callable[[Any], None]:
    """A LightGBM callback that hands `monitor` the validation metric after each round: the objective's own,
    binary or multiclass log loss or l2, which is what valid_loss measures."""

    def callback(env: Any) -> None:
        monitor(env.iteration + 1, float(env.evaluation_result_list[0][2]))

    return callback


def _xgb_monitor(monitor: Monitor, squared: bool) -> Any:
    """An XGBoost callback that hands `monitor` the validation metric after each round."""
    import xgboost as xgb

    class ValidationMonitor(xgb.callback.TrainingCallback):
        def after_iteration(self, model: Any, epoch: int, evals_log: dict[str, Any]) -> bool:
            value = float(next(iter(evals_log["valid"].values()))[-1])
            monitor(epoch + 1, value**2 if squared else value)
            return False  # never stops training itself

    return ValidationMonitor()


def _replay(monitor: Monitor | None, losses: list[float]) -> None:
    """Hand `monitor` a validation curve recorded during training, round by round."""
    if monitor is not None:
        for step, loss in enumerate(losses, start=1):
            monitor(step, float(loss))
