"""Budgeted hyperparameter search for each base learner: seeded random search, scored on validation rows.

Trial 0 is always the configured parameters, so tuning can only keep or improve the validation log
loss. `train.tuning.trials` bounds the search, and `time_budget_s` cuts it short per learner. With the
trial budget the binding one, the search is reproducible: trial k of learner j always draws the same
parameters from (seed, j, k).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import clone

from pipelines.config import SearchRange, TuningConfig
from pipelines.models import Learner
from pipelines.models.base import valid_loss

log = logging.getLogger(__name__)


def sample(space: dict[str, SearchRange], rng: np.random.Generator) -> dict[str, Any]:
    """One draw from a search space: uniform, log-uniform, or uniform over integers."""
    drawn: dict[str, Any] = {}
    for name, r in sorted(space.items()):
        if r.scale == "int":
            drawn[name] = int(rng.integers(int(r.low), int(r.high) + 1))
        elif r.scale == "log":
            drawn[name] = float(math.exp(rng.uniform(math.log(r.low), math.log(r.high))))
        else:
            drawn[name] = float(rng.uniform(r.low, r.high))
    return drawn


def tune(learners: list[Learner], cfg: TuningConfig, seed: int, X: pd.DataFrame, y: np.ndarray,
         X_valid: pd.DataFrame, y_valid: np.ndarray) -> tuple[list[Learner], dict[str, Any]]:
    """Each learner with its best parameters found within the budget, and a report of every trial."""
    tuned, report = [], {}
    for j, learner in enumerate(learners):
        space = cfg.space.get(learner.kind, {})  # type: ignore[call-overload]
        if cfg.trials == 0 or not space:
            tuned.append(learner)
            continue
        started, trials = time.monotonic(), []
        best, best_loss = learner, math.inf
        for k in range(cfg.trials):
            if k > 0 and time.monotonic() - started > cfg.time_budget_s:
                log.info("tuning %s: time budget of %.0f s spent after %d trials", learner.kind, cfg.time_budget_s, k)
                break
            params = {} if k == 0 else sample(space, np.random.default_rng([seed, j, k]))
            candidate = type(learner)(**{**learner.get_params(), **params})
            loss = valid_loss(y_valid, candidate.fit(X, y, X_valid, y_valid).predict_output(X_valid))
            trials.append({"trial": k, "params": params, "valid_log_loss": loss})
            if loss < best_loss:
                best, best_loss = candidate, loss
        chosen = {name: best.get_params()[name] for name in space}
        log.info("tuning %s: best valid log loss %.5f of %d trials with %s", learner.kind, best_loss, len(trials),
                 chosen)
        report[learner.kind] = {"best_params": chosen, "best_valid_log_loss": best_loss,
                                "baseline_valid_log_loss": trials[0]["valid_log_loss"], "trials": trials}
        tuned.append(clone(best))
    return tuned, report
