"""Budgeted hyperparameter search for each base learner with Optuna, scored on validation rows.

Each learner with a search space (`train.tuning.space`) gets a study: a TPE sampler seeded from `seed`, and a
median pruner that stops a trial whose validation curve (reported every few boosting rounds, or every epoch) is
worse than the median of the completed trials at the same step. Trial 0 is always the configured parameters, so
tuning can only keep or improve the validation loss. `trials` counts every trial that ended, pruned ones
included; `time_budget_s` stops a learner's search early within one run.

The studies live in SQLite (Paths.tuning_studies). A study is named by the learner and a hash of everything that
decides its trials (the training and validation rows, the space, the learner's other params, the seed, the
search settings), so a rerun with the same inputs resumes it: the trials that ended are reused, only the missing
ones run; changed inputs start a new study. A resumed study ends where an uninterrupted one would: trial i draws
from a TPE sampler seeded with (seed, i), i counting the trials that ended before it, and a trial cut off (a kill,
an interrupt) is marked failed and left out of that count, so it is drawn again. The result depends on the
inputs and `trials` only: with fewer `trials` than a study holds, the first `trials` of them are the search.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import html
import json
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines.config import SearchRange, TuningConfig
from pipelines.models.base import Monitor, valid_loss
from pipelines.progress import progress

if TYPE_CHECKING:
    import optuna
    from optuna.samplers import TPESampler
    from optuna.trial import FrozenTrial, TrialState

    from pipelines.models import Learner

# Optuna (with SQLAlchemy, about 1.3 CPU s to import) is imported where a search runs: a train with nothing to tune
# (`trials: 0`, the default, or no learner with a space) creates the study database without it.

log = logging.getLogger(__name__)

TPE_STARTUP_TRIALS = 5  # random draws before TPE models the history (trial 0, the configured params, is one)
PRUNER_STARTUP_TRIALS = 5  # completed trials before any trial is pruned (Optuna's default)
# how a learner's validation curve is followed: a report every so many steps (boosting rounds, epochs), and no
# pruning before as many steps as its early stopping waits for an improvement (the param that says how many)
CURVES = {"lightgbm": (10, "early_stopping_rounds"), "xgboost": (10, "early_stopping_rounds"), "mlp": (1, "patience")}
ENDED = "ended"  # user attr of a trial that ended here (completed, pruned, or a non-finite loss): it counts
SEARCH = {"sampler": "tpe", "tpe_startup_trials": TPE_STARTUP_TRIALS, "pruner": "median",
          "pruner_startup_trials": PRUNER_STARTUP_TRIALS, "curves": CURVES}  # and Optuna's version (study_name)


class TuningStoreError(RuntimeError):
    """The study database cannot be read; the message says how to start afresh."""


@dataclass
class Tuning:
    """What `tune` found: the learners to train (best params set, unfitted), the report, the studies."""

    learners: list[Learner]
    report: dict[str, Any]  # reports/tuning.json: per tuned learner
    studies: dict[str, optuna.Study]


def tune(learners: list[Learner], cfg: TuningConfig, seed: int, X: pd.DataFrame, y: np.ndarray,
         X_valid: pd.DataFrame, y_valid: np.ndarray, storage_path: Path) -> Tuning:
    """Each learner with its best parameters found within the budget, a report of every trial, the studies.
    The study database is opened (created) even when nothing is tuned: train declares it as an output."""
    if cfg.trials == 0 or not any(cfg.space.get(learner.kind) for learner in learners):  # type: ignore[call-overload]
        _create_database(storage_path)
        return Tuning(list(learners), {}, {})
    import optuna

    optuna.logging.disable_default_handler()  # Optuna's lines go through logging like every other
    optuna.logging.enable_propagation()
    storage = open_storage(storage_path)
    data = data_digest(X, y, X_valid, y_valid)
    result = Tuning([], {}, {})
    for learner in learners:
        space = cfg.space.get(learner.kind, {})  # type: ignore[call-overload]
        if cfg.trials == 0 or not space:
            result.learners.append(learner)
            continue
        every, patience = CURVES[learner.kind]
        warmup = int(getattr(learner, patience))
        study = optuna.create_study(
            storage=storage, study_name=study_name(learner, space, seed, data), direction="minimize",
            load_if_exists=True, sampler=trial_seeded_tpe()(seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=warmup))
        started = time.monotonic()
        reused, cut_short = _search(study, learner, space, cfg, (every, warmup), (X, y, X_valid, y_valid))
        report = _report(study, learner, space, cfg.trials, reused, time.monotonic() - started, cut_short)
        result.report[learner.kind] = report
        result.studies[learner.kind] = study
        result.learners.append(type(learner)(**{**learner.get_params(), **report["best_params"]}))
    return result


def _create_database(path: Path) -> None:
    """The study database at `path` left as it is (its studies kept for a later search), or an empty SQLite database
    where there is none: Optuna creates its tables in it when a search opens it."""
    if path.is_file() and path.stat().st_size > 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("VACUUM")  # writes the header page: a 0-byte file is a database to SQLite, but DVC warns of it


def open_storage(path: Path) -> optuna.storages.RDBStorage:
    """The SQLite database of the studies at `path`, created if missing."""
    import optuna
    import sqlalchemy.exc

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(f"sqlite:///{path}")
    except (sqlalchemy.exc.DatabaseError, RuntimeError) as exc:
        raise TuningStoreError(f"{path} is not a study database Optuna {optuna.__version__} can read "
                               f"({str(exc).splitlines()[0]}): delete it, and tuning starts its studies afresh"
                               ) from exc


def data_digest(X: pd.DataFrame, y: np.ndarray, X_valid: pd.DataFrame, y_valid: np.ndarray) -> str:
    """A hash of the rows a search is scored on: its data version."""
    digest = hashlib.sha256()
    for frame in (X, X_valid):
        digest.update(json.dumps([list(map(str, frame.columns)), list(map(str, frame.dtypes))]).encode())
        digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    for labels in (y, y_valid):
        digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()


def study_name(learner: Learner, space: dict[str, SearchRange], seed: int, data: str) -> str:
    """The learner kind and a hash of what decides its trials: data, space, the params not searched, seed, search."""
    import optuna

    fixed = {k: v for k, v in learner.get_params().items() if k not in space}
    key = json.dumps({"data": data, "space": {n: r.model_dump() for n, r in space.items()}, "fixed": fixed,
                      "seed": seed, "search": {**SEARCH, "optuna": optuna.__version__}}, sort_keys=True, default=str)
    return f"{learner.kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


@functools.cache
def trial_seeded_tpe() -> Callable[[int], optuna.samplers.BaseSampler]:
    """TrialSeededTPE, an Optuna sampler: defined where a search first needs it, as it subclasses Optuna's."""
    from optuna.samplers import BaseSampler, TPESampler

    class TrialSeededTPE(BaseSampler):
        """TPE whose draws for a trial depend on the seed, the study's history and the trial's index only.

        One seeded TPESampler draws from one random stream for the whole study, so a study resumed in a new process
        (a fresh stream) would draw other parameters than an uninterrupted one. Here each trial gets its own
        TPESampler, seeded with (seed, i), i being the number of trials that ended before it."""

        def __init__(self, seed: int) -> None:
            self._seed = seed
            self._by_trial: dict[int, TPESampler] = {}

        def _tpe(self, study: optuna.Study, trial: FrozenTrial) -> TPESampler:
            if trial.number not in self._by_trial:
                index = len(ended_trials(study))
                trial_seed = int(np.random.SeedSequence([self._seed, index]).generate_state(1)[0])
                self._by_trial[trial.number] = TPESampler(n_startup_trials=TPE_STARTUP_TRIALS, seed=trial_seed)
            return self._by_trial[trial.number]

        def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
            self._tpe(study, trial).before_trial(study, trial)

        def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial
                                        ) -> dict[str, optuna.distributions.BaseDistribution]:
            return self._tpe(study, trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                            search_space: dict[str, optuna.distributions.BaseDistribution]) -> dict[str, Any]:
            return self._tpe(study, trial).sample_relative(study, trial, search_space)

        def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                               param_distribution: optuna.distributions.BaseDistribution) -> Any:
            return self._tpe(study, trial).sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                        values: Sequence[float] | None) -> None:
            self._tpe(study, trial).after_trial(study, trial, state, values)
            self._by_trial.pop(trial.number, None)

    return TrialSeededTPE


