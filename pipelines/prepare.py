"""prepare: train/valid/test split (by time, or random), the fitted feature transform, encoded labels."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import Paths, SchemaConfig, Settings
from pipelines.io import write_json, write_parquet
from pipelines.registry import SAMPLE_FILE
from pipelines.transform import FeatureTransform, label_key

log = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")


class SplitError(ValueError):
    """The rows cannot be split so that every class is in train, valid and test."""


def _cut(n: int, valid_share: float, test_share: float, keep_every_split: bool) -> tuple[int, int]:
    """(train rows, valid rows) of n ordered rows; with `keep_every_split`, valid and test get one row at least."""
    n_test, n_valid = int(n * test_share), int(n * valid_share)
    if keep_every_split:
        n_test, n_valid = max(n_test, 1), max(n_valid, 1)
    return n - n_valid - n_test, n_valid


def split_rows(df: pd.DataFrame, schema: SchemaConfig, how: str, valid_share: float, test_share: float,
               seed: int) -> dict[str, pd.DataFrame]:
    """Train, valid and test rows.

    `time`: oldest rows train, newer validate, newest test (no look-ahead); `random`: a seeded shuffle.
    For classification both are stratified: each class is split on its own (in time order or shuffled),
    so every class is in every split; a class with fewer than 3 rows stops with the class counts.
    """
    order = [c for c in (schema.time_column, schema.key_column) if c and c in df.columns]
    rows = df.sort_values(order, kind="mergesort").reset_index(drop=True)
    if how == "random":
        rows = rows.iloc[np.random.default_rng(seed).permutation(len(rows))].reset_index(drop=True)
    if schema.is_classification:
        keys = rows[schema.target].map(label_key)
        counts = keys.value_counts()
        rare = counts[counts < 3]
        if not rare.empty:
            raise SplitError(
                f"class(es) {', '.join(f'{k!r} ({n} rows)' for k, n in rare.items())} of {schema.target!r} have "
                f"fewer than 3 rows, too few for train, valid and test (class counts: "
                f"{', '.join(f'{k}: {n}' for k, n in counts.items())}); collect more rows of them, or merge or "
                f"drop the class in the source")
        groups = [rows.index[(keys == k).to_numpy()] for k in counts.index]
    else:
        groups = [rows.index]
    parts: dict[str, list[pd.Index]] = {name: [] for name in SPLITS}
    for index in groups:
        n_train, n_valid = _cut(len(index), valid_share, test_share, schema.is_classification)
        parts["train"].append(index[:n_train])
        parts["valid"].append(index[n_train : n_train + n_valid])
        parts["test"].append(index[n_train + n_valid :])
    # each split back in the order of `rows` (time order, or the seeded shuffle)
    return {name: rows.loc[np.sort(np.concatenate(idx))].reset_index(drop=True) for name, idx in parts.items()}


def duplicates_of(rows: pd.DataFrame, seen: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Which of `rows` equal a row of `seen` on `columns` (features and label): nulls compare equal."""
    def fingerprint(frame: pd.DataFrame) -> pd.Series:
        return pd.util.hash_pandas_object(frame[columns].astype(str), index=False)

    return fingerprint(rows).isin(set(fingerprint(seen))).to_numpy()


def run(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Write raw splits to data/reference/, features to data/features/, and the fitted transform."""
    schema, cfg = settings.data_schema, settings.prepare
    data = pd.read_parquet(paths.validated / "data.parquet")
    splits = split_rows(data, schema, cfg.split, cfg.valid_share, cfg.test_share, settings.seed)
    summary: dict[str, Any] = {"split": cfg.split}
    compared = [*schema.feature_columns, schema.target]
    for name in ("valid", "test"):  # a row that is also a training row inflates held-out metrics
        dupes = duplicates_of(splits[name], splits["train"], compared)
        summary[f"{name}_duplicates_of_train"] = int(dupes.sum())
        if cfg.drop_duplicate_rows and dupes.any():
            splits[name] = splits[name][~dupes].reset_index(drop=True)
    transform = FeatureTransform.fit(splits["train"], schema, settings.clean)
    transform.save(paths.features / "transform.json")
    for name, rows in splits.items():
        write_parquet(paths.reference / f"{name}.parquet", rows)
        features = transform.transform(rows)
        features[schema.target] = transform.encode_target(rows[schema.target])
        write_parquet(paths.features / f"{name}.parquet", features)
        summary[f"{name}_rows"] = len(rows)
        if schema.is_classification:
            counts = rows[schema.target].map(label_key).value_counts()
            summary[f"{name}_class_counts"] = {str(k): int(v) for k, v in sorted(counts.items())}
        else:
            summary[f"{name}_target_mean"] = round(float(rows[schema.target].mean()), 6)
    sample = splits["train"].sample(n=min(settings.report.reference_rows, len(splits["train"])),
                                    random_state=settings.seed).sort_index()
    write_parquet(paths.reference / SAMPLE_FILE, sample)  # kept with the model: monitoring's drift reference
    write_json(paths.reports / "prepare.json", summary)
    log.info("prepared splits %s", summary)
    return summary
