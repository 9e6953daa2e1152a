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
(p50, p99; of the model alone; and the CPU time, which the choice rests on), rows/s and CPU seconds per row at
batches of 256 (hence the cost of 1,000 predictions), and its size on disk. The timings are taken in turns across
the candidates, at a cost proportional to the test rows, so that load falls on all of them alike.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
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
TIMED_BATCHES = 40  # batches of BATCH rows timed per candidate at most (the rest of the rows in one call)


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
    augmented = len(extra)
    rows = pd.concat([X, extra], ignore_index=True) if augmented else X
    del extra  # held once, inside `rows`
    soft = teacher.predict_output(rows)
    student.distill(rows, soft, X_valid, teacher.predict_output(X_valid))
    log.info("student %s distilled on %d rows (%d augmented)", student.kind, len(rows), augmented)
    return {"kind": student.kind, "rows": len(rows), "augmented_rows": augmented}


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


def check_requested(requested: str, cfg: CompressConfig, ensemble: Ensemble) -> None:
    """Stop before any work when serve.model names a candidate that will not be made."""
    if requested == "quantized" and not (cfg.quantize and any(isinstance(m, MLPLearner) for m in ensemble.members_)):
        raise ValueError("serve.model is quantized, but there is no quantized candidate (quantized needs an mlp in "
                         "train.learners and compress.quantize: true); set serve.model: auto")


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
    BATCH (what quantization changes, without the other members and the transform around it), the two timed
    batch by batch in turn over the rows (at most TIMED_BATCHES)."""
    mlps = {name: next(m for m in members if isinstance(m, MLPLearner))
            for name, members in (("float32", ensemble.members_), ("int8", int8.members_))}
    batches = [X.iloc[i:i + BATCH] for i in range(0, min(len(X), TIMED_BATCHES * BATCH), BATCH)] or [X]
    seconds = {name: 0.0 for name in mlps}
    for mlp in mlps.values():
        mlp.predict_output(batches[0])  # warm-up
    for batch in batches:
        for name, mlp in mlps.items():
            started = time.perf_counter()
            mlp.predict_output(batch)
            seconds[name] += time.perf_counter() - started
    done = sum(len(batch) for batch in batches)
    found: dict[str, dict[str, Any]] = {
        name: {metric: score(metric, y, mlp.predict_output(X), threshold), "rows_per_s": done / seconds[name]}
        for name, mlp in mlps.items()}
    found["int8"]["speedup"] = found["int8"]["rows_per_s"] / found["float32"]["rows_per_s"]
    return found


@contextlib.contextmanager
def serving_threads() -> Iterator[None]:
    """torch on one intra-op thread while the block runs, as each serving worker has it (bentos/service.py): the
    candidates are timed the way they serve."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class PeakMemoryProbe:
    """Per bundle: the peak memory loading it and scoring a batch of rows adds (bytes; None where it could not
    be measured), in a process of its own started when the probe is entered, before the stage has loaded a model:
    its heap is what the imports left, not grown by the stage's work (the allocator would reuse that and hide what
    a bundle needs), as a serving process's is. `measure` hands it the batch's file and the bundles once they are
    written; it forks a child per bundle from the state the batch's rows left, and each child reports the resident
    memory loading its bundle and scoring the rows adds over that, less the pages of files it mapped (library
    code: every serving process shares them).

    The probe is a fork of the stage's process where that is still single-threaded (a stage command's process, as
    the stage host starts it): a fork costs milliseconds, where a fresh interpreter importing pandas, torch,
    LightGBM and XGBoost cost the stage 3-4 s of waiting on 2 cores. Anywhere else (a stage after others in one
    process: `amaas run`, an Airflow task, a test) it is a fresh interpreter: a process that has run OpenMP keeps
    its pool's threads, and a child forked from it hangs in its first parallel region (GNU libgomp is not
    fork-safe), as the bundles' children would."""

    def __init__(self, scratch: Path, timeout_s: float = 300) -> None:
        self.batch, self.timeout_s = scratch / "memory_batch.parquet", timeout_s
        self.pid: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None  # the probe where it is a fresh interpreter
        self.to_probe = self.from_probe = -1

    def __enter__(self) -> PeakMemoryProbe:
        to_read, self.to_probe = os.pipe()
        self.from_probe, from_write = os.pipe()
        forked = _single_threaded()
        if forked:
            self.pid = os.fork()
            if self.pid == 0:  # the probe: never returns
                os.close(self.to_probe)
                os.close(self.from_probe)
                status = 1
                try:
                    os.setpgid(0, 0)  # a group of its own, with its children: killed together on a timeout
                    status = _probe(to_read, from_write)
                finally:
                    os._exit(status)
        else:
            code_root = str(Path(__file__).resolve().parents[1])
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code_root, os.environ.get("PYTHONPATH")]))}
            self.proc = subprocess.Popen([sys.executable, "-c", _PROBE_MAIN, str(to_read), str(from_write)],
                                         pass_fds=(to_read, from_write), env=env, start_new_session=True)
            self.pid = self.proc.pid
        log.debug("memory probe: pid %s, %s", self.pid, "forked" if forked else "a fresh interpreter")
        os.close(to_read)
        os.close(from_write)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop(signal.SIGKILL)

    def _stop(self, sig: int | None) -> int | None:
        """Close the pipes, signal the probe's group if asked, and reap it: its exit status."""
        for fd in (self.to_probe, self.from_probe):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.to_probe = self.from_probe = -1
        if self.pid is None:
            return None
        pid, self.pid = self.pid, None
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
        if self.proc is not None:
            return self.proc.wait()
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    def measure(self, folders: dict[str, Path], rows: pd.DataFrame) -> dict[str, int | None]:
        assert self.pid is not None, "measure inside `with PeakMemoryProbe(...)`"
        rows.iloc[:BATCH].to_parquet(self.batch)
        names = list(folders)
        lines = f"{self.batch}\n" + "".join(f"{i}\t{folders[name]}\n" for i, name in enumerate(names))
        with contextlib.suppress(BrokenPipeError):  # a probe that died says nothing: the bundles go unmeasured
            os.write(self.to_probe, lines.encode())
        os.close(self.to_probe)
        self.to_probe = -1
        out, deadline = b"", time.monotonic() + self.timeout_s
        while (left := deadline - time.monotonic()) > 0 and select.select([self.from_probe], [], [], left)[0]:
            if not (chunk := os.read(self.from_probe, 65536)):
                break
            out += chunk
        status = self._stop(signal.SIGKILL if left <= 0 else None)
        found: dict[str, int | None] = dict.fromkeys(names)
        for line in out.decode().splitlines():
            index, _, value = line.partition("\t")
            if index.isdigit() and int(index) < len(names) and value.isdigit():
                found[names[int(index)]] = int(value)
        for name in (n for n, v in found.items() if v is None):
            log.warning("peak memory of %s not measured (probe exit %s%s; its traceback, if any, is above)", name,
                        status, ", timed out" if left <= 0 else "")
        return found


