"""train: fit the base learners and combine them into a model bundle (models/trained; compress makes the challenger).

`train.max_rows` fits the learners on a seeded sample of the training rows (stratified by class for
classification, every class kept; in time order), read from the features file row group by row group so the
full table is never in memory; the metadata records the sample's size and what it was drawn from.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import numpy as np
import pandas as pd

from pipelines.bundle import ENSEMBLE_DIR, METADATA_FILE, TRANSFORM_FILE
from pipelines.config import Paths, Settings
from pipelines.contracts import Out, stage
from pipelines.io import atomic_dir, tree_sha256, write_json, write_text
from pipelines.lineage import git_commit, md5_of
from pipelines.metrics import choose_class_weights, choose_threshold, decision_of, improvement, score
from pipelines.models import Ensemble, build_learners, resolve_device
from pipelines.models.cluster import dask_cluster, describe
from pipelines.sampling import training_rows
from pipelines.transform import FeatureTransform
from pipelines.tuning import tune, tuning_html

log = logging.getLogger(__name__)


@stage(
    params=("seed", "schema.target", "train", "evaluate.threshold", "evaluate.costs", "promote.metric",
            "scale.dask_scheduler", "scale.dask_workers"),  # decisions are chosen on validation rows for the metric
    deps=("features", "validated"),
    # tuning_studies: the Optuna studies (SQLite), kept so a rerun resumes them; SQLite's transactions keep it
    # whole when a run is killed, as the renames keep the other outputs whole
    outs=(Out("trained"), Out("tuning_report", cache=False), Out("tuning_html", cache=False),
          Out("tuning_studies", cache=False)),
    metrics=("train_report",),
    atomic_outs=True,  # each written to a temp file or folder and renamed: DVC need not delete them first
    description="Fit the learners and the ensemble (tuned within the budget) into models/trained",
)
def run(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Fit on data/features/train, early-stop and combine on valid; write models/trained/."""
    target = settings.data_schema.target
    transform = FeatureTransform.load(paths.fitted_transform)
    train, train_total = training_rows(paths.split_features("train"), target, settings.train.max_rows, settings.seed,
                                       stratify=transform.task != "regression")
    valid = pd.read_parquet(paths.split_features("valid"))
    X, y = train.drop(columns=[target]), train[target].to_numpy()
    X_valid, y_valid = valid.drop(columns=[target]), valid[target].to_numpy()

    cfg = settings.train
    with dask_cluster(settings.scale.dask_scheduler, settings.scale.dask_workers) as client:
        trained_on = describe(client)  # LightGBM and XGBoost train there; the MLP trains here
        tuned = tune(build_learners(settings, transform), cfg.tuning, settings.seed, X, y, X_valid, y_valid,
                     paths.tuning_studies)
        ensemble = Ensemble(tuned.learners, cfg.ensemble, cfg.stacking_folds, random_state=settings.seed,
                            bags=cfg.bags)
        ensemble.fit(X, y, X_valid, y_valid)
    tuning = tuned.report
    write_json(paths.tuning_report, tuning)
    write_text(paths.tuning_html, tuning_html(tuned.studies, tuning))
    member_valid = ensemble.member_predictions(X_valid)
    combination = check_combination(settings, transform.task, y_valid, ensemble.combine(member_valid), member_valid,
                                    ensemble.names)
    if combination["served"] != "ensemble":  # a member alone is better on the gate's metric: it is what serves
        ensemble = Ensemble.of_fitted(ensemble.members_, ensemble.names,
                                      np.eye(len(ensemble.names))[ensemble.names.index(combination["served"])],
                                      random_state=settings.seed).with_valid_log_loss(ensemble.member_valid_log_loss_)
    threshold = combination["decision"]

    with atomic_dir(paths.trained) as out:
        shutil.copy2(paths.fitted_transform, out / TRANSFORM_FILE)
        ensemble.save(out / ENSEMBLE_DIR)
        version = "v" + tree_sha256(out)[:12]  # content-addressed: same data + params + code = same version
        metadata = {
            "version": version,
            "ensemble": ensemble.method,
            "learners": ensemble.names,
            "task": transform.task,
            "classes": transform.classes,
            "threshold": threshold.get("threshold", 0.5),
            "threshold_choice": threshold,
            **({"class_weights": threshold["class_weights"]} if "class_weights" in threshold else {}),
            "combination": combination,
            "weights": dict(zip(ensemble.names, ensemble.member_weights.tolist(), strict=True)),
            "member_valid_log_loss": ensemble.member_valid_log_loss_,
            "device": resolve_device(settings.train.device),
            "trained_on": trained_on,
            "member_devices": {n: getattr(m, "device_", "cpu") for n, m in zip(ensemble.names, ensemble.members_,
                                                                                strict=True)},
            "data_md5": md5_of(paths.validated_rows),
            "git_commit": git_commit(paths.root),
            "params": settings.train.model_dump(mode="json"),
            "tuned_params": {kind: t["best_params"] for kind, t in tuning.items()},
            "seed": settings.seed,
            "train_rows": len(train),
            "train_rows_total": train_total,  # the sample of train.max_rows was drawn from these
            "train_max_rows": settings.train.max_rows,
            "valid_rows": len(valid),
            "features": transform.feature_names,
        }
        write_json(out / METADATA_FILE, metadata)
    # the report names the ensemble as configured (what `dvc exp show` compares) and what serves of it
    summary = {"version": version, "ensemble": settings.train.ensemble, "served": combination["served"],
               "weights": {n: round(w, 4) for n, w in metadata["weights"].items()},
               # what the blend minimizes on the validation rows: log loss of probabilities, squared error of values
               f"member_valid_{'mse' if transform.task == 'regression' else 'log_loss'}":
                   {n: round(v, 4) for n, v in ensemble.member_valid_log_loss_.items()},
               "model_dir": str(paths.trained)}
    write_json(paths.train_report, {"version": version, "ensemble": settings.train.ensemble,
                                    "served": combination["served"],
                                    **{f"weight_{n}": w for n, w in metadata["weights"].items()}})
    log.info("trained ensemble %s", version)
    return summary


