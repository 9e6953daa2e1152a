"""The serving fleet on this machine, in one run:

1. what the shared state costs one /predict request: the key lookup, the rate-limit check, the quota charge and
   the prediction log's write and durable commit, on the one-host files (SQLite, JSON Lines + fsync) against a
   fleet's PostgreSQL + Redis (both started here, PostgreSQL with its default durability), from 1 and from 8
   threads at once; printed per request and as the ratio fleet / files;
2. rps and p99 of `/predict` through HAProxy at 1, 2 and 3 replicas (each in an empty folder of its own, the
   shared state on that PostgreSQL and Redis): an open loop at `--rate` requests/s (latency from when a request
   was due, so a backlog shows) and a closed loop of `--concurrency` clients; printed with the ratio to 1 replica.
   On 2 cores the replicas share the cores with the load generator, HAProxy and the databases: more replicas
   add fault tolerance here, not throughput; on hosts of their own they add both.

Usage: python benchmarks/fleet.py [--requests 3000] [--seconds 20] [--rate 200] [--concurrency 16]
                                  [--replicas 1,2,3] [--params params.yaml] [--skip-fleet]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipelines.config import Paths, StateConfig
from pipelines.state import Shared
from pipelines.state.limits import Limit
from pipelines.state.local_servers import postgres, redis
from pipelines.state.predlog import log_entry, now_iso

LIMIT = Limit(rps=1e9, burst=1_000_000, daily_quota=10**12)  # never refuses: every check takes the full path


def entry(i: int) -> dict:
    """One logged row as the service writes it (13 features, a binary answer)."""
    return log_entry(time=now_iso(), answer={"label": 0, "probabilities": {"0": 0.9, "1": 0.1}, "probability": 0.1},
                     model_version="v1", request_id=f"bench-{i}", key_name="bench", route="champion", id=i,
                     features={f"x{j}": float(j) for j in range(13)})


def requests_through(state: Shared, key: str, n: int, threads: int) -> tuple[np.ndarray, float]:
    """Microseconds of each request's state work (lookup, admit, charge, log write + durable), `threads` at once;
    and the seconds all took."""
    log = state.prediction_log()
    keys, limits = state.keys, state.limits
    took = np.empty(n)

    def one(i: int) -> None:
        start = time.perf_counter()
        entry_ = keys.lookup(key)
        assert entry_ is not None
        limits.admit("bench", entry_.name, LIMIT)
        limits.charge(entry_.name, 1, LIMIT)
        log.sync(log.write([entry(i)]))
        took[i] = (time.perf_counter() - start) * 1e6

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))
    return took, time.perf_counter() - start


def state_cost(n: int, pg_url: str, redis_url: str) -> None:
    print(f"\n1. the shared state's work per /predict request ({n} requests)")
    print(f"{'backend':<28} {'threads':>7} {'req/s':>9} {'p50 us':>9} {'p99 us':>9}")
    results: dict[tuple[str, int], tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="amaas-fleet-bench-") as tmp:
        backends = {"files (one host)": Shared(StateConfig(), Paths(Path(tmp) / "files")),
                    "PostgreSQL + Redis (fleet)": Shared(StateConfig(url=pg_url, redis_url=redis_url),
                                                         Paths(Path(tmp) / "fleet"))}
        for name, state in backends.items():
            key = state.keys.add("bench")
            requests_through(state, key, 200, 1)  # connections, tables, files exist before timing
            for threads in (1, 8):
                took, seconds = requests_through(state, key, n, threads)
                p50, p99 = np.percentile(took, [50, 99])
                results[name, threads] = (p50, n / seconds)
                print(f"{name:<28} {threads:>7} {n / seconds:>9,.0f} {p50:>9.0f} {p99:>9.0f}")
    for threads in (1, 8):
        files, fleet = results["files (one host)", threads], results["PostgreSQL + Redis (fleet)", threads]
        print(f"fleet / files, {threads} thread(s): p50 {fleet[0] / files[0]:.2f}x, throughput "
              f"{fleet[1] / files[1]:.2f}x")


def fleet_load(pg_url: str, redis_url: str, counts: list[int], seconds: float, rate: float, concurrency: int,
               params_file: str) -> None:
    """Part 2: a trained project moved onto the state database, then fleets of each size in `counts`."""
    import os

    from _project import trained_project  # beside this script
    from serve import closed_loop, one_row, open_loop

    from pipelines.runner import run_stage
    from pipelines.serving.fleet import Fleet, state_replica

    print(f"\n2. /predict through HAProxy: open loop at {rate:.0f} requests/s, then {concurrency} clients back to "
          f"back, {seconds:.0f} s each")
    with trained_project(params_file, "amaas-fleet-bench-") as (root, _), \
            tempfile.TemporaryDirectory(prefix="amaas-fleet-") as tmp:
        env = {"AMAAS_STATE_URL": pg_url, "AMAAS_REDIS_URL": redis_url, "AMAAS_ARTIFACTS_URL": f"{tmp}/artifacts"}
        os.environ.update(env)  # the project host's commands below, and the replicas, use the shared state
        run_stage("deploy", root / "params.yaml", root)  # registry -> database, the champion's bento -> the store
        key = Shared(StateConfig(), Paths(root)).keys.add("benchmark")
        print(f"{'replicas':>8} {'open rps':>9} {'p50 ms':>7} {'p99 ms':>7} {'errors':>7}   {'closed rps':>10} "
              f"{'p99 ms':>7} {'errors':>7}")
        base: tuple[float, float] | None = None
        for count in counts:
            with Fleet(Path(tmp) / f"fleet-{count}", count, state_replica(), env={**os.environ, **env}) as fleet:
                url = f"{fleet.url}/predict"
                asyncio.run(closed_loop(url, key, 4, 3, one_row))  # warm: connections, caches, the first batches
                opened = asyncio.run(open_loop(url, key, rate, seconds, one_row))
                closed = asyncio.run(closed_loop(url, key, concurrency, seconds, one_row))
            print(f"{count:>8} {opened['ok_rps']:>9.0f} {opened['p50']:>7.1f} {opened['p99']:>7.1f} "
                  f"{opened['errors']:>7}   {closed['ok_rps']:>10.0f} {closed['p99']:>7.1f} {closed['errors']:>7}")
            base = base or (opened["p99"], closed["ok_rps"])
            print(f"{'':>8} vs 1 replica: open-loop p99 {opened['p99'] / base[0]:.2f}x, closed-loop rps "
                  f"{closed['ok_rps'] / base[1]:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--replicas", default="1,2,3")
    parser.add_argument("--params", default="params.yaml", help="the project the fleet serves (trained small here)")
    parser.add_argument("--skip-fleet", action="store_true", help="part 1 only")
    args = parser.parse_args()
    with postgres(durable=True) as pg_url, redis() as redis_url:
        state_cost(args.requests, pg_url, redis_url)
        if not args.skip_fleet:
            fleet_load(pg_url, redis_url, [int(n) for n in args.replicas.split(",")], args.seconds, args.rate,
                       args.concurrency, args.params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