def ended_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that count, in order: those that ended here (not those cut off by a kill or an interrupt)."""
    return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.user_attrs.get(ENDED)]


def configured(learner: Learner, space: dict[str, SearchRange]) -> dict[str, Any]:
    """The learner's configured values of the searched params: trial 0."""
    params = learner.get_params()
    return {name: params[name] for name in sorted(space)}


def _search(study: optuna.Study, learner: Learner, space: dict[str, SearchRange], cfg: TuningConfig,
            curve: tuple[int, int], data: tuple[pd.DataFrame, np.ndarray, pd.DataFrame, np.ndarray]
            ) -> tuple[int, bool]:
    """Run the trials the study still lacks; (how many were reused, whether the time budget cut the run short)."""
    from optuna.trial import TrialState

    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(stale.number, state=TrialState.FAIL)  # a killed run's: not counted, drawn again
    reused = len(ended_trials(study))
    if reused == 0 and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.enqueue_trial(configured(learner, space))
    todo = max(cfg.trials - reused, 0)
    if reused:
        log.info("tuning %s: study %s resumed, %d of %d trials reused", learner.kind, study.study_name,
                 min(reused, cfg.trials), cfg.trials)
    started = time.monotonic()
    for k in progress(range(todo), f"tuning {learner.kind}", total=todo, unit="trial"):
        if k > 0 and time.monotonic() - started > cfg.time_budget_s:
            log.info("tuning %s: time budget of %.0f s spent after %d of %d trials", learner.kind,
                     cfg.time_budget_s, reused + k, cfg.trials)
            return reused, True
        _run_trial(study, learner, space, curve, data)
    return reused, False