def pick_threshold(settings: Settings, task: str, y_valid: np.ndarray, output: np.ndarray) -> dict[str, Any]:
    """How labels are read off `output`: the binary cut-off (evaluate.threshold as set, or picked on the validation
    rows: auto), or the multiclass class weights picked on the validation rows for promote.metric."""
    cfg = settings.evaluate
    if task == "multiclass":
        chosen = choose_class_weights(y_valid, output, settings.promote.metric)
        if chosen["criterion"] != "argmax":
            log.info("class weights %s picked on %d validation rows (%s %.4f, argmax %.4f)", chosen["class_weights"],
                     len(y_valid), chosen["criterion"], chosen["value_on_valid"], chosen["argmax_value_on_valid"])
        return {"threshold": 0.5, **chosen}
    if task != "binary":
        return {"threshold": 0.5, "criterion": "none"}
    if cfg.threshold != "auto":
        return {"threshold": float(cfg.threshold), "criterion": "evaluate.threshold"}
    costs = (cfg.costs.false_positive, cfg.costs.false_negative) if cfg.costs else None
    chosen = choose_threshold(y_valid, output[:, 1], costs)
    log.info("threshold %.4f picked on %d validation rows (%s %.4f)", chosen["threshold"], len(y_valid),
             chosen["criterion"], chosen["value_on_valid"])
    return chosen


def check_combination(settings: Settings, task: str, y_valid: np.ndarray, output: np.ndarray, members: np.ndarray,
                      names: list[str]) -> dict[str, Any]:
    """The ensemble's combination against each member alone on the validation rows, for promote.metric, each with
    its own decision picked on those rows: `served` is "ensemble", or the member that is better than it (a blend
    is never served where one of its members is better on the gate's metric); `decision` is the served one's."""
    metric = settings.promote.metric
    candidates = {"ensemble": output} | ({} if len(names) < 2 else
                                         {name: members[:, i] for i, name in enumerate(names)})
    decisions = {name: pick_threshold(settings, task, y_valid, out) for name, out in candidates.items()}
    values = {name: score(metric, y_valid, out, decision_of(decisions[name])) for name, out in candidates.items()}
    served = "ensemble"
    for name in names if len(names) > 1 else []:
        best, alone = values[served], values[name]
        if alone is not None and (best is None or improvement(metric, alone, best) > 1e-9):
            served = name
    if served != "ensemble":
        log.info("the %s blend scores %s=%s on the validation rows, %s alone %s: %s alone is served",
                    settings.train.ensemble, metric, values["ensemble"], served, values[served], served)
    return {"metric": metric, "valid": values, "served": served, "decision": decisions[served],
            "decisions": decisions}
