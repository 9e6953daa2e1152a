"""Training cost: time and peak memory of each learner and of the ensemble on 1M rows x 30 columns.

Usage: python benchmarks/train.py [--rows 1000000] [--device auto|cpu|cuda] [--params params.yaml]
Each learner trains in its own process, so its peak RSS is its own. Settings are the train section of
params.yaml (early stopping on a time-ordered 20% validation split). The 30 columns are the simulator's
13 features (3 categorical) plus 17 numeric columns derived from them with noise, as wide tables have.
On a machine with a GPU, run it with --device cpu and --device cuda to get the CPU/GPU ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import load_settings


def make_table(settings_path: str, rows: int, out: Path) -> None:
    """Write model-ready features (27 numeric, 3 categorical codes) and the target, and the transform beside."""
    from pipelines.sources.simulator import generate_batch
    from pipelines.transform import FeatureTransform

    settings = load_settings(settings_path)
    cfg = settings.source.simulator.model_copy(update={"rows_per_batch": rows // 10, "malformed_share": 0})
    raw = pd.concat([generate_batch(cfg, settings.seed, i) for i in range(10)], ignore_index=True)
    clean = settings.clean.model_copy(update={"missing_indicators": False})
    transform = FeatureTransform.fit(raw, settings.data_schema, clean)
    X = transform.transform(raw)
    rng = np.random.default_rng(0)
    numeric = transform.numeric
    for k in range(17):  # wide-table columns: products and noisy copies of the real ones
        a, b = numeric[k % len(numeric)], numeric[(3 * k + 1) % len(numeric)]
        X[f"extra_{k}"] = X[a] * X[b] + rng.normal(0, 0.5, len(X)) if k % 2 else X[a] + rng.normal(0, 1, len(X))
    X["target"] = raw[settings.data_schema.target].to_numpy()
    X.to_parquet(out)
    transform.save(out.with_suffix(".transform.json"))


def train_one(args: argparse.Namespace) -> None:
    """In a child process: train `args.worker` (a learner name or "ensemble") and print its figures."""
    from pipelines.models import Ensemble
    from pipelines.stages.train import build_learners

    settings = load_settings(args.params)
    settings = settings.model_copy(update={"train": settings.train.model_copy(update={"device": args.device})})
    data = pd.read_parquet(args.data)
    y = data.pop("target").to_numpy()
    cut = int(len(data) * 0.8)  # rows are in time order: the newest 20% validate
    from pipelines.transform import FeatureTransform

    transform = FeatureTransform.load(Path(args.data).with_suffix(".transform.json"))
    learners = build_learners(settings, transform)
    start = time.perf_counter()
    if args.worker == "ensemble":
        model = Ensemble(learners, settings.train.ensemble, settings.train.stacking_folds, settings.seed,
                         settings.train.bags).fit(data.iloc[:cut], y[:cut], data.iloc[cut:], y[cut:])
        device = "+".join(sorted({getattr(m, "device_", "cpu") for m in model.members_}))
    else:
        model = next(lr for lr in learners if lr.kind == args.worker)
        model.fit(data.iloc[:cut], y[:cut], data.iloc[cut:], y[cut:])
        device = model.device_
    took = time.perf_counter() - start
    from pipelines.models.base import valid_loss

    loss = valid_loss(y[cut:], model.predict_output(data.iloc[cut:]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": took, "peak_mib": peak, "valid_log_loss": loss, "device": device}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        train_one(args)
        return 0
    settings = load_settings(args.params)
    with tempfile.TemporaryDirectory(prefix="amaas-train-bench-") as tmp:
        data = Path(tmp) / "table.parquet"
        make_table(args.params, args.rows, data)
        width = len(pd.read_parquet(data).columns) - 1
        print(f"rows: {args.rows:,} x {width} columns; train 80% / valid 20%; device requested: {args.device}; "
              f"threads: {settings.train.threads}; ensemble: {settings.train.ensemble}")
        print(f"{'model':<10} {'device':<8} {'seconds':>8} {'peak MiB':>9} {'valid log loss':>15}")
        for worker in [*settings.train.learners, "ensemble"]:
            proc = subprocess.run([sys.executable, __file__, "--params", args.params, "--device", args.device,
                                   "--worker", worker, "--data", str(data)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{worker:<10} failed: {proc.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{worker:<10} {r['device']:<8} {r['seconds']:>8.1f} {r['peak_mib']:>9.0f} "
                  f"{r['valid_log_loss']:>15.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
