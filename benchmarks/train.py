"""Training cost: time and peak memory of each learner and of the ensemble on 1M rows x 30 columns.

Usage: python benchmarks/train.py [--rows 1000000] [--devices cpu,cuda] [--learners lightgbm,xgboost,mlp,ensemble]
       [--mlp-batch 256] [--threads N] [--params params.yaml]
Each model trains in its own process, so its peak RSS is its own. Settings are the train section of params.yaml
(early stopping on a time-ordered 20% validation split). The 30 columns are the simulator's 13 features
(3 categorical) plus 17 numeric columns derived from them with noise, as wide tables have.
--devices defaults to cpu, plus cuda where a GPU is visible; with both, each model's CPU/GPU time ratio is
printed. --mlp-batch N also trains the MLP with a fixed batch of N (its learning rate as set), to compare the
default (batch_size auto) with it.
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
from typing import Any

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
    from pipelines.models import Ensemble, build_learners

    settings = load_settings(args.params)
    update: dict[str, Any] = {"device": args.device}
    if args.threads:
        update["threads"] = args.threads
    if args.batch:
        update["mlp"] = settings.train.mlp.model_copy(update={"batch_size": args.batch})
    settings = settings.model_copy(update={"train": settings.train.model_copy(update=update)})
    data = pd.read_parquet(args.data)
    y = data.pop("target").to_numpy()
    cut = int(len(data) * 0.8)  # rows are in time order: the newest 20% validate
    from pipelines.transform import FeatureTransform

    transform = FeatureTransform.load(Path(args.data).with_suffix(".transform.json"))
    learners = build_learners(settings, transform)
    if args.device == "cuda":  # the CUDA context (seconds, once a process) is not training time
        import torch

        torch.zeros(1, device="cuda")
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
    parser.add_argument("--devices", help="comma-separated: cpu, cuda (default: cpu, and cuda when visible)")
    parser.add_argument("--learners", help="comma-separated: learner kinds and/or ensemble (default: all)")
    parser.add_argument("--mlp-batch", type=int, help="also train the MLP with this fixed batch size")
    parser.add_argument("--threads", type=int, help="train.threads (default: params.yaml's)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--device", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        train_one(args)
        return 0
    settings = load_settings(args.params)
    from pipelines.models.base import cuda_available

    devices = args.devices.split(",") if args.devices else ["cpu", *(["cuda"] if cuda_available() else [])]
    workers = args.learners.split(",") if args.learners else [*settings.train.learners, "ensemble"]
    runs = [(w, d, None) for w in workers for d in devices]
    if args.mlp_batch and "mlp" in workers:
        runs += [("mlp", d, args.mlp_batch) for d in devices]
    with tempfile.TemporaryDirectory(prefix="amaas-train-bench-") as tmp:
        data = Path(tmp) / "table.parquet"
        make_table(args.params, args.rows, data)
        width = len(pd.read_parquet(data).columns) - 1
        print(f"rows: {args.rows:,} x {width} columns; train 80% / valid 20%; devices: {','.join(devices)}; "
              f"threads: {args.threads or settings.train.threads}; ensemble: {settings.train.ensemble}; "
              f"mlp batch: {settings.train.mlp.batch_size}")
        print(f"{'model':<16} {'device':<12} {'seconds':>8} {'peak MiB':>9} {'valid log loss':>15}")
        seconds: dict[tuple[str, str], float] = {}
        for worker, device, batch in runs:
            name = worker if batch is None else f"mlp (batch {batch})"
            cmd = [sys.executable, __file__, "--params", args.params, "--device", device, "--worker", worker,
                   "--data", str(data), *(["--threads", str(args.threads)] if args.threads else []),
                   *(["--batch", str(batch)] if batch else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name:<16} {device:<12} failed: {proc.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            seconds[name, device] = r["seconds"]
            print(f"{name:<16} {r['device']:<12} {r['seconds']:>8.1f} {r['peak_mib']:>9.0f} "
                  f"{r['valid_log_loss']:>15.4f}", flush=True)
        if {"cpu", "cuda"} <= set(devices):
            print("CPU time / GPU time (same machine):")
            for name in dict.fromkeys(n for n, _ in seconds):
                if (name, "cpu") in seconds and (name, "cuda") in seconds:
                    print(f"  {name:<16} {seconds[name, 'cpu'] / seconds[name, 'cuda']:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
