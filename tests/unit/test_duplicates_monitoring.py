"""A table with many exact duplicate rows, end to end through the stages' run(): no test row copies a training
row and none is dropped, and monitoring tells an iid later batch (no retrain: prediction drift under the
threshold) from a shifted one (retrain)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipelines.config import ROW_KEY, Paths, load_settings
from pipelines.stages import compress, evaluate, prepare, report, train
from tests.conftest import write_params

DAYS = ("2026-03-01", "2026-03-02", "2026-03-03", "2026-03-04")
COLUMNS = ["x1", "x2", "color", "label"]


def counts_table(rows: int, seed: int, day: str, start: int, shift: int = 0) -> pd.DataFrame:
    """A day of a count target on few discrete features: most rows are exact copies of others (features and
    label); `shift` moves x1 up (a world that moved)."""
    rng = np.random.default_rng(seed)
    x1 = rng.choice(5, rows, p=[0.4, 0.25, 0.15, 0.12, 0.08]) + shift
    x2 = rng.choice(3, rows, p=[0.6, 0.3, 0.1])
    color = rng.choice(["red", "green", "blue"], rows, p=[0.5, 0.3, 0.2])
    label = rng.poisson(np.exp(0.35 * x1 + 0.3 * x2 + 0.4 * (color == "red") - 0.3))
    return pd.DataFrame({"x1": x1.astype("float64"), "x2": x2.astype("float64"), "color": color,
                         "day": pd.Timestamp(day) + pd.to_timedelta(np.sort(rng.integers(0, 86_400, rows)), unit="s"),
                         "label": label.astype("float64"), "batch": day, ROW_KEY: np.arange(start, start + rows)})


def settings_for(root: Path) -> Any:
    return load_settings(write_params(root, **{
        "schema": {"task": "regression", "id_column": None, "time_column": "day", "target": "label",
                   "numeric": {"x1": {"min": 0, "max": 20}, "x2": {"min": 0, "max": 10}},
                   "categorical": {"color": ["red", "green", "blue"]}},
        "promote.metric": "rmse", "evaluate.slices": [], "train.learners": ["lightgbm"],
        "train.lightgbm.min_child_samples": 5, "compress.quantize": False, "report.min_labeled_rows": 30,
        # three columns: at 0.3 one column's chance flag (p <= 0.05, about one batch in seven) would be data drift
        "report.drift_share_threshold": 0.5}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Paths, pd.DataFrame]:
    root = tmp_path_factory.mktemp("duplicates")
    settings, paths = settings_for(root / "params"), Paths(root)
    table = pd.concat([counts_table(900, seed=i, day=day, start=900 * i) for i, day in enumerate(DAYS[:3])],
                      ignore_index=True)
    paths.validated.mkdir(parents=True)
    table.to_parquet(paths.validated_rows)
    for stage in (prepare, train, evaluate, compress):
        stage.run(settings, paths)
    return settings, paths, table


def test_no_test_row_copies_a_training_row_and_none_is_dropped(trained):
    _, paths, table = trained
    assert table.duplicated(COLUMNS).mean() > 0.5  # most rows are copies
    splits = {name: pd.read_parquet(paths.split_rows(name)) for name in ("train", "valid", "test")}
    assert sum(len(rows) for rows in splits.values()) == len(table)
    seen = set(map(tuple, splits["train"][COLUMNS].to_numpy()))
    for name in ("valid", "test"):
        assert not any(tuple(row) in seen for row in splits[name][COLUMNS].to_numpy()), name
    assert json.loads(paths.prepare_report.read_text())["test_duplicates_of_train"] == 0
    # the grouped test rows are the rare ones (the copies of common rows went to train), so monitoring's
    # references are rows as drawn: the newest rows hold copies of training rows, as the batches to come will
    recent = pd.read_parquet(paths.recent_rows)
    assert len(recent) == len(splits["test"]) and any(tuple(row) in seen for row in recent[COLUMNS].to_numpy())


@pytest.mark.parametrize(("shift", "retrain"), [(0, False), (2, True)])
def test_an_iid_batch_is_no_retrain_and_a_shifted_one_is(trained, shift, retrain):
    settings, paths, table = trained
    later = counts_table(900, seed=7, day=DAYS[3], start=len(table), shift=shift)
    pd.concat([table, later], ignore_index=True).to_parquet(paths.validated_rows)
    try:
        result = report.run(settings, paths)
    finally:
        table.to_parquet(paths.validated_rows)
    assert result["retrain_needed"] is retrain, result["reasons"]
    below = result["prediction_drift"] < settings.report.prediction_drift_threshold
    assert below is not retrain, (result["prediction_drift"], result["reasons"])
    assert any(reason.startswith("prediction drift") for reason in result["reasons"]) is retrain
