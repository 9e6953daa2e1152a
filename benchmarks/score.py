"""Batch scoring throughput: rows/s of `amaas score` in process and on a Dask LocalCluster of 1 and 2 workers.

Usage: python benchmarks/score.py [--rows 1000000] [--params params.yaml]
Trains a small model in a temporary project first (about 15 s), then scores the same table each way.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import pandas as pd
from _project import trained_project  # beside this script
from distributed import LocalCluster

from pipelines import score
from pipelines.config import Paths, load_settings
from pipelines.runner import STAGES
from pipelines.sources.simulator import generate_batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    stages = STAGES[:STAGES.index("compress") + 1] + ("promote",)
    with trained_project(args.params, "amaas-score-", stages) as (root, _):
        settings, paths = load_settings(root / "params.yaml"), Paths(root)
        cfg = settings.source.simulator.model_copy(update={"rows_per_batch": args.rows // 4})
        pd.concat([generate_batch(cfg, 3, i) for i in range(4)], ignore_index=True).to_parquet(root / "in.parquet")
        print(f"rows: {args.rows:,}, chunk rows: {settings.scale.score_chunk_rows:,}")
        print(f"{'where':<28} {'seconds':>8} {'rows/s':>10} {'cluster start s':>16}")
        start = time.perf_counter()
        summary = score.run(settings, paths, root / "in.parquet", root / "out.parquet")
        took = time.perf_counter() - start
        print(f"{'in process':<28} {took:>8.2f} {summary['rows'] / took:>10,.0f} {'-':>16}")
        for workers in (1, 2):
            start = time.perf_counter()
            with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cluster:
                started = time.perf_counter() - start
                on_cluster = settings.model_copy(update={"scale": settings.scale.model_copy(
                    update={"dask_scheduler": cluster.scheduler_address})})
                start = time.perf_counter()
                summary = score.run(on_cluster, paths, root / "in.parquet", root / "out.parquet")
                took = time.perf_counter() - start
            label = f"dask, {workers} worker{'s' if workers > 1 else ''}"
            print(f"{label:<28} {took:>8.2f} {summary['rows'] / took:>10,.0f} {started:>16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
