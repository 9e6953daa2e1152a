"""Time every stage of one pipeline run on the default simulator data; print seconds and peak memory.

Usage: python benchmarks/pipeline.py [--params params.yaml] [--rows-per-batch N]
Runs in a temporary project folder, so the repository's data/ and models/ are not touched.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import yaml

from pipelines.runner import STAGES, run_stage


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rows-per-batch", type=int)
    args = parser.parse_args()
    params = yaml.safe_load(Path(args.params).read_text())
    if args.rows_per_batch:
        params["source"]["simulator"]["rows_per_batch"] = args.rows_per_batch
    if params["validate"].get("expectations_file"):  # the run happens elsewhere: point at this project's file
        params["validate"]["expectations_file"] = str(Path(params["validate"]["expectations_file"]).resolve())
    with tempfile.TemporaryDirectory(prefix="amaas-bench-") as tmp:
        root = Path(tmp)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        sim = params["source"]["simulator"]
        print(f"rows: {sim['n_batches'] * sim['rows_per_batch']} ({sim['n_batches']} batches)")
        print(f"{'stage':<10} {'seconds':>8} {'peak RSS MiB':>13}")
        total = 0.0
        for stage in STAGES:
            start = time.perf_counter()
            run_stage(stage, root / "params.yaml", root)
            took = time.perf_counter() - start
            total += took
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"{stage:<10} {took:>8.2f} {peak:>13.0f}")
        print(f"{'total':<10} {total:>8.2f}")
        cost = json.loads((root / "reports" / "cost.json").read_text())
        print(f"\n{'stage':<10} {'CPU s':>8} {'USD':>10}   (at ${cost['prices']['cpu_hour_usd']} per CPU-hour)")
        for stage, entry in cost["stages"].items():
            print(f"{stage:<10} {entry['cpu_s']:>8.2f} {entry['usd']:>10.6f}")
        print(f"{'total':<10} {cost['total']['cpu_s']:>8.2f} {cost['total']['usd']:>10.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
