"""Time every stage of one pipeline run on simulator data of a given size; print seconds, CPU seconds and peak
memory per stage, and the total, each stage's seconds split into its fixed cost (process start, imports, settings:
the process's wall time less the stage's own, as reports/cost.json records it) and its work; and beside each
target of issue 32 that applies to this size, the figure as a ratio of the target (at most 1.00 meets it).

Usage: python benchmarks/pipeline.py [--params params.yaml] [--rows N] [--features F] [--rows-per-batch N]
       [--fit-rows N] [--train-max-rows N] [--report-max-rows N] [--keep DIR]
--rows N spreads N rows over source.simulator.n_batches days; --features F (at least the simulator's 13) adds
F - 13 numeric columns (source.simulator.extra_features) and lists them in the project's schema. With --rows over
1,000,000 the scale settings apply unless given: prepare.fit_rows and train.max_rows 1,000,000, report.max_rows
200,000 (--fit-rows 0 etc.: null, all rows).
Each stage runs as `amaas <stage>` does under `dvc repro`: as a command of its own (`python -m pipelines.entry`,
the console script's module), on a temporary project (the repository's data/ and models/ are not touched); the
stages' logs go to benchmark.log in the project (printed where a stage fails). As under `dvc repro`, the first
stage command starts the preloaded stage host (pipelines.stagehost) and runs its stage itself; the later ones run
their stages in the host. A hosted stage's CPU seconds are its command's plus its stage process's, its peak RSS
the larger of the two (the stage process's counts the host's preloaded pages it shares), and the host's preload
(in the background, while the first stages run) is printed on a line of its own. --no-stage-host runs every
stage in a process of its own instead (AMAAS_STAGE_HOST=0).
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

from pipelines import stagehost
from pipelines.runner import STAGES
from pipelines.sources.simulator import extra_schema

REAL_FEATURES = 13  # the simulator's own feature columns (10 numeric, 3 categorical)
SCALE_ROWS = 1_000_000  # above this many rows, the scale settings below apply unless given
SCALE_DEFAULTS = {"fit_rows": 1_000_000, "train_max_rows": 1_000_000, "report_max_rows": 200_000}
# Targets by table size (issue 32): a small table (5,000 or 200 rows: up to SMALL_ROWS) in SMALL_TOTAL_S seconds,
# no stage but train over STAGE_SHARE of it; 10M rows (and more) in BIG_TOTAL_S and BIG_PEAK_MIB.
SMALL_ROWS, SMALL_TOTAL_S, STAGE_SHARE = 10_000, 30.0, 0.25
BIG_ROWS, BIG_TOTAL_S, BIG_PEAK_MIB = 10_000_000, 20 * 60.0, 6 * 1024.0


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


def run_stage_process(stage: str, root: Path, hosted: bool) -> tuple[float, float, float, int, dict[str, Any]]:
    """Run the command of `stage`; (wall s, CPU s, peak RSS MiB, exit status, the stage host's figures where the
    stage ran in it: its pid and preload)."""
    code_root = str(Path(__file__).resolve().parents[1])
    usage_file = root / ".stage-usage.json"
    usage_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code_root, os.environ.get("PYTHONPATH")])),
           stagehost.USAGE_ENV: str(usage_file), **({} if hosted else {stagehost.SWITCH: "0"})}
    start = time.perf_counter()
    with (root / "benchmark.log").open("a") as logged:  # the stages' logs: printed where one fails
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.entry", "--params", str(root / "params.yaml"),
                                 "--root", str(root), stage], env=env, cwd=root, stdout=logged, stderr=logged)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    cpu, peak = usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024
    host: dict[str, Any] = {}
    if usage_file.exists():  # the stage ran in the host: its process's figures, besides the command's
        stage_usage = json.loads(usage_file.read_text())
        cpu, peak, host = cpu + stage_usage["cpu_s"], max(peak, stage_usage["peak_rss_mib"]), stage_usage["host"]
    return wall, cpu, peak, os.waitstatus_to_exitcode(status), host


def targets(rows: int, runs: dict[str, tuple[float, float, float, float]], total: float, peak_mib: float) -> list[str]:
    """The targets that apply to a table of `rows`, each with the figure and its ratio to the target."""
    def line(name: str, figure: float, target: float, unit: str) -> str:
        return (f"target {name}: {figure:.1f} {unit} of at most {target:.1f} {unit}: ratio {figure / target:.2f} "
                + ("(met)" if figure <= target else "(NOT met)"))

    if rows <= SMALL_ROWS:
        return [line("small table, whole pipeline", total, SMALL_TOTAL_S, "s"),
                *(line(f"{stage} share of the total (train exempt)", 100 * wall / total, 100 * STAGE_SHARE, "%")
                  for stage, (wall, *_) in runs.items() if stage != "train")]
    if rows >= BIG_ROWS:
        return [line("10M rows, whole pipeline", total, BIG_TOTAL_S, "s"),
                line("10M rows, peak memory of a stage", peak_mib, BIG_PEAK_MIB, "MiB")]
    return [f"no target for {rows:,} rows (small: up to {SMALL_ROWS:,}; big: {BIG_ROWS:,} and more)"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rows", type=int, help="rows in all (spread over source.simulator.n_batches days)")
    parser.add_argument("--features", type=int, help=f"feature columns (at least {REAL_FEATURES})")
    parser.add_argument("--rows-per-batch", type=int)
    for name in SCALE_DEFAULTS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help="0: null (all rows)")
    parser.add_argument("--no-stage-host", action="store_true",
                        help="every stage in a process of its own, none in the preloaded stage host")
    parser.add_argument("--keep", type=Path, help="run in this (new) folder and keep it, instead of a temporary one")
    args = parser.parse_args()
    params = project_params(yaml.safe_load(Path(args.params).read_text()), args)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
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
        print(f"{'stage':<10} {'seconds':>8} {'fixed s':>8} {'work s':>8} {'CPU s':>8} {'peak RSS MiB':>13} "
              f"{'in host':>8}",
              flush=True)
        runs: dict[str, tuple[float, float, float, float]] = {}  # wall, CPU, peak, fixed
        hosts: dict[int, dict[str, Any]] = {}
        for stage in STAGES:
            wall, cpu, peak, status, host = run_stage_process(stage, root, not args.no_stage_host)
            if host:
                hosts[host["host_pid"]] = host
            if status != 0:
                print(f"{stage:<10} {wall:>8.1f}   FAILED (exit {status})")
                print((root / "benchmark.log").read_text()[-5000:])
                return 1
            work = json.loads((root / "reports" / "cost.json").read_text())["stages"][stage]["wall_s"]
            runs[stage] = wall, cpu, peak, wall - work
            print(f"{stage:<10} {wall:>8.1f} {wall - work:>8.1f} {work:>8.1f} {cpu:>8.1f} {peak:>13.0f} "
                  f"{'yes' if host else 'no':>8}", flush=True)
        total = sum(r[0] for r in runs.values())
        peak_max = max(r[2] for r in runs.values())
        fixed = sum(r[3] for r in runs.values())
        cpu_total = sum(r[1] for r in runs.values())
        print(f"{'total':<10} {total:>8.1f} {fixed:>8.1f} {total - fixed:>8.1f} {cpu_total:>8.1f} {peak_max:>13.0f}")
        for host in hosts.values():
            print(f"stage host (pid {host['host_pid']}): " + (
                f"preloaded in {host['preload_s']:.1f} s ({host['preload_cpu_s']:.1f} CPU s, in the background "
                "while the first stages ran; not in the totals)" if "preload_s" in host else "still preloading"))
        if not hosts:
            print("stage host: " + ("off (--no-stage-host)" if args.no_stage_host else "no stage ran in one"))
        print(f"load average before/after: {load_before} / {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        for line in targets(sim["n_batches"] * sim["rows_per_batch"], runs, total, peak_max):
            print(line)
        cost = json.loads((root / "reports" / "cost.json").read_text())
        print(f"cost at ${cost['prices']['cpu_hour_usd']} per CPU-hour: ${cost['total']['usd']:.6f} "
              f"(stage CPU {cost['total']['cpu_s']:.1f} s, as reports/cost.json records it)")
        metrics = json.loads((root / "reports" / "metrics.json").read_text())
        metric = params["promote"]["metric"]
        print(f"{metric} on {metrics.get('test_rows')} test rows: {metrics.get(metric)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
