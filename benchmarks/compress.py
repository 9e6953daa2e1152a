"""Compression: the trained ensemble against its distilled student and its int8 copy, in one run.

Usage: python benchmarks/compress.py [--params params.yaml] [--rows-per-batch N]
Runs the pipeline up to `compress` in a temporary project (the default data: about 1 min on 2 cores), then
prints each candidate's figures as the compress stage measured them (in process, raw rows through the fitted
transform) and their ratios to the ensemble: single-row latency, rows/s at batches of 256, promote.metric on
the test rows, size on disk, peak memory, and the MLP alone in float32 and int8.
"""

from __future__ import annotations

import argparse
import logging
import sys

from _project import trained_project  # beside this script

from pipelines.config import Paths
from pipelines.io import read_json
from pipelines.runner import STAGES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rows-per-batch", type=int)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = {"source": {"simulator": {"rows_per_batch": args.rows_per_batch}}} if args.rows_per_batch else {}
    stages = STAGES[:STAGES.index("compress") + 1]
    with trained_project(args.params, "amaas-compress-", stages, overrides) as (root, _):
        report = read_json(Paths(root).compression_report)
        cost = read_json(Paths(root).cost_report)
    metric, candidates = report["metric"], report["candidates"]
    base = candidates["ensemble"]
    print(f"served: {report['served']} ({report['reason']})")
    print(f"student: {report['student']['kind']}, {report['student'].get('trees', '-')} trees "
          f"(of {report['student'].get('trees_distilled', '-')} distilled), {report['student']['rows']:,} rows "
          f"({report['student']['augmented_rows']:,} augmented)")
    header = (f"{'candidate':<10} {metric:>9} {'loss':>8} {'p50 ms':>8} {'p99 ms':>8} {'model p50':>10} "
              f"{'CPU p50':>8} {'rows/s':>9} {'size KiB':>9} {'peak MiB':>9} {'$/1k rows':>10}")
    print(header)
    for name, f in candidates.items():
        loss = f.get("metric_loss")
        memory = f["peak_memory_bytes"]
        print(f"{name:<10} {_num(f[metric]):>9} {_num(loss):>8} {f['latency_ms_p50']:>8.3f} "
              f"{f['latency_ms_p99']:>8.3f} {f['model_latency_ms_p50']:>10.3f} {f['cpu_ms_p50']:>8.3f} "
              f"{f['rows_per_s']:>9,.0f} "
              f"{f['disk_bytes'] / 1024:>9.1f} {'n/a' if memory is None else f'{memory / 2**20:.1f}':>9} "
              f"{f['usd_per_1k_rows']:>10.2e}")
    print("\nratios to the ensemble (higher is better)")
    print(f"{'candidate':<10} {'1-row p50':>10} {'1-row p99':>10} {'model p50':>10} {'CPU p50':>10} {'rows/s':>8} "
          f"{'size':>8}")
    for name, f in candidates.items():
        if name == "ensemble":
            continue
        print(f"{name:<10} {base['latency_ms_p50'] / f['latency_ms_p50']:>9.1f}x "
              f"{base['latency_ms_p99'] / f['latency_ms_p99']:>9.1f}x "
              f"{base['model_latency_ms_p50'] / f['model_latency_ms_p50']:>9.1f}x "
              f"{base['cpu_ms_p50'] / f['cpu_ms_p50']:>9.1f}x "
              f"{f['rows_per_s'] / base['rows_per_s']:>7.1f}x {base['disk_bytes'] / f['disk_bytes']:>7.1f}x")
    mlp = report.get("mlp_int8")
    if mlp:
        print(f"\nMLP alone at batches of 256: float32 {mlp['float32']['rows_per_s']:,.0f} rows/s, {metric} "
              f"{_num(mlp['float32'][metric])}; int8 {mlp['int8']['rows_per_s']:,.0f} rows/s "
              f"({mlp['int8']['speedup']:.2f}x), {metric} {_num(mlp['int8'][metric])}")
    total = cost["total"]
    print(f"\ntraining run up to compress: {total['cpu_s']:.1f} CPU s, ${total['usd']:.5f} at "
          f"${cost['prices']['cpu_hour_usd']} per CPU-hour; serving the pick: "
          f"${candidates[report['served']]['usd_per_1k_rows']:.2e} per 1,000 predictions")
    return 0


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
