"""Serving load test on localhost: throughput and latency with adaptive batching, with batching off, and the
in-process limit of `predict_proba`.

Usage: python benchmarks/serve.py [--seconds 15] [--concurrency 32] [--rate 200]
Trains a small model in a temporary project (about 20 s), then for each mode starts a real `amaas serve`
and drives single-row requests at it:
- closed loop: `--concurrency` clients send back to back for `--seconds` (the throughput);
- open loop: `--rate` requests/s on a fixed schedule for `--seconds` (latency at that load; a request's
  latency counts from when it was due, so a backlog shows).
Targets (issue 5): batching >= 5x the batching-off throughput; p99 < 50 ms at 200 rps on 2 cores; 0 errors.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from _project import trained_project  # beside this script

from pipelines.bundle import ModelBundle
from pipelines.registry import Registry
from pipelines.serving.keys import ApiKeys

ROW = {"age": 41, "income": 52000.0, "loan_amount": 12000, "term_months": 60, "interest_rate": 14.5,
       "credit_score": 610, "debt_to_income": 0.3, "employment_years": 3, "open_accounts": 7,
       "delinquencies_2y": 1, "home_ownership": "rent", "purpose": "credit_card", "region": "south"}


async def closed_loop(url: str, key: str, concurrency: int, seconds: float) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors: Counter[int] = Counter()
    end = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < end:
            start = time.perf_counter()
            async with session.post(url, json={"row": ROW}) as r:
                await r.read()
                errors[r.status] += r.status != 200
            latencies.append(time.perf_counter() - start)

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"},
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return _figures(latencies, errors, seconds)


async def open_loop(url: str, key: str, rate: float, seconds: float) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors: Counter[int] = Counter()

    async def one(session: aiohttp.ClientSession, due: float) -> None:
        async with session.post(url, json={"row": ROW}) as r:
            await r.read()
            errors[r.status] += r.status != 200
        latencies.append(time.perf_counter() - due)

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"},
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        start, tasks = time.perf_counter(), []
        for i in range(int(rate * seconds)):
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(session, due)))
        await asyncio.gather(*tasks)
    return _figures(latencies, errors, seconds)


def _figures(latencies: list[float], errors: Counter[int], seconds: float) -> dict[str, Any]:
    """Throughput counts answered requests of every status; latencies too (a 503 is fast, and shows)."""
    ms = np.asarray(latencies) * 1000
    return {"rps": len(ms) / seconds, "p50": np.percentile(ms, 50), "p95": np.percentile(ms, 95),
            "p99": np.percentile(ms, 99), "errors": sum(errors.values()),
            "by_status": {k: v for k, v in errors.items() if v}, "requests": len(ms)}


def serve(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "--root", str(root), "--params",
                             str(root / "params.yaml"), "serve", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with trained_project(args.params, "amaas-serve-") as (root, params):
        key = ApiKeys(root / ".amaas" / "api_keys.json").add("benchmark")
        registry = Registry(root / "models" / "registry")
        bundle = ModelBundle.load(registry.version_dir(registry.champion))
        rows = pd.DataFrame([ROW] * 256)
        bundle.predict(rows)
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < 5:
            bundle.predict(rows)
            n += len(rows)
        print(f"in-process predict, batches of 256 rows: {n / (time.perf_counter() - start):,.0f} rows/s")
        print(f"single-row requests, {args.seconds:g} s per run; closed loop: {args.concurrency} clients")
        print(f"{'mode':<22} {'load':<13} {'rps':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7}")
        for mode, batching in (("adaptive batching", True), ("batching off", False)):
            params["serve"]["batching"] = batching
            (root / "params.yaml").write_text(yaml.safe_dump(params))
            proc, url = serve(root)
            try:
                asyncio.run(closed_loop(f"{url}/predict", key, 4, 2))  # warm up
                # the fixed rate first: an overload by the closed loop before it would leave BentoML's
                # dispatcher shedding (503) for a while, which is not what steady traffic at that rate sees
                runs = [(f"{args.rate:g} rps", asyncio.run(open_loop(f"{url}/predict", key, args.rate,
                                                                     args.seconds)))]
                runs.append(("closed loop", asyncio.run(closed_loop(f"{url}/predict", key, args.concurrency,
                                                                    args.seconds))))
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
            for load, r in runs:
                print(f"{mode:<22} {load:<13} {r['rps']:>8.1f} {r['p50']:>8.1f} {r['p95']:>8.1f} {r['p99']:>8.1f} "
                      f"{r['errors']:>7} {r['by_status'] or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
