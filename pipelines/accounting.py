"""What work costs: CPU and GPU seconds of a stage (process accounting), peak memory, and their price.

A stage's CPU seconds are the user + system time of this process and of the child processes it waited for
(`resource.getrusage`), not wall time: two busy cores for 10 s are 20 CPU-seconds. Its GPU seconds are the wall
time of a stage that put work on a CUDA device (a GPU is billed while it is held, busy or not). Prices come
from `cost:` in params.yaml; reports/cost.json holds the latest run of every stage and their total.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.config import CostConfig, Paths
from pipelines.io import read_json, write_json

log = logging.getLogger(__name__)
PRICE_SOURCE = ("cost.cpu_hour_usd and cost.gpu_hour_usd in params.yaml (defaults: AWS us-east-1 on-demand list "
                "prices, 2024: m7i.large per vCPU, p4d.24xlarge per A100 GPU)")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its waited-for children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def usd(cfg: CostConfig, cpu_s: float, gpu_s: float = 0.0) -> float:
    return cpu_s / 3600 * cfg.cpu_hour_usd + gpu_s / 3600 * cfg.gpu_hour_usd


def usd_per_1k_rows(cfg: CostConfig, cpu_s_per_row: float) -> float:
    """Serving cost of 1,000 predictions from the CPU time one row takes (measured at batch size)."""
    return usd(cfg, cpu_s_per_row * 1000)


@dataclass
class Usage:
    """CPU, GPU and wall seconds of a block (see `measured`)."""

    cpu_s: float = 0.0
    gpu_s: float = 0.0
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def measured() -> Iterator[Usage]:
    """Measure the block: its CPU seconds, its wall seconds, and (when it resolved a CUDA device) GPU seconds."""
    usage = Usage()
    cpu0, wall0, cuda0 = cpu_seconds(), time.perf_counter(), _cuda_resolutions()
    try:
        yield usage
    finally:
        usage.cpu_s = cpu_seconds() - cpu0
        usage.wall_s = time.perf_counter() - wall0
        usage.gpu_s = usage.wall_s if _cuda_resolutions() > cuda0 else 0.0


def _cuda_resolutions() -> int:
    """CUDA devices resolved so far; 0 while no learner is loaded (then none can have been), so a stage that
    trains nothing (collect with no new rows) does not import sklearn and pandas just to ask."""
    base = sys.modules.get("pipelines.models.base")
    return int(base.cuda_resolutions()) if base is not None else 0


def record_stage(paths: Paths, cfg: CostConfig, stage: str, usage: Usage, status: str) -> dict[str, Any]:
    """Put one stage's run into reports/cost.json (atomically): its seconds and price, and the new total."""
    path = paths.cost_report
    try:
        stages = dict(read_json(path).get("stages", {})) if path.is_file() else {}
    except ValueError:  # a damaged report is rebuilt from this stage on
        log.warning("%s is damaged: starting it again", path)
        stages = {}
    stages[stage] = {"status": status, "cpu_s": round(usage.cpu_s, 3), "gpu_s": round(usage.gpu_s, 3),
                     "wall_s": round(usage.wall_s, 3), "usd": usd(cfg, usage.cpu_s, usage.gpu_s),
                     "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}
    total = {key: round(sum(s[key] for s in stages.values()), 3) for key in ("cpu_s", "gpu_s", "wall_s")}
    report = {"prices": {"cpu_hour_usd": cfg.cpu_hour_usd, "gpu_hour_usd": cfg.gpu_hour_usd, "source": PRICE_SOURCE},
              "stages": stages, "total": {**total, "usd": sum(s["usd"] for s in stages.values())}}
    write_json(path, report)
    return report


class PeakMemory:
    """The most resident memory a block added over what the process held when it began (bytes).

    Linux lets a process reset its high-water mark (writing 5 to /proc/self/clear_refs), so the peak of the
    block alone is VmHWM after it minus VmRSS before it. Elsewhere `bytes` stays None."""

    def __init__(self) -> None:
        self.bytes: int | None = None
        self._start: int | None = None

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._start = status_kib("VmRSS")
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._start is not None:
            with contextlib.suppress(OSError, ValueError):
                self.bytes = max(0, status_kib("VmHWM") - self._start) * 1024


def status_kib(key: str) -> int:
    """A figure of /proc/self/status in KiB (VmRSS, VmHWM, RssFile...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise ValueError(f"{key} not in /proc/self/status")
