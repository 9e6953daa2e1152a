"""Smaller, faster stand-ins for a trained ensemble, and the figures to choose among them.

- **student**: one learner (LightGBM with few shallow trees, or the MLP) distilled from the ensemble: it learns
  the ensemble's outputs (soft labels) on the training rows plus augmented rows: training rows resampled,
  with a share of each row's columns taken from another random row (a numeric column with its missing flag),
  so the student sees the ensemble's answers between the training rows too;
- **pruning**: the student's trees cut to the fewest whose metric on the validation rows stays within
  compress.prune_tolerance of all of them (its validation curve);
- **quantized**: the ensemble with its MLP's Linear layers in int8 (dynamic quantization).

Each candidate is measured the way it would serve: the bundle loaded from disk (its peak memory, in a fresh
interpreter), scoring raw rows through the fitted transform: promote.metric on the test rows, single-row latency
(p50, p99; and of the model alone), rows/s and CPU seconds per row at batches of 256 (hence the cost of 1,000
predictions), and its size on disk.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.accounting import cpu_seconds, usd_per_1k_rows
from pipelines.bundle import ModelBundle
from pipelines.config import CompressConfig, CostConfig
from pipelines.metrics import Decision, improvement, score
from pipelines.models import Ensemble, LightGBMLearner, MLPLearner
from pipelines.models.base import Learner, as_output
from pipelines.transform import FeatureTransform

log = logging.getLogger(__name__)
CANDIDATES = ("ensemble", "student", "quantized")
BATCH = 256


def augmented_rows(X: pd.DataFrame, factor: float, swap_share: float, seed: int) -> pd.DataFrame:
    """round(len(X) * factor) rows drawn from X, each with about `swap_share` of its column groups taken
    from another random row of X (a numeric column moves with its `<column>_missing` flag)."""
    n = round(len(X) * factor)
    if n == 0 or X.empty:
        return X.iloc[:0]
    rng = np.random.default_rng([seed, 7])
    rows = X.iloc[rng.integers(0, len(X), n)].reset_index(drop=True)
    flags = {c for c in X.columns if c.endswith("_missing") and c[: -len("_missing")] in X.columns}
    for column in (c for c in X.columns if c not in flags):
        swap = rng.random(n) < swap_share
        donors = rng.integers(0, len(X), int(swap.sum()))
        for col in (column, f"{column}_missing"):
            if col == column or col in flags:
                values = rows[col].to_numpy(copy=True)
                values[swap] = X[col].to_numpy()[donors]
                rows[col] = values
    return rows


def build_student(cfg: CompressConfig, transform: FeatureTransform, seed: int, threads: int) -> Learner:
    student, k = cfg.student, len(transform.classes or ())
    if student.kind == "mlp":
        return MLPLearner(categorical=transform.cardinalities, hidden=student.hidden, epochs=student.epochs,
                          random_state=seed, threads=threads, device="cpu", task=transform.task, n_classes=k)
    return LightGBMLearner(categorical=transform.cardinalities, n_estimators=student.n_estimators,
                           num_leaves=student.num_leaves, learning_rate=student.learning_rate, random_state=seed,
                           threads=threads, task=transform.task, n_classes=k)


def distill(cfg: CompressConfig, teacher: Ensemble, student: Learner, X: pd.DataFrame, X_valid: pd.DataFrame,
            seed: int) -> dict[str, Any]:
    """Fit `student` to the teacher's outputs on the training rows and augmented ones (early-stopped on the
    teacher's outputs for the validation rows); returns what was done."""
    extra = augmented_rows(X, cfg.augment_factor, cfg.swap_share, seed)
    rows = pd.concat([X, extra], ignore_index=True) if len(extra) else X
    soft = teacher.predict_output(rows)
    student.distill(rows, soft, X_valid, teacher.predict_output(X_valid))
    log.info("student %s distilled on %d rows (%d augmented)", student.kind, len(rows), len(extra))
    return {"kind": student.kind, "rows": len(rows), "augmented_rows": len(extra)}