def _run_trial(study: optuna.Study, learner: Learner, space: dict[str, SearchRange], curve: tuple[int, int],
               data: tuple[pd.DataFrame, np.ndarray, pd.DataFrame, np.ndarray]) -> None:
    """One trial: fit with the drawn params, pruned on the validation curve, scored on the validation rows."""
    import optuna
    from optuna.trial import TrialState

    X, y, X_valid, y_valid = data
    trial = study.ask()
    try:
        params = {name: _suggest(trial, name, r) for name, r in sorted(space.items())}
        candidate = type(learner)(**{**learner.get_params(), **params})
        candidate.fit(X, y, X_valid, y_valid, monitor=_pruning_monitor(trial, *curve))
        loss = valid_loss(y_valid, candidate.predict_output(X_valid))
    except optuna.TrialPruned:
        trial.set_user_attr(ENDED, True)
        study.tell(trial, state=TrialState.PRUNED)
        return
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)  # interrupted or broken: not counted, drawn again on a rerun
        raise
    trial.set_user_attr(ENDED, True)
    if math.isfinite(loss):
        study.tell(trial, loss)
    else:
        log.warning("tuning %s: trial %d with %s gave a validation loss of %s: counted as failed", learner.kind,
                    trial.number, params, loss)
        study.tell(trial, state=TrialState.FAIL)


def _suggest(trial: optuna.Trial, name: str, r: SearchRange) -> Any:
    if r.scale == "int":
        return trial.suggest_int(name, int(r.low), int(r.high))
    return trial.suggest_float(name, r.low, r.high, log=r.scale == "log")


