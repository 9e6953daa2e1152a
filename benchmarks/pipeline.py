"""Time every stage of one pipeline run on simulator data of a given size; print seconds, CPU seconds and peak
memory per stage, and the total.

Usage: python benchmarks/pipeline.py [--params params.yaml] [--rows N] [--features F] [--rows-per-batch N]
       [--fit-rows N] [--train-max-rows N] [--report-max-rows N] [--keep DIR]
--rows N spreads N rows over source.simulator.n_batches days; --features F (at least the simulator's 13) adds
F - 13 numeric columns (source.simulator.extra_features) and lists them in the project's schema. With --rows over
1,000,000 the scale settings apply unless given: prepare.fit_rows and train.max_rows 1,000,000, report.max_rows
200,000 (--fit-rows 0 etc.: null, all rows).
Each stage runs as `amaas <stage>` does under `dvc repro`: in a process of its own (`python -m pipelines.cli`),
on a temporary project (the repository's data/ and models/ are not touched), so its peak RSS is its own; the
stages' logs go to benchmark.log in the project (printed where a stage fails).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from pipelines.runner import STAGES
from pipelines.sources.simulator import extra_schema

REAL_FEATURES = 13  # the simulator's own feature columns (10 numeric, 3 categorical)
SCALE_ROWS = 1_000_000  # above this many rows, the scale settings below apply unless given
SCALE_DEFAULTS = {"fit_rows": 1_000_000, "train_max_rows": 1_000_000, "report_max_rows": 200_000}


def project_params(params: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark project's params: the repository's, sized and widened as asked."""
    sim = params["source"]["simulator"]
    if args.rows:
        sim["rows_per_batch"] = -(-args.rows // sim["n_batches"])
    if args.rows_per_batch:
        sim["rows_per_batch"] = args.rows_per_batch
    if args.features is not None:
        if args.features < REAL_FEATURES:
            raise SystemExit(f"--features must be at least the simulator's {REAL_FEATURES}")
        sim["extra_features"] = args.features - REAL_FEATURES
        params["schema"]["numeric"] |= extra_schema(sim["extra_features"])  # a wide table's own schema
    rows = sim["n_batches"] * sim["rows_per_batch"]
    for name, default in SCALE_DEFAULTS.items():
        value = getattr(args, name)
        if value is None:
            value = default if rows > SCALE_ROWS else None
        section, key = {"fit_rows": ("prepare", "fit_rows"), "train_max_rows": ("train", "max_rows"),
                        "report_max_rows": ("report", "max_rows")}[name]
        params[section][key] = value or None
    if params["validate"].get("expectations_file"):  # the run happens elsewhere: point at this project's file
        params["validate"]["expectations_file"] = str(Path(params["validate"]["expectations_file"]).resolve())
    return params


def run_stage_process(stage: str, root: Path) -> tuple[float, float, float, int]:
    """Run `stage` in a process of its own; (wall s, CPU s, peak RSS MiB, exit status)."""
    code_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code_root, os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with (root / "benchmark.log").open("a") as logged:  # the stages' logs: printed where one fails
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "--params", str(root / "params.yaml"),
                                 "--root", str(root), stage], env=env, cwd=root, stdout=logged, stderr=logged)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return (time.perf_counter() - start, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024,
            proc.returncode)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rows", type=int, help="rows in all (spread over source.simulator.n_batches days)")
    parser.add_argument("--features", type=int, help=f"feature columns (at least {REAL_FEATURES})")
    parser.add_argument("--rows-per-batch", type=int)
    for name in SCALE_DEFAULTS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help="0: null (all rows)")
    parser.add_argument("--keep", type=Path, help="run in this (new) folder and keep it, instead of a temporary one")
    args = parser.parse_args()
    params = project_params(yaml.safe_load(Path(args.params).read_text()), args)
    with tempfile.TemporaryDirectory(prefix="amaas-bench-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        sim = params["source"]["simulator"]
        features = REAL_FEATURES + sim.get("extra_features", 0)
        print(f"rows: {sim['n_batches'] * sim['rows_per_batch']:,} ({sim['n_batches']} batches), features: "
              f"{features}; prepare.fit_rows={params['prepare']['fit_rows']} train.max_rows="
              f"{params['train']['max_rows']} report.max_rows={params['report']['max_rows']}; "
              f"{os.cpu_count()} CPUs", flush=True)
        print(f"{'stage':<10} {'seconds':>8} {'CPU s':>8} {'peak RSS MiB':>13}", flush=True)
        total = cpu_total = peak_max = 0.0
        for stage in STAGES:
            wall, cpu, peak, status = run_stage_process(stage, root)
            total, cpu_total, peak_max = total + wall, cpu_total + cpu, max(peak_max, peak)
            print(f"{stage:<10} {wall:>8.1f} {cpu:>8.1f} {peak:>13.0f}" + ("" if status == 0 else
                  f"   FAILED (exit {status})"), flush=True)
            if status != 0:
                print((root / "benchmark.log").read_text()[-5000:])
                return 1
        print(f"{'total':<10} {total:>8.1f} {cpu_total:>8.1f} {peak_max:>13.0f}")
        cost = json.loads((root / "reports" / "cost.json").read_text())
        print(f"cost at ${cost['prices']['cpu_hour_usd']} per CPU-hour: ${cost['total']['usd']:.6f} "
              f"(stage CPU {cost['total']['cpu_s']:.1f} s, as reports/cost.json records it)")
        metrics = json.loads((root / "reports" / "metrics.json").read_text())
        metric = params["promote"]["metric"]
        print(f"{metric} on {metrics.get('test_rows')} test rows: {metrics.get(metric)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