def prune(student: LightGBMLearner, X_valid: pd.DataFrame, y_valid: np.ndarray, metric: str, threshold: Decision,
          tolerance: float) -> tuple[LightGBMLearner, list[dict[str, Any]]]:
    """The student cut to the fewest trees whose `metric` on the validation rows is within `tolerance` of all
    its trees, and the validation curve it was read from (about 20 points)."""
    full = student.n_trees_
    counts = sorted({int(k) for k in np.linspace(1, full, min(full, 20)).round()})
    values = [score(metric, y_valid, as_output(np.asarray(student.booster_.predict(X_valid, num_iteration=k)),
                                                student.task), threshold) for k in counts]
    curve = [{"trees": k, metric: v} for k, v in zip(counts, values, strict=True)]
    best = values[-1]
    if best is None:  # undefined on these rows (one class): nothing to keep, nothing cut
        return student, curve
    keep = next(k for k, v in zip(counts, values, strict=True) if v is not None and improvement(metric, v, best)
                >= -tolerance)
    log.info("student pruned from %d to %d trees (%s within %s of all trees on validation rows)", full, keep,
             metric, tolerance)
    return (student.pruned(keep) if keep < full else student), curve


def quantized(ensemble: Ensemble) -> Ensemble | None:
    """The ensemble with each MLP member in int8; None when it has no MLP."""
    members = [m.quantized() if isinstance(m, MLPLearner) else m for m in ensemble.members_]
    if not any(isinstance(m, MLPLearner) for m in ensemble.members_):
        return None
    copy = Ensemble.of_fitted(members, ensemble.names, ensemble.weights_, ensemble.random_state)
    copy.method, copy.intercept_ = ensemble.method, ensemble.intercept_
    copy.member_valid_log_loss_ = ensemble.member_valid_log_loss_
    return copy


def mlp_alone(ensemble: Ensemble, int8: Ensemble, X: pd.DataFrame, y: np.ndarray, metric: str, threshold: Decision
              ) -> dict[str, dict[str, Any]]:
    """The MLP member on its own, float32 and int8, on model features `X`: `metric` and rows/s at batches of
    BATCH (what quantization changes, without the other members and the transform around it)."""
    found: dict[str, dict[str, Any]] = {}
    for name, members in (("float32", ensemble.members_), ("int8", int8.members_)):
        mlp = next(m for m in members if isinstance(m, MLPLearner))
        batches = [X.iloc[i:i + BATCH] for i in range(0, len(X), BATCH)]
        mlp.predict_output(batches[0])
        done = calls = 0
        started = time.perf_counter()
        while calls < 3 or time.perf_counter() - started < 0.5:
            done, calls = done + len(mlp.predict_output(batches[calls % len(batches)])), calls + 1
        found[name] = {metric: score(metric, y, mlp.predict_output(X), threshold),
                       "rows_per_s": done / (time.perf_counter() - started)}
    found["int8"]["speedup"] = found["int8"]["rows_per_s"] / found["float32"]["rows_per_s"]
    return found


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# Run in a fresh interpreter, where the heap has not been grown by earlier work (the allocator would reuse it):
# the peak resident memory that loading a bundle and scoring one batch adds, over the libraries it serves with.
_PEAK_SCRIPT = """
import sys
from pathlib import Path
import lightgbm, pandas, torch, xgboost
from pipelines.accounting import PeakMemory
from pipelines.bundle import ModelBundle
rows = pandas.read_parquet(sys.argv[2])
with PeakMemory() as memory:
    ModelBundle.load(Path(sys.argv[1])).predict(rows)
print(memory.bytes)
"""


