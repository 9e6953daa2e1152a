"""promote: the challenger replaces the champion only if it is measurably better on the same rows.

Gate: gain = metric(challenger) - metric(champion) on the current held-out test rows must be at
least promote.min_improvement, and a paired bootstrap must say the gain is significant
(share of resamples with gain <= 0 at most promote.max_p_value). The decision and its numbers
are recorded in the registry and in reports/promotion.json.
"""

from __future__ import annotations

import getpass
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from pipelines import modelcard
from pipelines.alerts import alert
from pipelines.bundle import METADATA_FILE
from pipelines.config import Paths, Settings
from pipelines.io import read_json, write_json, write_text
from pipelines.registry import SAMPLE_FILE, TEST_PREDICTIONS_FILE, Registry

log = logging.getLogger(__name__)
METRICS = {"roc_auc": skm.roc_auc_score, "pr_auc": skm.average_precision_score}


def bootstrap_resamples(y: np.ndarray, samples: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Row indexes of `samples` resamples with replacement, less those with one class (they have no AUC)."""
    for _ in range(samples):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() != y[idx].max():
            yield idx


def paired_bootstrap(y: np.ndarray, champion: np.ndarray, challenger: np.ndarray, metric: str,
                     samples: int, seed: int) -> dict[str, float]:
    """Gain of challenger over champion on the same rows, with a one-sided bootstrap p-value."""
    score = METRICS[metric]
    gain = float(score(y, challenger) - score(y, champion))
    arr = np.asarray([score(y[idx], challenger[idx]) - score(y[idx], champion[idx])
                      for idx in bootstrap_resamples(y, samples, np.random.default_rng(seed))])
    return {"gain": gain, "p_value": float(np.mean(arr <= 0)), "ci_low": float(np.quantile(arr, 0.025)),
            "ci_high": float(np.quantile(arr, 0.975)), "bootstrap_samples": len(arr)}


def run(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Register the challenger; make it champion if the gate passes (or if there is no champion)."""
    cfg = settings.promote
    registry = Registry(paths.registry)
    reports = {name: paths.reports / f"{name}.json" for name in ("validation", "drift", "metrics", "slices")}
    found = {name: read_json(path) if path.is_file() else {} for name, path in reports.items()}
    extra = {"reports": {name: str(path.relative_to(paths.root)) for name, path in reports.items()},
             "metrics": found["metrics"]}
    monitoring = {SAMPLE_FILE: paths.reference / SAMPLE_FILE,
                  TEST_PREDICTIONS_FILE: paths.reports / "test_predictions.parquet"}
    challenger = registry.register(paths.challenger, extra, {k: v for k, v in monitoring.items() if v.is_file()})
    champion = registry.champion
    decision: dict[str, Any] = {"challenger": challenger, "champion_before": champion, "metric": cfg.metric,
                                "min_improvement": cfg.min_improvement, "max_p_value": cfg.max_p_value}
    if champion is None:
        decision |= {"promoted": True, "reason": "no champion yet"}
    elif champion == challenger:
        decision |= {"promoted": False, "reason": "challenger is already the champion"}
    else:
        test = pd.read_parquet(paths.reference / "test.parquet")
        y = test[settings.data_schema.target].to_numpy()
        stats = paired_bootstrap(y, registry.load(champion).predict_proba(test),
                                 registry.load(challenger).predict_proba(test),
                                 cfg.metric, cfg.bootstrap_samples, settings.seed)
        better = stats["gain"] >= cfg.min_improvement and stats["p_value"] <= cfg.max_p_value
        reason = (f"gain {stats['gain']:+.4f} {cfg.metric} (p={stats['p_value']:.3f}) "
                  + ("passes" if better else "fails") + f" the gate (>= {cfg.min_improvement}, p <= {cfg.max_p_value})")
        decision |= {"promoted": better, "reason": reason, **stats}
    if decision["promoted"]:
        registry.set_champion(challenger)
    decision["champion_after"] = registry.champion
    registry.record({"action": "gate", **decision})
    write_json(paths.reports / "promotion.json", decision)
    card = modelcard.render(read_json(registry.version_dir(challenger) / METADATA_FILE), found["metrics"],
                            found["slices"], found["validation"], found["drift"], decision,
                            settings.data_schema.target)
    write_text(registry.version_dir(challenger) / "MODEL_CARD.md", card)
    write_text(paths.reports / "model_card.md", card)
    if "gain" in decision and not decision["promoted"]:
        alert(settings, paths, "gate_failed", f"challenger {challenger} not promoted: {decision['reason']}",
              decision)
    log.info("promotion decision: %s -> champion %s (%s)", challenger, decision["champion_after"], decision["reason"])
    return decision


def _operator_record(action: str, **fields: Any) -> dict[str, Any]:
    return {"action": action, "by": getpass.getuser(), "at": datetime.now(UTC).isoformat(timespec="seconds"), **fields}


def force_promote(paths: Paths, version: str | None = None, reason: str = "") -> str:
    """Operator override: make `version` (default: the current challenger) champion, gate skipped."""
    registry = Registry(paths.registry)
    target = version or registry.aliases()["challenger"]
    if target is None:
        raise ValueError("no challenger registered: run the pipeline first or pass --version")
    before = registry.champion
    registry.set_champion(target)
    registry.record(_operator_record("force_promote", champion_before=before, champion_after=target, reason=reason))
    log.warning("operator forced %s to champion (was %s)", target, before)
    return target


def rollback(paths: Paths, reason: str = "") -> str:
    """Operator action: return to the previous champion."""
    registry = Registry(paths.registry)
    before, after = registry.rollback()
    registry.record(_operator_record("rollback", champion_before=before, champion_after=after, reason=reason))
    log.warning("operator rolled back champion %s -> %s", before, after)
    return after