_PROBE_MAIN = ("import sys; from pipelines.compression import _probe; "
               "sys.exit(_probe(int(sys.argv[1]), int(sys.argv[2])))")


def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:  # not Linux: no way to tell
        return False


def _probe(to_read: int, from_write: int) -> int:
    """The probe's process (PeakMemoryProbe): read the batch's file and the bundles' folders, one child per
    bundle, each printing its index and the memory it added; a child that failed prints its traceback."""
    import lightgbm  # noqa: F401 - what ModelBundle.load imports (scikit-learn, SciPy with pipelines.models): before
    import torch  # noqa: F401 - the forks, as in a server
    import xgboost  # noqa: F401

    import pipelines.models  # noqa: F401
    from pipelines.accounting import PeakMemory, status_kib

    with os.fdopen(to_read, "r") as given:
        batch, *lines = given.read().splitlines()
    rows = pd.read_parquet(batch)
    children = []
    for line in lines:
        index, folder = line.split("\t", 1)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                files = status_kib("RssFile")
                with PeakMemory() as memory:
                    ModelBundle.load(Path(folder)).predict(rows)
                added = max(0, (memory.bytes or 0) - (status_kib("RssFile") - files) * 1024)
                os.write(from_write, f"{index}\t{added}\n".encode() if memory.bytes is not None else b"")
                status = 0
            except BaseException:  # noqa: BLE001 - the bundle goes unmeasured, with the reason on stderr
                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(status)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    return 0


def measure(folders: dict[str, Path], rows: pd.DataFrame, y: np.ndarray, metric: str, cost: CostConfig,
            latency_rows: int) -> dict[str, dict[str, Any]]:
    """How each bundle serves, in this process: loaded from its folder, scoring raw `rows` (the test rows).

    The work is proportional to the table and taken in turns, so that whatever else runs on the machine falls on
    every candidate alike: `latency_rows` single-row calls (at most one per test row, at least 20) in rounds, one
    row through each candidate in turn, each call's wall time and CPU time (of all the process's threads) kept;
    then the test rows in batches of BATCH, batch by batch through each candidate (at most TIMED_BATCHES timed),
    for the metric, rows/s and CPU seconds per row. The single-row CPU medians (`cpu_ms_p50`) are what `choose`
    compares: they move far less with load than wall times do."""
    with serving_threads():
        return _measure({name: ModelBundle.load(folder) for name, folder in folders.items()}, folders, rows, y,
                        metric, cost, latency_rows)


