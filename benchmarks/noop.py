"""No-op `dvc repro`: the time of a repro with nothing new, and how much of it is collect (which runs every time).

Usage: python benchmarks/noop.py [--params params.yaml] [--rows-per-batch N] [--repeat 5]

Builds a DVC project in a temporary folder (this checkout's code, dvc.yaml and DVC config, git), runs `dvc repro`
once, then times `dvc repro` with nothing new and `amaas collect` on its own; dvc's own time is the difference.
Target: a no-op `dvc repro` within 2 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return took, proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rows-per-batch", type=int, help="simulator rows per day (the first repro trains on them)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    params = yaml.safe_load(Path(args.params).read_text())
    params["validate"]["expectations_file"] = None  # this project's own expectations file is not there
    if args.rows_per_batch:
        params["source"]["simulator"]["rows_per_batch"] = args.rows_per_batch
    # the commands run this checkout's code, whatever the venv's editable install points at
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="amaas-bench-noop-") as tmp:
        root = Path(tmp)
        for name in ("pipelines", "bentos", "dags", "expectations"):
            shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
        (root / ".dvc").mkdir()
        shutil.copy2(REPO / ".dvc" / "config", root / ".dvc" / "config")
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        first, _ = timed(["dvc", "repro"], root, env)
        print(f"first dvc repro (every stage): {first:.1f} s")
        repro, collect = [], []
        for _ in range(args.repeat):
            took, out = timed(["dvc", "repro"], root, env)
            ran = [line for line in out.splitlines() if "Running stage" in line]
            if ran != ["Running stage 'collect':"]:
                raise SystemExit(f"a no-op repro ran more than collect: {ran}")
            repro.append(took)
            collect.append(timed([str(BIN / "amaas"), "collect"], root, env)[0])
    med_repro, med_collect = statistics.median(repro), statistics.median(collect)
    print(f"no-op dvc repro: median {med_repro:.2f} s of {args.repeat} (min {min(repro):.2f}, max {max(repro):.2f})"
          f"; target 2 s")
    print(f"  amaas collect with nothing new: median {med_collect:.2f} s")
    print(f"  dvc's own time (repro - collect): {med_repro - med_collect:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
