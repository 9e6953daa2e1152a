"""Optuna tuning: the budget holds (pruned trials count), trial 0 is the configured params, a bad region is pruned on
the learners' validation curves, a study resumed after an interrupt ends where an uninterrupted one does, and the
report is strict JSON with an HTML page beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from sklearn.base import clone

from pipelines.config import Paths, SearchRange, TuningConfig
from pipelines.io import write_json
from pipelines.models import Learner, LightGBMLearner, build_learners
from pipelines.models.base import valid_loss
from pipelines.runner import STAGES, run_stage
from pipelines.tuning import TuningStoreError, data_digest, open_storage, study_name, tune, tuning_html
from tests.conftest import write_params

SPACE = {"lightgbm": {"learning_rate": SearchRange(low=1e-4, high=0.3, scale="log"),
                      "num_leaves": SearchRange(low=4, high=32, scale="int")}}


def _learners(data: Any, *kinds: str) -> list[Learner]:
    """The small settings' learners of these kinds, on one thread (two contend badly on a busy machine)."""
    settings, transform, *_ = data
    return [lr.set_params(threads=1) for lr in build_learners(settings, transform) if lr.kind in kinds]


def _tune(data: Any, db: Path, trials: int, learners: list[Learner] | None = None, space: Any = None,
          time_budget_s: float = 600) -> Any:
    settings, _, X, y, Xv, yv = data
    cfg = TuningConfig(trials=trials, time_budget_s=time_budget_s, space=SPACE if space is None else space)
    return tune(learners or _learners(data, "lightgbm"), cfg, settings.seed, X, y, Xv, yv, db)


def _strict(path: Path) -> Any:
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {path.name}"))


@pytest.mark.parametrize("kind", ["lightgbm", "xgboost", "mlp"])
def test_learners_report_their_validation_curve(data, kind):
    """The monitor sees every step, and the best loss it saw is the fitted model's validation loss (early stopping
    keeps the best step); without validation rows a monitor is refused, and whatever it raises stops the fit."""
    _, _, X, y, Xv, yv = data
    learner = _learners(data, kind)[0]
    curve: list[tuple[int, float]] = []
    learner.fit(X, y, Xv, yv, monitor=lambda step, loss: curve.append((step, loss)))
    steps = [s for s, _ in curve]
    assert steps == list(range(1, len(curve) + 1)) and len(curve) >= 2
    # (the MLP keeps an epoch only if it improves by 1e-5)
    assert min(loss for _, loss in curve) == pytest.approx(valid_loss(yv, learner.predict_output(Xv)), abs=1e-5)

    with pytest.raises(ValueError, match="pass X_valid and y_valid"):
        learner.fit(X, y, monitor=lambda step, loss: None)

    def stop(step: int, loss: float) -> None:
        if step == 2:
            raise optuna.TrialPruned("enough")

    with pytest.raises(optuna.TrialPruned):
        learner.fit(X, y, Xv, yv, monitor=stop)


@pytest.mark.slow  # a Dask LocalCluster
def test_learners_on_dask_hand_the_monitor_their_curve_after_training(data):
    """On a cluster the callbacks would run on the workers: the monitor sees the recorded curve afterwards."""
    from pipelines.models.cluster import dask_cluster

    _, _, X, y, Xv, yv = data
    with dask_cluster("local", 1):
        for learner in _learners(data, "lightgbm", "xgboost"):
            curve: list[tuple[int, float]] = []
            learner.fit(X, y, Xv, yv, monitor=lambda step, loss, curve=curve: curve.append((step, loss)))
            assert [s for s, _ in curve] == list(range(1, len(curve) + 1)) and len(curve) >= 2
            best = valid_loss(yv, learner.predict_output(Xv))
            assert min(loss for _, loss in curve) == pytest.approx(best, abs=1e-5), learner.kind


