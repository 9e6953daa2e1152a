"""Ensembles of learners: plain averaging, weighted blending, stacking on out-of-fold predictions, bagging."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import expit, logit, softmax
from sklearn.base import BaseEstimator, clone

from pipelines.models.base import Learner, TaskEstimatorMixin, fit_inputs, log, valid_loss
from pipelines.progress import progress

METHODS = ("averaging", "blending", "stacking", "bagging")
GPU_SIDE_THREADS = 0.25  # the share of train.threads the GPU learners keep while overlapping (Ensemble._fit_members)


def _clipped_logit(p: np.ndarray) -> np.ndarray:
    return logit(np.clip(p, 1e-6, 1 - 1e-6))


class Ensemble(TaskEstimatorMixin, BaseEstimator):
    """Combines base learners; a scikit-learn estimator itself, so it can stand in for one.

    `learners` (unfitted Learners, cloned for every fit, never fitted themselves) is a param like any
    other, so `sklearn.base.clone` clones them too; the fitted ones are `members_`. It is a classifier
    or a regressor as its learners' task says (see TaskEstimatorMixin). `fit(X, y)` works for
    averaging, stacking and bagging; blending fits its weights on validation rows, so it needs
    `X_valid, y_valid`, which also early-stop the members. On disk (ensemble.json) the seed keeps its
    old name, "seed".
    """

    def __init__(self, learners: list[Learner], method: str = "blending", folds: int = 5,
                 random_state: int | None = 0, bags: int = 5) -> None:
        self.learners = learners
        self.method = method
        self.folds = folds
        self.random_state = random_state
        self.bags = bags

    @property
    def _seed(self) -> int:
        return 0 if self.random_state is None else int(self.random_state)

    @property
    def names(self) -> list[str]:
        """One name per member: the learner kind, with the bag number when bagging."""
        return getattr(self, "names_", [learner.kind for learner in self.learners])

    @property
    def task(self) -> str:
        return str(self.learners[0].task)

    @property
    def _task(self) -> str:
        return self.task

    def fit(self, X: Any, y: Any, X_valid: Any = None, y_valid: Any = None) -> Self:
        if self.method not in METHODS:
            raise ValueError(f"ensemble method must be one of {METHODS}, got {self.method!r}")
        if not self.learners:
            raise ValueError("an ensemble needs at least one learner")
        if self.method == "blending" and X_valid is None:
            raise ValueError("blending fits its weights on validation rows: pass X_valid and y_valid")
        X, y, X_valid, y_valid = fit_inputs(self, X, y, X_valid, y_valid)
        if self.method == "stacking":
            meta_X = self._out_of_fold(X, y)
        if self.method == "bagging":
            self.names_, self.members_ = self._bag(X, y, X_valid, y_valid)
        else:
            self.members_ = self._fit_members(X, y, X_valid, y_valid)
        if self.task != "regression":
            self.classes_ = self.members_[0].classes_
        valid_preds = self.member_predictions(X_valid) if X_valid is not None else None
        self.member_valid_log_loss_ = ({} if valid_preds is None else
                                       {n: valid_loss(y_valid, valid_preds[:, i]) for i, n in enumerate(self.names)})
        self.intercept_: Any = 0.0
        if self.method in ("averaging", "bagging"):
            self.weights_ = np.full(len(self.members_), 1 / len(self.members_))
        elif self.method == "blending":
            assert valid_preds is not None and y_valid is not None  # checked above
            self.weights_ = self._fit_blend_weights(valid_preds, y_valid)
        else:
            self.weights_, self.intercept_ = self._fit_meta(meta_X, y)
        log.info("ensemble %s weights %s", self.method, dict(zip(self.names, np.round(self.member_weights, 4),
                                                                  strict=True)))
        return self

    def _fit_members(self, X: pd.DataFrame, y: np.ndarray, X_valid: pd.DataFrame | None,
                     y_valid: np.ndarray | None) -> list[Learner]:
        """One fit of each learner. With a GPU, the learners that train there (one after another, in a thread of
        their own with a quarter of the threads: XGBoost sketches its histograms and the MLP builds its batches on
        the CPU) overlap with those that train on the CPU (on the other cores):
        the wall time approaches the slowest side rather than the sum. Without one, they train one after
        another, each with all its threads, so the cores are never oversubscribed."""
        learners = [clone(learner) for learner in self.learners]
        on_gpu = [lr for lr in learners if lr.uses_gpu]
        on_cpu = [lr for lr in learners if not lr.uses_gpu]
        if not on_gpu or not on_cpu:
            return [lr.fit(X, y, X_valid, y_valid) for lr in progress(learners, f"ensemble {self.method}",
                                                                      unit="learner")]
        threads = {id(lr): lr.threads for lr in learners}
        for lr in on_gpu:  # a share of the cores feeds the GPU (histogram sketches, batches); the CPU learners
            lr.set_params(threads=max(1, round(lr.threads * GPU_SIDE_THREADS)))  # get the others
        gpu_threads = max(lr.threads for lr in on_gpu)
        for lr in on_cpu:
            lr.set_params(threads=max(1, lr.threads - gpu_threads))
        log.info("ensemble: %s on the GPU overlapping %s on the CPU", [lr.kind for lr in on_gpu],
                 [lr.kind for lr in on_cpu])
        def fit_timed(side: list[Learner]) -> float:
            start = time.perf_counter()
            for lr in side:
                lr.fit(X, y, X_valid, y_valid)
            return time.perf_counter() - start

        with ThreadPoolExecutor(1, thread_name_prefix="amaas-gpu-learners") as pool:
            gpu_side = pool.submit(fit_timed, on_gpu)
            cpu_seconds = fit_timed(on_cpu)
            gpu_seconds = gpu_side.result()
        log.info("ensemble: GPU side %.1f s, CPU side %.1f s (overlapped)", gpu_seconds, cpu_seconds)
        for lr in learners:  # the params as configured (they are saved, and predicting uses them)
            lr.set_params(threads=threads[id(lr)])
        return learners

    @classmethod
    def of_fitted(cls, members: list[Learner], names: list[str], weights: np.ndarray | None = None,
                  random_state: int | None = 0) -> Ensemble:
        """An averaging ensemble of learners already fitted (a distilled student alone, say): nothing is refit."""
        ens = cls([clone(m) for m in members], "averaging", random_state=random_state)
        ens.members_, ens.names_ = list(members), list(names)
        ens.n_features_in_ = members[0].n_features_in_
        if ens.task != "regression":
            ens.classes_ = members[0].classes_
        ens.weights_ = np.full(len(members), 1 / len(members)) if weights is None else np.asarray(weights)
        ens.intercept_, ens.member_valid_log_loss_ = 0.0, {}
        return ens

    def with_valid_log_loss(self, losses: dict[str, float]) -> Self:
        """This ensemble, with its members' validation log loss recorded (an ensemble made `of_fitted` has none)."""
        self.member_valid_log_loss_ = dict(losses)
        return self

    @property
    def member_weights(self) -> np.ndarray:
        """One weight per member, for people: the blend weights, or the size of each member's stacking
        coefficients (a matrix for multiclass and regression meta-learners)."""
        w = np.asarray(self.weights_, dtype="float64")
        if w.ndim == 1:
            return w
        return np.abs(w).reshape(w.shape[0], len(self.members_), -1).sum(axis=(0, 2))

    def _bag(self, X: pd.DataFrame, y: np.ndarray, X_valid: pd.DataFrame | None, y_valid: np.ndarray | None
             ) -> tuple[list[str], list[Learner]]:
        """`bags` fits of every learner, each on a bootstrap resample of the training rows."""
        names, members = [], []
        fits = [(learner, b) for learner in self.learners for b in range(self.bags)]
        for learner, b in progress(fits, "ensemble bagging", unit="fit"):
            rows = np.random.default_rng([self._seed, b]).integers(0, len(X), len(X))
            members.append(clone(learner).fit(X.iloc[rows], y[rows], X_valid, y_valid))
            names.append(f"{learner.kind}_bag{b}")
        return names, members

    def _out_of_fold(self, X: pd.DataFrame, y: np.ndarray) -> np.ndarray:
        """Each training row predicted by learners that never saw it: the meta-learner's inputs."""
        from sklearn.model_selection import KFold, StratifiedKFold

        oof: np.ndarray | None = None
        if self.task == "regression":
            splits = KFold(self.folds, shuffle=True, random_state=self._seed).split(X)
        else:  # a class rarer than the folds still lands in some folds; sklearn warns, the others stay stratified
            splits = StratifiedKFold(self.folds, shuffle=True, random_state=self._seed).split(X, y)
        for fit_idx, pred_idx in progress(splits, "ensemble stacking folds", total=self.folds, unit="fold"):
            X_fit, y_fit = X.iloc[fit_idx], y[fit_idx]
            X_hold, y_hold = X.iloc[pred_idx], y[pred_idx]
            held = np.stack([clone(learner).fit(X_fit, y_fit, X_hold, y_hold).predict_output(X_hold)
                             for learner in self.learners], axis=1)
            if oof is None:
                oof = np.zeros((len(X), *held.shape[1:]))
            oof[pred_idx] = held
        assert oof is not None
        return oof

    def _fit_blend_weights(self, preds: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Non-negative weights summing to 1 that minimize validation log loss (or squared error)."""
        def loss(z: np.ndarray) -> float:
            return valid_loss(y, np.tensordot(softmax(z), preds, axes=(0, 1)))

        res = minimize(loss, np.zeros(preds.shape[1]), method="L-BFGS-B")
        return softmax(res.x)

    def _meta_features(self, member_preds: np.ndarray) -> np.ndarray:
        """The stacking meta-learner's inputs: each member's positive-class logit (binary), log
        probabilities of every class (multiclass), or predicted values (regression)."""
        if self.task == "binary":
            return _clipped_logit(member_preds[:, :, 1])
        if self.task == "multiclass":
            return np.log(np.clip(member_preds, 1e-6, 1.0)).reshape(len(member_preds), -1)
        return member_preds

    def _fit_meta(self, oof: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, Any]:
        features = self._meta_features(oof)
        if self.task == "regression":
            from sklearn.linear_model import LinearRegression

            reg = LinearRegression(positive=True).fit(features, y)
            return reg.coef_.astype("float64"), float(reg.intercept_)
        from sklearn.linear_model import LogisticRegression

        meta = LogisticRegression(C=1.0, random_state=self._seed, max_iter=1000).fit(features, y)
        if self.task == "binary":
            return meta.coef_[0].astype("float64"), float(meta.intercept_[0])
        return meta.coef_.astype("float64"), meta.intercept_.astype("float64").tolist()

    def member_predictions(self, X: pd.DataFrame) -> np.ndarray:
        """Every member's output side by side: (n, members, k) probabilities or (n, members) values."""
        return np.stack([m.predict_output(X) for m in self.members_], axis=1)

    def combine(self, member_preds: np.ndarray) -> np.ndarray:
        """The ensemble's output from its members' outputs (see member_predictions)."""
        if self.method != "stacking":
            return np.tensordot(np.asarray(self.weights_), member_preds, axes=(0, 1))
        z = self._meta_features(member_preds) @ np.asarray(self.weights_).T + np.asarray(self.intercept_)
        if self.task == "binary":
            p1 = expit(z)
            return np.column_stack([1.0 - p1, p1])
        if self.task == "multiclass":
            return softmax(z, axis=1)
        return z

    def _output(self, X: pd.DataFrame) -> np.ndarray:
        return self.combine(self.member_predictions(X))

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        for name, member in zip(self.names, self.members_, strict=True):
            member.save(path / name)
        meta: dict[str, Any] = {"method": self.method, "folds": self.folds, "seed": self._seed, "bags": self.bags,
                                "members": self.names,
                                "weights_": np.asarray(self.weights_).tolist(), "intercept_": self.intercept_,
                                "member_valid_log_loss_": self.member_valid_log_loss_}
        (path / "ensemble.json").write_text(json.dumps(meta, indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path, device: str = "auto") -> Ensemble:
        """A saved ensemble whose members load on `device` (see Learner.load), whatever they trained on."""
        meta = json.loads((path / "ensemble.json").read_text())
        members = [Learner.load(path / name, device) for name in meta["members"]]
        ens = cls(members, meta["method"], meta["folds"], meta["seed"], meta.get("bags", 5))
        ens.members_, ens.names_ = members, meta["members"]
        ens.n_features_in_ = members[0].n_features_in_
        if ens.task != "regression":
            ens.classes_ = members[0].classes_
        ens.weights_ = np.asarray(meta["weights_"])
        ens.intercept_ = meta["intercept_"]
        ens.member_valid_log_loss_ = meta["member_valid_log_loss_"]
        return ens
