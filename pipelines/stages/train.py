"""train: fit the base learners and combine them into a model bundle (models/trained; compress makes the challenger).

`train.max_rows` fits the learners on a seeded sample of the training rows (stratified by class for
classification, every class kept; in time order), read from the features file row group by row group so the
full table is never in memory; the metadata records the sample's size and what it was drawn from.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.bundle import ENSEMBLE_DIR, METADATA_FILE, TRANSFORM_FILE
from pipelines.config import Paths, Settings
from pipelines.contracts import Out, stage
from pipelines.io import atomic_dir, tree_sha256, write_json, write_text
from pipelines.lineage import git_commit, md5_of
from pipelines.metrics import choose_threshold
from pipelines.models import Ensemble, build_learners, resolve_device
from pipelines.models.cluster import dask_cluster, describe
from pipelines.transform import FeatureTransform
from pipelines.tuning import tune, tuning_html

log = logging.getLogger(__name__)


@stage(
    params=("seed", "schema.target", "train", "evaluate.threshold", "evaluate.costs", "scale.dask_scheduler",
            "scale.dask_workers"),  # the label cut-off is chosen on validation rows
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
    threshold = pick_threshold(settings, transform.task, y_valid, ensemble.predict_output(X_valid))

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
            "threshold": threshold["threshold"],
            "threshold_choice": threshold,
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
    summary = {"version": version, "ensemble": ensemble.method, "weights": metadata["weights"],
               "member_valid_log_loss": ensemble.member_valid_log_loss_, "model_dir": str(paths.trained)}
    write_json(paths.train_report, {"version": version, "ensemble": ensemble.method,
                                              **{f"weight_{n}": w for n, w in metadata["weights"].items()}})
    log.info("trained ensemble %s", version)
    return summary


def sample_index(y: np.ndarray, max_rows: int | None, seed: int, stratify: bool) -> np.ndarray | None:
    """Sorted positions of a seeded sample of about `max_rows` of the labels `y` (None: keep every row, as with
    `max_rows` None or no more rows than it). Stratified: each class in proportion, and at least one row of each."""
    n = len(y)
    if max_rows is None or n <= max_rows:
        return None
    rng = np.random.default_rng([seed, 5])
    if not stratify:
        return np.sort(rng.choice(n, max_rows, replace=False))
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    quotas = np.minimum(counts, np.maximum(1, np.round(counts * max_rows / n).astype(int)))
    picked = [rng.choice(np.flatnonzero(inverse == k), quotas[k], replace=False) for k in range(len(classes))]
    return np.sort(np.concatenate(picked))


def training_rows(file: Path, target: str, max_rows: int | None, seed: int, stratify: bool
                  ) -> tuple[pd.DataFrame, int]:
    """The training features the learners fit on (see sample_index), and how many rows the file holds. The
    sample is read one row group at a time, so memory holds the sample and one group, not the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    y = pd.read_parquet(file, columns=[target])[target].to_numpy()
    index = sample_index(y, max_rows, seed, stratify)
    if index is None:
        return pd.read_parquet(file), len(y)
    parquet, parts, start = pq.ParquetFile(file), [], 0
    for group in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        mine = index[(index >= start) & (index < start + size)] - start
        if len(mine):
            parts.append(parquet.read_row_group(group).take(pa.array(mine)))
        start += size
    log.info("learners fit on a sample of %d of %d training rows (train.max_rows)", len(index), len(y))
    return pa.concat_tables(parts).to_pandas(), len(y)


def pick_threshold(settings: Settings, task: str, y_valid: np.ndarray, output: np.ndarray) -> dict[str, Any]:
    """The binary label cut-off: evaluate.threshold as set, or picked on the validation rows (auto)."""
    cfg = settings.evaluate
    if task != "binary":
        return {"threshold": 0.5, "criterion": "argmax" if task == "multiclass" else "none"}
    if cfg.threshold != "auto":
        return {"threshold": float(cfg.threshold), "criterion": "evaluate.threshold"}
    costs = (cfg.costs.false_positive, cfg.costs.false_negative) if cfg.costs else None
    chosen = choose_threshold(y_valid, output[:, 1], costs)
    log.info("threshold %.4f picked on %d validation rows (%s %.4f)", chosen["threshold"], len(y_valid),
             chosen["criterion"], chosen["value_on_valid"])
    return chosen