def peak_memory(folders: dict[str, Path], rows: pd.DataFrame, scratch: Path, timeout_s: float = 300
                ) -> dict[str, int | None]:
    """Per bundle: the peak memory loading it and scoring a batch of `rows` adds (bytes; None where it could
    not be measured), each in its own interpreter, all at once."""
    batch = scratch / "memory_batch.parquet"
    rows.iloc[:BATCH].to_parquet(batch)
    code_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code_root, os.environ.get("PYTHONPATH")]))}
    procs = {name: subprocess.Popen([sys.executable, "-c", _PEAK_SCRIPT, str(folder), str(batch)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name, folder in folders.items()}
    found: dict[str, int | None] = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        text = out.strip().splitlines()[-1] if out.strip() else ""
        found[name] = int(text) if proc.returncode == 0 and text.isdigit() else None
        if found[name] is None:
            log.warning("peak memory of %s not measured (exit %s): %s", name, proc.returncode, err.strip()[-500:])
    return found


def measure(bundle_dir: Path, rows: pd.DataFrame, y: np.ndarray, metric: str, cost: CostConfig,
            latency_rows: int) -> dict[str, Any]:
    """How a bundle serves, in this process: loaded from `bundle_dir`, scoring raw `rows` (the test rows)."""
    bundle = ModelBundle.load(bundle_dir)
    output = bundle.predict(rows)
    singles = [rows.iloc[[i % len(rows)]] for i in range(latency_rows)]
    for row in singles[:5]:  # warm-up: first calls build caches
        bundle.predict(row)
    seconds, model_seconds = [], []
    for row in singles:
        started = time.perf_counter()
        bundle.predict(row)
        seconds.append(time.perf_counter() - started)
    for features in [bundle.transform.transform(row) for row in singles]:  # the model alone, without the transform
        started = time.perf_counter()
        bundle.ensemble.predict_output(features)
        model_seconds.append(time.perf_counter() - started)
    batches = [rows.iloc[i:i + BATCH] for i in range(0, len(rows), BATCH)] or [rows]
    done = calls = 0
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    while calls < 3 or time.perf_counter() - wall0 < 0.5:
        batch = batches[calls % len(batches)]
        bundle.predict(batch)
        done, calls = done + len(batch), calls + 1
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    per_row = cpu / done
    return {metric: score(metric, y, output, bundle.decision), "version": bundle.version,
            "latency_ms_p50": float(np.percentile(seconds, 50) * 1e3),
            "latency_ms_p99": float(np.percentile(seconds, 99) * 1e3),
            "model_latency_ms_p50": float(np.percentile(model_seconds, 50) * 1e3),
            "rows_per_s": done / wall, "cpu_s_per_1k_rows": per_row * 1000,
            "usd_per_1k_rows": usd_per_1k_rows(cost, per_row), "disk_bytes": disk_bytes(bundle_dir)}


def choose(requested: str, figures: dict[str, dict[str, Any]], metric: str, cfg: CompressConfig
           ) -> dict[str, Any]:
    """Which candidate serves: `requested` (serve.model), or with auto the fastest one on one row that loses at
    most compress.max_metric_loss of the ensemble's metric and is at least compress.min_speedup times faster."""
    base = figures["ensemble"]
    verdicts: dict[str, dict[str, Any]] = {}
    for name, fig in figures.items():
        if name == "ensemble":
            continue
        loss = (None if fig[metric] is None or base[metric] is None else -improvement(metric, fig[metric],
                                                                                          base[metric]))
        speedup = base["latency_ms_p50"] / fig["latency_ms_p50"]
        passes = loss is not None and loss <= cfg.max_metric_loss and speedup >= cfg.min_speedup
        verdicts[name] = {"metric_loss": loss, "speedup": speedup, "passes": passes,
                          "model_speedup": base["model_latency_ms_p50"] / fig["model_latency_ms_p50"], "reason": (
            f"{metric} undefined on the test rows: no comparison" if loss is None else
            f"loses {loss:+.4f} {metric} (at most {cfg.max_metric_loss}) and is {speedup:.1f}x faster on one row "
            f"(at least {cfg.min_speedup}x): " + ("passes" if passes else "fails"))}
    if requested != "auto":
        if requested not in figures:
            raise ValueError(f"serve.model is {requested}, but there is no {requested} candidate "
                             f"(quantized needs an mlp in train.learners and compress.quantize: true); "
                             f"set serve.model: auto")
        served, reason = requested, f"serve.model: {requested}"
    else:
        passing = sorted((f["latency_ms_p50"], n) for n, f in figures.items() if verdicts.get(n, {}).get("passes"))
        served = passing[0][1] if passing else "ensemble"
        reason = (f"auto: {served} {verdicts[served]['reason']}" if passing else
                  "auto: no candidate passes (compress.max_metric_loss and compress.min_speedup), the ensemble serves")
    return {"served": served, "reason": reason, "verdicts": verdicts}