def _measure(bundles: dict[str, ModelBundle], folders: dict[str, Path], rows: pd.DataFrame, y: np.ndarray,
             metric: str, cost: CostConfig, latency_rows: int) -> dict[str, dict[str, Any]]:
    n_single = min(latency_rows, max(len(rows), 20))
    singles = [rows.iloc[[i % len(rows)]] for i in range(n_single)]
    for bundle in bundles.values():
        for row in singles[:5]:  # warm-up: first calls build caches
            bundle.predict(row)
    timings: dict[str, dict[str, list[float]]] = {n: {"wall": [], "model": [], "cpu": []} for n in bundles}
    for row in singles:
        for name, bundle in bundles.items():
            cpu0, wall0 = time.process_time(), time.perf_counter()
            features = bundle.transform.transform(row)
            wall1 = time.perf_counter()
            bundle.ensemble.predict_output(features)  # what bundle.predict does, the model timed apart
            wall2, cpu2 = time.perf_counter(), time.process_time()
            for key, value in (("wall", wall2 - wall0), ("model", wall2 - wall1), ("cpu", cpu2 - cpu0)):
                timings[name][key].append(value)
    timed = [rows.iloc[i:i + BATCH] for i in range(0, min(len(rows), TIMED_BATCHES * BATCH), BATCH)] or [rows]
    outputs: dict[str, list[np.ndarray]] = {n: [] for n in bundles}
    spent = {n: [0.0, 0.0] for n in bundles}  # wall, CPU seconds of the timed batches
    for batch in timed:
        for name, bundle in bundles.items():
            cpu0, wall0 = cpu_seconds(), time.perf_counter()
            outputs[name].append(bundle.predict(batch))
            spent[name][0] += time.perf_counter() - wall0
            spent[name][1] += cpu_seconds() - cpu0
    done = sum(len(batch) for batch in timed)
    found = {}
    for name, bundle in bundles.items():
        if done < len(rows):
            outputs[name].append(bundle.predict(rows.iloc[done:]))
        seconds, per_row = timings[name], spent[name][1] / done
        found[name] = {
            metric: score(metric, y, np.concatenate(outputs[name]), bundle.decision), "version": bundle.version,
            "latency_ms_p50": float(np.percentile(seconds["wall"], 50) * 1e3),
            "latency_ms_p99": float(np.percentile(seconds["wall"], 99) * 1e3),
            "model_latency_ms_p50": float(np.percentile(seconds["model"], 50) * 1e3),
            "cpu_ms_p50": float(np.percentile(seconds["cpu"], 50) * 1e3),
            "rows_per_s": done / spent[name][0], "cpu_s_per_1k_rows": per_row * 1000,
            "usd_per_1k_rows": usd_per_1k_rows(cost, per_row), "disk_bytes": disk_bytes(folders[name])}
    return found


def choose(requested: str, figures: dict[str, dict[str, Any]], metric: str, cfg: CompressConfig
           ) -> dict[str, Any]:
    """Which candidate serves: `requested` (serve.model), or with auto the fastest one on one row (CPU time) that
    loses at most compress.max_metric_loss of the ensemble's metric and is at least compress.min_speedup times
    faster. Candidates within compress.tie_margin of the fastest count as tied: of those, the smallest on disk
    (then the first by name), so that the pick does not follow the noise of the timings."""
    base = figures["ensemble"]
    verdicts: dict[str, dict[str, Any]] = {}
    for name, fig in figures.items():
        if name == "ensemble":
            continue
        loss = (None if fig[metric] is None or base[metric] is None else -improvement(metric, fig[metric],
                                                                                          base[metric]))
        speedup = base["cpu_ms_p50"] / fig["cpu_ms_p50"]
        passes = loss is not None and loss <= cfg.max_metric_loss and speedup >= cfg.min_speedup
        verdicts[name] = {"metric_loss": loss, "speedup": speedup, "passes": passes,
                          "model_speedup": base["model_latency_ms_p50"] / fig["model_latency_ms_p50"], "reason": (
            f"{metric} undefined on the test rows: no comparison" if loss is None else
            (f"loses {loss:.4f} {metric}" if loss > 0 else f"gains {-loss:.4f} {metric}") +
            f" (at most {cfg.max_metric_loss} allowed) and is {speedup:.1f}x faster on one row "
            f"in CPU time (at least {cfg.min_speedup}x): " + ("passes" if passes else "fails"))}
    if requested != "auto":
        served, reason = requested, f"serve.model: {requested}"
    else:
        passing = [n for n in figures if verdicts.get(n, {}).get("passes")]
        fastest = min((figures[n]["cpu_ms_p50"] for n in passing), default=0.0)
        tied = sorted((figures[n]["disk_bytes"], n) for n in passing
                      if figures[n]["cpu_ms_p50"] <= fastest * (1 + cfg.tie_margin))
        served = tied[0][1] if tied else "ensemble"
        reason = (f"auto: {served} {verdicts[served]['reason']}" + (
            f"; tied within {cfg.tie_margin:.0%} of the fastest with {', '.join(n for _, n in tied[1:])}, and the "
            f"smallest on disk" if len(tied) > 1 else "") if tied else
                  "auto: no candidate passes (compress.max_metric_loss and compress.min_speedup), the ensemble serves")
    return {"served": served, "reason": reason, "verdicts": verdicts}
