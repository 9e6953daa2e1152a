"""Tuning quality at equal trials: Optuna (pipelines.tuning: seeded TPE, median pruning) vs a plain random search.

Usage: python benchmarks/tuning.py [--trials 20] [--learners lightgbm xgboost] [--seeds 1] [--threads N]
       [--params params.yaml]
Runs collect, validate and prepare on the default data of params.yaml (the simulator) in a temporary project,
then tunes each learner over `train.tuning.space` both ways with the same number of trials: the best validation
log loss, how many trials were pruned, the seconds. The random search is
the one train used before Optuna (trial 0 = the configured params, then uniform, log-uniform or integer draws
from (seed, learner, trial)); it lives here only, as the baseline.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from _project import trained_project  # beside this script

from pipelines.config import Paths, SearchRange, load_settings
from pipelines.models import Learner, build_learners
from pipelines.models.base import valid_loss
from pipelines.transform import FeatureTransform
from pipelines.tuning import tune


def random_draw(space: dict[str, SearchRange], rng: np.random.Generator) -> dict[str, Any]:
    drawn: dict[str, Any] = {}
    for name, r in sorted(space.items()):
        if r.scale == "int":
            drawn[name] = int(rng.integers(int(r.low), int(r.high) + 1))
        elif r.scale == "log":
            drawn[name] = float(math.exp(rng.uniform(math.log(r.low), math.log(r.high))))
        else:
            drawn[name] = float(rng.uniform(r.low, r.high))
    return drawn


def random_search(learner: Learner, j: int, space: dict[str, SearchRange], trials: int, seed: int,
                  data: tuple[pd.DataFrame, np.ndarray, pd.DataFrame, np.ndarray]) -> dict[str, Any]:
    X, y, Xv, yv = data
    best = math.inf
    for k in range(trials):
        params = {} if k == 0 else random_draw(space, np.random.default_rng([seed, j, k]))
        candidate = type(learner)(**{**learner.get_params(), **params}).fit(X, y, Xv, yv)
        best = min(best, valid_loss(yv, candidate.predict_output(Xv)))
    return {"best": best, "pruned": 0}


def optuna_search(learner: Learner, space: dict[str, SearchRange], trials: int, seed: int, settings: Any,
                  data: tuple[pd.DataFrame, np.ndarray, pd.DataFrame, np.ndarray], db: Path) -> dict[str, Any]:
    X, y, Xv, yv = data
    cfg = settings.train.tuning.model_copy(update={"trials": trials, "time_budget_s": 1e9,
                                                   "space": {learner.kind: space}})
    report = tune([learner], cfg, seed, X, y, Xv, yv, db).report[learner.kind]
    return {"best": report["best_valid_log_loss"], "pruned": report["pruned"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--learners", nargs="+", default=None, help="default: train.learners with a search space")
    parser.add_argument("--seeds", type=int, default=1, help="repeat with seed, seed+1, ...")
    parser.add_argument("--threads", type=int, default=None, help="default: train.threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    base = load_settings(args.params)
    kinds = args.learners or [k for k in base.train.learners if base.train.tuning.space.get(k)]
    with trained_project(args.params, "amaas-tuning-bench-", ("collect", "validate", "prepare")) as (root, _):
        paths = Paths(root)
        settings = load_settings(root / "params.yaml")
        target = settings.data_schema.target
        train = pd.read_parquet(paths.split_features("train"))
        valid = pd.read_parquet(paths.split_features("valid"))
        data = (train.drop(columns=[target]), train[target].to_numpy(), valid.drop(columns=[target]),
                valid[target].to_numpy())
        transform = FeatureTransform.load(paths.fitted_transform)
        threads = args.threads or settings.train.threads
        print(f"default data: {len(train):,} train rows, {len(valid):,} validation rows, "
              f"{train.shape[1] - 1} features; {args.trials} trials per learner and method; {args.seeds} seed(s) "
              f"from {settings.seed}; {threads} thread(s)")
        print(f"{'learner':<9} {'seed':>4} {'method':<8} {'best valid log loss':>20} {'pruned':>6} {'seconds':>8}")
        totals: dict[str, list[float]] = {}
        for s in range(args.seeds):
            seed = settings.seed + s
            learners = {lr.kind: lr.set_params(threads=threads, random_state=seed)
                        for lr in build_learners(settings, transform)}
            for kind in kinds:
                j = settings.train.learners.index(kind)  # as train numbered its learners for the random draws
                space = settings.train.tuning.space[kind]  # type: ignore[index]
                with tempfile.TemporaryDirectory() as tmp:
                    for method in ("random", "optuna"):
                        start = time.perf_counter()
                        r = (random_search(learners[kind], j, space, args.trials, seed, data) if method == "random"
                             else optuna_search(learners[kind], space, args.trials, seed, settings, data,
                                                Path(tmp) / "optuna.db"))
                        took = time.perf_counter() - start
                        totals.setdefault(f"{kind} {method}", []).append(r["best"])
                        print(f"{kind:<9} {seed:>4} {method:<8} {r['best']:>20.5f} {r['pruned']:>6} {took:>8.1f}",
                              flush=True)
        if args.seeds > 1:
            for key, values in totals.items():
                print(f"mean over seeds: {key:<18} {np.mean(values):.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