@pytest.mark.slow  # 14 small LightGBM fits
def test_budget_trial_zero_and_pruning_of_a_bad_region(data, tmp_path):
    """14 trials ran, pruned ones counted; trial 0 is the configured params; a trial is pruned once its curve is
    worse than the median of the completed trials at the same step, after the warm-up (early_stopping_rounds) and
    before the last round; every trial in the clearly bad region (a learning rate too small to learn much in 60
    rounds) drawn once the pruner was active was pruned; the best trial is kept."""
    learners = _learners(data, "lightgbm", "mlp")
    result = _tune(data, tmp_path / "optuna.db", 14, learners)
    assert list(result.report) == ["lightgbm"]  # the MLP has no search space here: left as configured
    assert result.learners[1] is learners[1]
    lgb = result.report["lightgbm"]
    trials = lgb["trials"]
    assert len(trials) == 14 and lgb["completed"] + lgb["pruned"] == 14
    assert trials[0]["params"] == {"learning_rate": learners[0].learning_rate, "num_leaves": learners[0].num_leaves}
    pruned = [t for t in trials if t["state"] == "pruned"]
    assert pruned and lgb["pruned"] == len(pruned)
    frozen = result.studies["lightgbm"].trials
    for t in pruned:
        step = t["pruned_at_step"]
        assert learners[0].early_stopping_rounds <= step < learners[0].n_estimators
        earlier = [f.intermediate_values[step] for f in frozen[:t["trial"]]
                   if f.state == optuna.trial.TrialState.COMPLETE and step in f.intermediate_values]
        assert t["last_reported_valid_log_loss"] > np.median(earlier)
    active = [t for t in trials if sum(u["state"] == "complete" for u in trials[:t["trial"]]) >= 5]
    bad = [t for t in active if t["params"]["learning_rate"] < 0.01]
    assert bad and all(t["state"] == "pruned" for t in bad), bad
    complete = [t["valid_log_loss"] for t in trials if t["state"] == "complete"]
    assert lgb["best_valid_log_loss"] == min(complete) <= lgb["baseline_valid_log_loss"]
    assert trials[lgb["best_trial"]]["params"] == lgb["best_params"]
    assert {k: result.learners[0].get_params()[k] for k in lgb["best_params"]} == lgb["best_params"]
    assert not hasattr(result.learners[0], "booster_")  # unfitted: the ensemble fits it

    write_json(tmp_path / "tuning.json", result.report)  # strict: no NaN or infinity anywhere
    assert _strict(tmp_path / "tuning.json")["lightgbm"]["trials"] == json.loads(json.dumps(trials))
    page = tuning_html(result.studies, result.report)
    assert 'id="lightgbm-history"' in page and 'id="lightgbm-importances"' in page


class Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.slow  # about 25 small LightGBM fits
def test_a_resumed_study_ends_where_an_uninterrupted_one_does(data, tmp_path, monkeypatch):
    """The acceptance test: with the same seed, a study interrupted (a stop after 4 trials, Ctrl-C inside a fit, a
    kill that leaves a trial running) and resumed gives the same trials and the same best trial as one run."""
    whole = _tune(data, tmp_path / "whole.db", 10).report["lightgbm"]

    db = tmp_path / "resumed.db"
    assert _tune(data, db, 4).report["lightgbm"]["reused"] == 0  # stopped after 4 trials
    fit, calls = LightGBMLearner.fit, []

    def interrupted_fit(self: LightGBMLearner, *args: Any, **kwargs: Any) -> LightGBMLearner:
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C inside the 7th trial
            raise Interrupt()
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(LightGBMLearner, "fit", interrupted_fit)
    with pytest.raises(Interrupt):
        _tune(data, db, 10)
    monkeypatch.setattr(LightGBMLearner, "fit", fit)
    learner = _learners(data, "lightgbm")[0]
    settings, _, X, y, Xv, yv = data
    name = study_name(learner, SPACE["lightgbm"], settings.seed, data_digest(X, y, Xv, yv))
    optuna.load_study(study_name=name, storage=open_storage(db)).ask()  # a kill -9 leaves this trial running

    resumed = _tune(data, db, 10).report["lightgbm"]
    assert resumed["reused"] == 6 and resumed["interrupted"] == 2
    assert resumed["trials"] == whole["trials"]
    assert (resumed["best_trial"], resumed["best_params"], resumed["best_valid_log_loss"]) == \
        (whole["best_trial"], whole["best_params"], whole["best_valid_log_loss"])
    # a rerun with the same inputs fits nothing; a smaller budget is the first trials of the study
    assert _tune(data, db, 10).report["lightgbm"]["trials"] == whole["trials"]
    assert _tune(data, db, 3).report["lightgbm"]["trials"] == whole["trials"][:3]


