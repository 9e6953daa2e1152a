"""compress: smaller, faster candidates of the trained ensemble; the one to serve goes on as the challenger.

Candidates (pipelines.compression): the ensemble as trained, a student distilled from it (pruned), and the
ensemble with an int8 MLP. Each is measured as it would serve; serve.model picks one, or (auto) the fastest on
one row in CPU time (those within compress.tie_margin of it: the smallest) that passes compress.max_metric_loss
and compress.min_speedup, else the ensemble. The pick is copied to models/challenger with the figures in its
metadata; reports/compression.json holds every candidate's figures.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.bundle import ENSEMBLE_DIR, METADATA_FILE, TRANSFORM_FILE, ModelBundle
from pipelines.compression import (
    PeakMemoryProbe,
    build_student,
    check_requested,
    choose,
    distill,
    measure,
    mlp_alone,
    prune,
    quantized,
)
from pipelines.config import Paths, Settings
from pipelines.contracts import Out, stage
from pipelines.io import atomic_dir, read_json, tree_sha256, write_json, write_parquet
from pipelines.models import Ensemble, LightGBMLearner
from pipelines.models.base import valid_loss
from pipelines.sampling import training_rows

log = logging.getLogger(__name__)


@stage(
    params=("seed", "schema", "compress", "promote.metric", "train.threads", "train.max_rows", "serve.model", "cost"),
    deps=("trained", "features", "reference"),
    outs=(Out("challenger"), Out("test_predictions")),
    metrics=("compression_report",),
    atomic_outs=True,  # each written to a temp file or folder and renamed: DVC need not delete them first
    description="Distil, prune and quantize the trained ensemble; measure each; the one to serve is the challenger",
)
def run(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Write models/challenger (the served candidate), its test predictions and reports/compression.json."""
    cfg, metric, seed = settings.compress, settings.promote.metric, settings.seed
    target = settings.data_schema.target
    scratch = paths.trained.parent
    for stale in scratch.glob(".compress-*.tmp"):  # left by a killed run (the project lock keeps runs apart)
        shutil.rmtree(stale, ignore_errors=True)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=".compress-", suffix=".tmp", dir=scratch))
        # started first: its imports run while the ensemble loads (torch) and the student learns
        probe = stack.enter_context(PeakMemoryProbe(Path(tmp))) if cfg.measure_memory else None
        trained = ModelBundle.load(paths.trained)
        check_requested(settings.serve.model, cfg, trained.ensemble)
        test = pd.read_parquet(paths.test_rows)
        y_test = trained.transform.encode_target(test[target])
        train, _ = training_rows(paths.split_features("train"), target, settings.train.max_rows, seed,  # the rows
                                 stratify=trained.task != "regression")  # the ensemble learned on: the student's
        X = train.drop(columns=[target])
        del train  # a large table's sample is held once, not twice
        valid = pd.read_parquet(paths.split_features("valid"))
        X_valid, y_valid = valid.drop(columns=[target]), valid[target].to_numpy()
        del valid
        folders: dict[str, Path] = {"ensemble": paths.trained}
        student = build_student(cfg, trained.transform, seed, settings.train.threads)
        student_report = distill(cfg, trained.ensemble, student, X, X_valid, seed)
        if isinstance(student, LightGBMLearner):
            student_report["trees_distilled"] = student.n_trees_
            student, student_report["prune_curve"] = prune(student, X_valid, y_valid, metric, trained.decision,
                                                           cfg.prune_tolerance)
            student_report["trees"] = student.n_trees_
        name = f"student_{student.kind}"
        folders["student"] = write_candidate(
            Path(tmp) / "student", paths, trained, Ensemble.of_fitted([student], [name], random_state=seed),
            "student", {name: valid_loss(y_valid, student.predict_output(X_valid))})
        int8 = quantized(trained.ensemble) if cfg.quantize else None
        mlp_int8: dict[str, Any] = {}
        if int8 is not None:
            mlp_int8 = mlp_alone(trained.ensemble, int8, trained.transform.transform(test), y_test, metric,
                                 trained.decision)
            folders["quantized"] = write_candidate(Path(tmp) / "quantized", paths, trained, int8, "quantized",
                                                   trained.ensemble.member_valid_log_loss_)
        memory = probe.measure(folders, test) if probe else dict.fromkeys(folders)  # before the timings: they need
        measured = measure(folders, test, y_test, metric, settings.cost, cfg.latency_rows)  # the cores
        figures = {n: {**f, "peak_memory_bytes": memory[n]} for n, f in measured.items()}
        choice = choose(settings.serve.model, figures, metric, cfg)
        served = choice["served"]
        summary = {"served": served, "reason": choice["reason"], "metric": metric, "trained_version": trained.version,
                   "served_figures": figures[served]}
        with atomic_dir(paths.challenger) as out:
            shutil.copytree(folders[served], out, dirs_exist_ok=True)
            write_json(out / METADATA_FILE, {**read_json(out / METADATA_FILE), "compression": summary})
    challenger = ModelBundle.load(paths.challenger)
    # monitoring's prediction drift reference: the newest rows as the table has them (a project prepared before
    # they were kept: the test rows)
    recent = pd.read_parquet(paths.recent_rows) if paths.recent_rows.is_file() else test
    write_parquet(paths.test_predictions, challenger.prediction_frame(
        recent[settings.data_schema.key_column], trained.transform.encode_target(recent[target]),
        challenger.predict(recent), settings.data_schema.key_column))
    report = {**summary, "challenger_version": challenger.version,
              "candidates": {n: {**f, **choice["verdicts"].get(n, {})} for n, f in figures.items()},
              "student": student_report, "mlp_int8": mlp_int8}
    write_json(paths.compression_report, report)
    log.info("compress: %s serves (%s)", served, choice["reason"])
    return {k: report[k] for k in ("served", "reason", "challenger_version")}


def write_candidate(folder: Path, paths: Paths, trained: ModelBundle, ensemble: Ensemble, kind: str,
                    valid_log_loss: dict[str, float]) -> Path:
    """A candidate bundle: the trained transform, `ensemble`, and metadata saying what it was made from."""
    folder.mkdir(parents=True)
    shutil.copy2(paths.trained / TRANSFORM_FILE, folder / TRANSFORM_FILE)
    ensemble.save(folder / ENSEMBLE_DIR)
    version = "v" + tree_sha256(folder)[:12]  # content-addressed, as train's
    devices = {n: getattr(m, "device_", "cpu") for n, m in zip(ensemble.names, ensemble.members_, strict=True)}
    write_json(folder / METADATA_FILE, {
        **trained.metadata, "version": version, "ensemble": ensemble.method, "learners": ensemble.names,
        "weights": dict(zip(ensemble.names, ensemble.member_weights.tolist(), strict=True)),
        "member_valid_log_loss": valid_log_loss, "member_devices": devices,
        "compressed_from": trained.version, "compressed_as": kind})
    return folder