def _pruning_monitor(trial: optuna.Trial, every: int, warmup: int) -> Monitor:
    """A learner's fit monitor that reports the best validation loss so far every `every` steps from the warm-up on
    (a report is a database write; none before the pruner may act), and prunes."""
    import optuna

    best = math.inf

    def monitor(step: int, loss: float) -> None:
        nonlocal best
        best = min(best, loss)  # early stopping keeps the best round: that is the curve to judge
        if step % every == 0 and step >= warmup:
            trial.report(best, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}")

    return monitor


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _report(study: optuna.Study, learner: Learner, space: dict[str, SearchRange], budget: int, reused: int,
            elapsed: float, cut_short: bool) -> dict[str, Any]:
    """reports/tuning.json of one learner: the best trial and every trial of the search (the first `budget`)."""
    from optuna.trial import TrialState

    counted = ended_trials(study)[:budget]
    trials: list[dict[str, Any]] = []
    for i, t in enumerate(counted):
        pruned = t.state == TrialState.PRUNED
        trials.append({"trial": i, "state": t.state.name.lower(), "params": t.params,
                       "valid_log_loss": _finite(t.value) if t.state == TrialState.COMPLETE else None,
                       "pruned_at_step": t.last_step if pruned else None,
                       "last_reported_valid_log_loss": _finite(t.intermediate_values.get(t.last_step))
                       if t.last_step is not None else None})
    complete = [(t["valid_log_loss"], t["trial"]) for t in trials if t["valid_log_loss"] is not None]
    best = min(complete) if complete else None  # ties: the earliest trial
    if best is None:
        log.warning("tuning %s: no trial completed with a finite loss; the configured params stay", learner.kind)
    best_params = dict(trials[best[1]]["params"]) if best is not None else configured(learner, space)
    baseline = trials[0]["valid_log_loss"] if trials else None
    log.info("tuning %s: best valid loss %s of %d trials (%d pruned) with %s", learner.kind,
             f"{best[0]:.5f}" if best else "none", len(trials), sum(t["state"] == "pruned" for t in trials),
             best_params)
    return {
        "study": study.study_name,
        "best_trial": best[1] if best is not None else None,
        "best_params": best_params,
        "best_valid_log_loss": best[0] if best is not None else None,
        "baseline_valid_log_loss": baseline,
        "trials": trials,
        "completed": sum(t["state"] == "complete" for t in trials),
        "pruned": sum(t["state"] == "pruned" for t in trials),
        "failed": sum(t["state"] == "fail" for t in trials),
        "reused": min(reused, budget),
        "interrupted": sum(t.state == TrialState.FAIL and not t.user_attrs.get(ENDED)
                           for t in study.get_trials(deepcopy=False)),
        "time_budget_hit": cut_short,
        "elapsed_s": round(elapsed, 3),
    }


def tuning_html(studies: dict[str, optuna.Study], report: dict[str, Any]) -> str:
    """reports/tuning.html: Optuna's optimization history and parameter importances of each tuned learner."""
    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>amaas tuning</title></head><body>',
             "<h1>Hyperparameter tuning (validation loss)</h1>"]
    if not studies:
        parts.append("<p>No learner was tuned: set <code>train.tuning.trials</code> above 0 and give the learner "
                     "a search space in <code>train.tuning.space</code> (params.yaml).</p>")
    plotly_js: bool | str = True  # plotly.js once, inline: the page works offline
    if studies:
        import optuna.visualization
    for kind, study in studies.items():
        r = report[kind]
        parts.append(f"<h2>{html.escape(kind)}</h2><p>study {html.escape(r['study'])}: {len(r['trials'])} trials, "
                     f"{r['pruned']} pruned; best validation loss {r['best_valid_log_loss']} with "
                     f"{html.escape(json.dumps(r['best_params'], sort_keys=True))}</p>")
        history = optuna.visualization.plot_optimization_history(study)
        parts.append(history.to_html(full_html=False, include_plotlyjs=plotly_js, div_id=f"{kind}-history"))
        plotly_js = False
        if r["completed"] < 2 or len(r["best_params"]) < 2:
            parts.append(f"<p>Parameter importances need at least 2 completed trials and 2 searched params "
                         f"({r['completed']} and {len(r['best_params'])} here).</p>")
            continue
        importances = optuna.visualization.plot_param_importances(study)
        parts.append(importances.to_html(full_html=False, include_plotlyjs=False, div_id=f"{kind}-importances"))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