def test_the_study_name_follows_what_decides_the_trials(data):
    settings, _, X, y, Xv, yv = data
    learner = _learners(data, "lightgbm")[0]
    space = SPACE["lightgbm"]
    digest = data_digest(X, y, Xv, yv)
    name = study_name(learner, space, settings.seed, digest)
    assert name.startswith("lightgbm-") and name == study_name(clone(learner).set_params(learning_rate=0.2), space,
                                                               settings.seed, digest)  # a searched param
    changed = [study_name(clone(learner).set_params(n_estimators=61), space, settings.seed, digest),
               study_name(learner, {**space, "num_leaves": SearchRange(low=4, high=33, scale="int")}, settings.seed,
                          digest),
               study_name(learner, space, settings.seed + 1, digest),
               study_name(learner, space, settings.seed, data_digest(X.iloc[1:], y[1:], Xv, yv))]
    assert name not in changed and len(set(changed)) == 4


def test_time_budget_stops_the_search(data, tmp_path):
    report = _tune(data, tmp_path / "optuna.db", 50, time_budget_s=0.001).report["lightgbm"]
    assert 1 <= len(report["trials"]) < 50 and report["time_budget_hit"]


def test_no_tuning_still_creates_the_study_database_and_a_page_that_says_so(data, tmp_path):
    db = tmp_path / "models" / "tuning" / "optuna.db"
    result = _tune(data, db, 0)
    assert result.report == {} and result.studies == {} and db.stat().st_size > 0  # DVC warns of an empty output
    assert "train.tuning.trials" in tuning_html(result.studies, result.report)
    # made without Optuna: a later search opens it, and a run with nothing to tune leaves its studies alone
    study = _tune(data, db, 1).report["lightgbm"]["study"]
    assert _tune(data, db, 0, space={}).report == {}
    assert _tune(data, db, 1).report["lightgbm"]["reused"] == 1
    assert [s.study_name for s in optuna.get_all_study_summaries(open_storage(db))] == [study]


def test_importances_are_left_out_with_one_searched_param(data, tmp_path):
    space = {"lightgbm": {"num_leaves": SearchRange(low=4, high=32, scale="int")}}
    result = _tune(data, tmp_path / "optuna.db", 2, space=space)
    page = tuning_html(result.studies, result.report)
    assert 'id="lightgbm-history"' in page and "importances" not in page.split('id="lightgbm-history"')[0]
    assert 'id="lightgbm-importances"' not in page and "need at least 2 completed trials and 2 searched" in page


def test_a_damaged_study_database_names_the_fix(tmp_path):
    db = tmp_path / "optuna.db"
    db.write_text("{}")
    with pytest.raises(TuningStoreError, match=r"optuna.db is not a study database .* delete it"):
        open_storage(db)


@pytest.mark.slow  # the stages up to train on a small project, and train again
def test_the_train_stage_writes_the_report_the_page_and_resumes_its_studies(tmp_path):
    params = write_params(tmp_path, **{"train.learners": ["lightgbm", "mlp"], "train.tuning.trials": 3})
    for name in STAGES[:STAGES.index("train") + 1]:
        run_stage(name, params, tmp_path)
    paths = Paths(tmp_path)
    report = _strict(paths.tuning_report)
    assert set(report) == {"lightgbm", "mlp"} and all(len(r["trials"]) == 3 for r in report.values())
    assert paths.tuning_studies.is_file() and 'id="mlp-history"' in paths.tuning_html.read_text()
    metadata = _strict(paths.trained / "metadata.json")
    assert metadata["tuned_params"] == {kind: r["best_params"] for kind, r in report.items()}

    run_stage("train", params, tmp_path)
    again = _strict(paths.tuning_report)
    assert all(r["reused"] == 3 for r in again.values())
    assert {k: r["trials"] for k, r in again.items()} == {k: r["trials"] for k, r in report.items()}
    assert np.isfinite([r["best_valid_log_loss"] for r in again.values()]).all()
