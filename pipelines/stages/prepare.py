"""prepare: train/valid/test split (by time, or random), the fitted feature transform, encoded labels.

At scale: `prepare.fit_rows` fits the transform's statistics (clip quantiles, imputation values, scaling) on a
seeded sample of the training rows, with the first row of every category and class added so that no category
or class is left out of it; the splits are transformed and written `scale.score_chunk_rows` rows at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pandas.api import types

from pipelines.config import Paths, SchemaConfig, Settings
from pipelines.contracts import Out, stage
from pipelines.io import atomic_dir, atomic_path, write_json, write_parquet
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
    """Which of `rows` equal a row of `seen` on `columns` (features and label): nulls compare equal, numbers
    compare as numbers (1 and 1.0 alike). Both hold validated rows, so each column has one type in both."""
    return np.isin(_digest(rows, columns), _digest(seen, columns))


def _digest(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """A 64-bit hash of each row's `columns` (pandas' vectorized hashing: about 1 s per million rows)."""
    as_hashed = {c: frame[c].astype("float64") if types.is_numeric_dtype(frame[c]) else frame[c] for c in columns}
    return pd.util.hash_pandas_object(pd.DataFrame(as_hashed, index=frame.index), index=False).to_numpy()


def fit_sample(train: pd.DataFrame, schema: SchemaConfig, rows: int | None, seed: int) -> pd.DataFrame:
    """The training rows the transform is fitted on: all of them (`rows` None, or no more than `rows`), else
    a seeded sample of `rows` with the first row of every categorical value and class added."""
    if rows is None or len(train) <= rows:
        return train
    keep = np.random.default_rng([seed, 3]).choice(len(train), rows, replace=False)
    firsts = [*schema.categorical, *([schema.target] if schema.is_classification else [])]
    every = [np.flatnonzero(~train[c].duplicated().to_numpy()) for c in firsts]
    chosen = np.unique(np.concatenate([keep, *every]))
    log.info("transform fitted on %d of %d training rows (prepare.fit_rows)", len(chosen), len(train))
    return train.iloc[chosen]


def chunks(rows: pd.DataFrame, size: int) -> Iterator[pd.DataFrame]:
    """`rows` as consecutive slices of at most `size` rows (one empty slice for no rows: the file keeps its columns)."""
    for start in range(0, max(len(rows), 1), size):
        yield rows.iloc[start:start + size]


def write_parquet_chunks(path: Path, frames: Iterator[pd.DataFrame], whole: pd.DataFrame | None = None) -> None:
    """One Parquet file (atomically) from frames of the same columns, one row group each: memory holds one.
    The column types are those of `whole` (the frame the chunks are of: a text column missing in one chunk is
    still text), else of the first frame."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = None if whole is None else pa.Schema.from_pandas(whole, preserve_index=False)
    with atomic_path(path) as tmp:
        writer: pq.ParquetWriter | None = None
        try:
            for frame in frames:
                table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table.cast(writer.schema))
        finally:
            if writer is not None:
                writer.close()


@stage(
    params=("seed", "schema", "prepare", "clean", "report.reference_rows", "scale.score_chunk_rows"),
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
    del data  # the splits hold every row: memory for one copy of the table, not two
    summary: dict[str, Any] = {"split": cfg.split}
    compared = [*schema.feature_columns, schema.target]
    for name in ("valid", "test"):  # a row that is also a training row inflates held-out metrics
        dupes = duplicates_of(splits[name], splits["train"], compared)
        summary[f"{name}_duplicates_of_train"] = int(dupes.sum())
        if cfg.drop_duplicate_rows and dupes.any():
            splits[name] = splits[name][~dupes].reset_index(drop=True)
    transform = FeatureTransform.fit(fit_sample(splits["train"], schema, cfg.fit_rows, settings.seed), schema,
                                     settings.clean)
    size = settings.scale.score_chunk_rows

    def features_of(rows: pd.DataFrame) -> Iterator[pd.DataFrame]:
        for part in chunks(rows, size):
            features = transform.transform(part)
            features[schema.target] = transform.encode_target(part[schema.target])
            yield features

    # each folder is written whole beside the old one and swapped in: a killed run leaves old or new, not a mix
    with atomic_dir(paths.features) as features_dir, atomic_dir(paths.reference) as reference_dir:
        transform.save(features_dir / paths.fitted_transform.name)
        for name, rows in splits.items():
            write_parquet_chunks(reference_dir / paths.split_rows(name).name, chunks(rows, size), rows)
            write_parquet_chunks(features_dir / paths.split_features(name).name, features_of(rows))
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
