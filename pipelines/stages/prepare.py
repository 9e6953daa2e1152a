"""prepare: train/valid/test split (by time, or random), the fitted feature transform, encoded labels."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import Paths, SchemaConfig, Settings
from pipelines.contracts import Out, stage
from pipelines.io import atomic_dir, write_json, write_parquet
from pipelines.sources import row_hash
from pipelines.transform import FeatureTransform, label_key

log = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")


class SplitError(ValueError):
    """The rows cannot be split so that every class is in train, valid and test."""


def _counts(n: int, valid_share: float, test_share: float) -> list[int]:
    """[train, valid, test] row counts of n ordered rows."""
    n_test, n_valid = int(n * test_share), int(n * valid_share)
    return [n - n_valid - n_test, n_valid, n_test]


def _every_split(counts: list[int]) -> list[int]:
    """[train, valid, test] counts of one class's rows, moved as little as possible so that each split holds
    one row at least (the class has 3 rows or more); rows keep their order across the splits."""
    counts = list(counts)
    for empty in (2, 1, 0):  # test first: it says how the model does on the newest rows of every class
        if counts[empty] == 0:
            donor = max(range(3), key=lambda s: (counts[s], -abs(s - empty)))
            counts[donor] -= 1
            counts[empty] += 1
    return counts


def split_rows(df: pd.DataFrame, schema: SchemaConfig, how: str, valid_share: float, test_share: float,
               seed: int) -> dict[str, pd.DataFrame]:
    """Train, valid and test rows.

    `time`: oldest rows train, newer validate, newest test (no look-ahead); a class that this leaves out
    of a split gets its rows nearest the boundary moved into it, in time order. `random`: a seeded shuffle,
    stratified (each class split on its own). Either way every class is in every split; a class with fewer
    than 3 rows stops with the class counts.
    """
    order = [c for c in (schema.time_column, schema.key_column) if c and c in df.columns]
    rows = df.sort_values(order, kind="mergesort").reset_index(drop=True)
    part = np.repeat([0, 1, 2], _counts(len(rows), valid_share, test_share))
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
        for label in counts.index:
            mine = np.flatnonzero((keys == label).to_numpy())  # in time order (or the seeded shuffle)
            have = np.bincount(part[mine], minlength=3).tolist()
            want = _counts(len(mine), valid_share, test_share) if how == "random" else have
            part[mine] = np.repeat([0, 1, 2], _every_split(want))
    return {name: rows[part == i].reset_index(drop=True) for i, name in enumerate(SPLITS)}


def duplicates_of(rows: pd.DataFrame, seen: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Which of `rows` equal a row of `seen` on `columns` (features and label): nulls compare equal."""
    return np.isin(row_hash(rows[columns]), row_hash(seen[columns]))


@stage(
    params=("seed", "schema", "prepare", "clean", "report.reference_rows"),
    deps=("validated",),
    outs=(Out("features"), Out("reference")),
    metrics=("prepare_report",),
    description="Split train/valid/test, fit the feature transform, keep the drift reference sample",
    atomic_outs=True,  # each written to a temp file or folder and renamed: DVC need not delete them first
)
def run(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Write raw splits to data/reference/, features to data/features/, and the fitted transform."""
    schema, cfg = settings.data_schema, settings.prepare
    data = pd.read_parquet(paths.validated_rows)
    splits = split_rows(data, schema, cfg.split, cfg.valid_share, cfg.test_share, settings.seed)
    summary: dict[str, Any] = {"split": cfg.split}
    compared = [*schema.feature_columns, schema.target]
    for name in ("valid", "test"):  # a row that is also a training row inflates held-out metrics
        dupes = duplicates_of(splits[name], splits["train"], compared)
        summary[f"{name}_duplicates_of_train"] = int(dupes.sum())
        if cfg.drop_duplicate_rows and dupes.any():
            splits[name] = splits[name][~dupes].reset_index(drop=True)
    transform = FeatureTransform.fit(splits["train"], schema, settings.clean)
    # each folder is written whole beside the old one and swapped in: a killed run leaves old or new, not a mix
    with atomic_dir(paths.features) as features_dir, atomic_dir(paths.reference) as reference_dir:
        transform.save(features_dir / paths.fitted_transform.name)
        for name, rows in splits.items():
            write_parquet(reference_dir / paths.split_rows(name).name, rows)
            features = transform.transform(rows)
            features[schema.target] = transform.encode_target(rows[schema.target])
            write_parquet(features_dir / paths.split_features(name).name, features)
            summary[f"{name}_rows"] = len(rows)
            if schema.is_classification:
                counts = rows[schema.target].map(label_key).value_counts()
                summary[f"{name}_class_counts"] = {str(k): int(v) for k, v in sorted(counts.items())}
            else:
                summary[f"{name}_target_mean"] = round(float(rows[schema.target].mean()), 6)
        sample = splits["train"].sample(n=min(settings.report.reference_rows, len(splits["train"])),
                                        random_state=settings.seed).sort_index()
        write_parquet(reference_dir / paths.train_sample.name, sample)  # kept with the model: the drift reference
    write_json(paths.prepare_report, summary)
    log.info("prepared splits %s", summary)
    return summary
