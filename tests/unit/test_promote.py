"""The promotion gate on real trained bundles: better wins, worse loses, rollback restores."""

import numpy as np
import pytest

from pipelines import registry as registry_ops
from pipelines.config import Paths, load_settings
from pipelines.metrics import paired_bootstrap
from pipelines.registry import Registry, RegistryError
from pipelines.stages import collect, compress, prepare, promote, train, validate
from tests.conftest import write_params

WEAK = {"train.learners": ["lightgbm"], "train.lightgbm.n_estimators": 2, "train.lightgbm.num_leaves": 2}


def _train(root, **overrides):
    settings = load_settings(write_params(root, **{"source.simulator.rows_per_batch": 1500, **overrides}))
    paths = Paths(root)
    train.run(settings, paths)
    compress.run(settings, paths)
    return settings, paths


@pytest.mark.slow  # collect, validate, prepare and three trainings
def test_gate_promotes_better_keeps_champion_against_worse_and_rolls_back(tmp_path, caplog):
    settings = load_settings(write_params(tmp_path, **{"source.simulator.rows_per_batch": 1500}))
    paths = Paths(tmp_path)
    for stage in (collect, validate, prepare):
        stage.run(settings, paths)
    registry = Registry(paths.registry)

    weak_settings, _ = _train(tmp_path, **WEAK)
    first = promote.run(weak_settings, paths)
    assert first["promoted"] and first["reason"].startswith("no champion yet: roc_auc 0.")
    weak = registry.champion

    strong_settings, _ = _train(tmp_path)
    better = promote.run(strong_settings, paths)
    assert better["promoted"], better["reason"]
    assert better["gain"] >= strong_settings.promote.min_improvement and better["p_value"] <= 0.05
    strong = registry.champion
    assert strong != weak

    # the registry keeps each version's lineage and a model card with the decision
    record = registry.load(strong).metadata
    assert {"data_md5", "git_commit", "params", "device", "metrics", "reports"} <= set(record)
    assert record["reports"]["validation"] == "reports/validation.json"
    card = (registry.version_dir(strong) / "MODEL_CARD.md").read_text()
    assert f"# Model card: {strong}" in card and "Status after its latest gate:** champion" in card
    assert f"gain {better['gain']:+.4f} over champion {weak}" in card
    page = (registry.version_dir(strong) / "MODEL_CARD.html").read_text()  # the same card as a page
    assert f"<h1>Model card: {strong}</h1>" in page and 'class="status champion"' in page
    assert f"gain {better['gain']:+.4f} over champion {weak}" in page
    assert "run <code>amaas evaluate</code> before" in page  # this flow skips evaluate: no pictures, and it says so

    _train(tmp_path, **WEAK)
    worse = promote.run(weak_settings, paths)
    assert not worse["promoted"] and worse["gain"] < 0 and "fails the gate" in worse["reason"]
    assert "Status after its latest gate:** not promoted" in (paths.reports / "model_card.md").read_text()
    assert 'class="status not-promoted"' in paths.model_card_html.read_text()
    assert any(r.getMessage().startswith("ALERT gate_failed: challenger") for r in caplog.records)
    assert registry.champion == strong

    assert registry_ops.rollback(registry, reason="test") == weak
    assert registry.champion == weak
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry_ops.rollback(registry)
    actions = [d["action"] for d in registry.decisions()]
    assert actions == ["gate", "gate", "gate", "rollback"]

    assert registry_ops.force_promote(registry, strong, reason="test") == strong
    assert registry.decisions()[-1]["action"] == "force_promote"


def test_small_gain_is_not_enough(tmp_path):
    """Same predictions plus noise: a gain below the margin or not significant keeps the champion."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    champion = np.clip(y * 0.3 + rng.random(2000) * 0.7, 0, 1)
    challenger = np.clip(champion + rng.normal(0, 0.01, 2000), 0, 1)
    as_output = lambda p1: np.column_stack([1 - p1, p1])  # noqa: E731
    stats = paired_bootstrap("roc_auc", y, as_output(champion), as_output(challenger), 200, seed=1)
    assert abs(stats["gain"]) < 0.002 and stats["p_value"] > 0.05
