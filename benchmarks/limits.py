"""What a per-key limit check costs: `SharedState.admit` + `charge` (the two transactions a /predict request
makes) on a SQLite file in a temporary folder, from one process and from two processes at once (two workers
sharing the file, each with its own keys and one shared key).

Usage: python benchmarks/limits.py [--checks 20000]
Target (issue 14): well under 1 ms per check, typical.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipelines.state.limits import Limit, SharedState

LIMIT = Limit(rps=1e9, burst=1_000_000, daily_quota=None)  # never refuses: every check takes the full path


def checks(path: str, checks: int, keys: int, out: multiprocessing.Queue | None = None) -> np.ndarray:
    """Microseconds of each admit + charge over `keys` keys in turn."""
    state = SharedState(Path(path))
    took = np.empty(checks)
    for i in range(checks):
        name = f"key-{i % keys}"
        start = time.perf_counter()
        state.admit("bench", name, LIMIT)
        state.charge(name, 1, LIMIT)
        took[i] = (time.perf_counter() - start) * 1e6
    if out is not None:
        out.put(took)
    return took


def _line(what: str, took: np.ndarray, seconds: float) -> str:
    p50, p99 = np.percentile(took, [50, 99])
    return f"{what:<34} {len(took) / seconds:>10,.0f} {p50:>9.1f} {p99:>9.1f} {took.max():>9.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checks", type=int, default=20_000)
    args = parser.parse_args()
    print(f"{'checks (admit + charge)':<34} {'checks/s':>10} {'p50 us':>9} {'p99 us':>9} {'max us':>9}")
    with tempfile.TemporaryDirectory(prefix="amaas-limits-") as tmp:
        path = str(Path(tmp) / "limits.db")
        checks(path, 500, 10)  # the file, its tables and the WAL exist before timing
        start = time.perf_counter()
        took = checks(path, args.checks, 10)
        print(_line("1 process, 10 keys", took, time.perf_counter() - start))
        ctx = multiprocessing.get_context("spawn")
        for keys in (10, 1):
            out: multiprocessing.Queue = ctx.Queue()
            procs = [ctx.Process(target=checks, args=(path, args.checks, keys, out)) for _ in range(2)]
            start = time.perf_counter()
            for p in procs:
                p.start()
            both = np.concatenate([out.get() for _ in procs])
            seconds = time.perf_counter() - start
            for p in procs:
                p.join()
            print(_line(f"2 processes at once, {keys} key(s)", both, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
