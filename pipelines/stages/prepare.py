"""prepare: train/valid/test split (by time, or random), the fitted feature transform, encoded labels.

The validated table is held once, as Arrow; the split sorts only its key columns (time, key, target) and each
split is a list of row positions, whose rows are taken, compared, transformed and written in chunks.

At scale: `prepare.fit_rows` fits the transform's statistics (clip quantiles, imputation values, scaling) on a
seeded sample of the training rows, with the first row of every category and class added so that no category
or class is left out of it; the splits are transformed and written `scale.score_chunk_rows` rows at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pandas.api import types

from pipelines.config import Paths, SchemaConfig, Settings
from pipelines.contracts import Out, stage
from pipelines.io import atomic_dir, write_json, write_parquet, write_parquet_chunks
from pipelines.transform import FeatureTransform, label_key

if TYPE_CHECKING:
    import pyarrow as pa

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


def split_positions(keys: pd.DataFrame, schema: SchemaConfig, how: str, valid_share: float, test_share: float,
                    seed: int, groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The positions in `keys` of the train, valid and test rows, each in its split's order.

    `keys`: the table, or as much of it as the split reads (the time and key columns, the target).
    `time`: oldest rows train, newer validate, newest test (no look-ahead); a class that this leaves out
    of a split gets its rows nearest the boundary moved into it, in time order. `random`: a seeded shuffle,
    stratified (each class split on its own). Either way every class is in every split; a class with fewer
    than 3 rows stops with the class counts.

    `groups`: one id per row of `keys` (`row_digests`: equal for rows identical in features and label). Rows of
    one group go to one split, the split where the group's rows fall in the order above (by their middle row),
    so no held-out row copies a training row and none is dropped. A class with fewer than 3 distinct rows is
    split row by row (its copies are counted by `run` as duplicates of train).
    """
    order = [c for c in (schema.time_column, schema.key_column) if c and c in keys.columns]
    positions = keys.reset_index(drop=True).sort_values(order, kind="mergesort").index.to_numpy()
    if how == "random":
        positions = positions[np.random.default_rng(seed).permutation(len(positions))]
    # a unit is a group of identical rows, ordered by its first row; without groups every row is a unit
    _, unit = np.unique(np.arange(len(positions)) if groups is None else groups[positions], return_inverse=True)
    first = np.full(unit.max(initial=-1) + 1, len(positions))
    np.minimum.at(first, unit, np.arange(len(positions)))
    unit = np.argsort(np.argsort(first, kind="stable"), kind="stable")[unit]  # units numbered in order
    part = _cut(unit, _counts(len(positions), valid_share, test_share))
    if schema.is_classification:
        labels = keys[schema.target].iloc[positions].map(label_key)
        counts = labels.value_counts()
        rare = counts[counts < 3]
        if not rare.empty:
            raise SplitError(
                f"class(es) {', '.join(f'{k!r} ({n} rows)' for k, n in rare.items())} of {schema.target!r} have "
                f"fewer than 3 rows, too few for train, valid and test (class counts: "
                f"{', '.join(f'{k}: {n}' for k, n in counts.items())}); collect more rows of them, or merge or "
                f"drop the class in the source" + _regression_hint(counts.index, schema))
        for label in counts.index:
            mine = np.flatnonzero((labels == label).to_numpy())  # in time order (or the seeded shuffle)
            units = np.unique(unit[mine], return_inverse=True)[1]
            if units.max() < 2:  # fewer than 3 distinct rows: only splitting copies puts the class in every split
                units = np.arange(len(mine))
            if how == "random":
                part[mine] = _cut(units, _counts(len(mine), valid_share, test_share))
            first_rows = np.unique(units, return_index=True)[1]
            have = np.bincount(part[mine][first_rows], minlength=3).tolist()
            per_unit = np.repeat([0, 1, 2], _every_split(have))  # units keep their order across the splits
            part[mine] = per_unit[units]
    found = {name: positions[part == i] for i, name in enumerate(SPLITS)}
    if empty := [name for name, rows in found.items() if len(rows) == 0]:  # train would fail later, unclearly
        raise SplitError(f"the {' and '.join(empty)} split would be empty: {len(positions)} rows, "
                         f"{int(unit.max(initial=-1)) + 1} of them distinct (identical rows stay in one split), are "
                         f"too few at prepare.valid_share {valid_share} and prepare.test_share {test_share}; collect "
                         f"more rows (or raise the shares)")
    return found


def _regression_hint(labels: pd.Index, schema: SchemaConfig) -> str:
    """Labels that are all numbers, many of them: the target is likely a quantity (the task was inferred)."""
    numbers = pd.to_numeric(pd.Series(labels, dtype=object), errors="coerce")
    if numbers.notna().all() and len(labels) > 5:
        return (f"; {len(labels)} numeric labels look like a quantity to predict: set schema.task: regression "
                f"(or rerun `amaas init --task regression`)")
    return ""


def _cut(unit: np.ndarray, counts: list[int]) -> np.ndarray:
    """The split (0, 1, 2) of each row, whose unit number is `unit` (units in order, 0..u-1): a unit goes where
    the cut of the rows into `counts` puts its middle row, so groups of copies move whole."""
    sizes = np.bincount(unit)
    middle = np.cumsum(sizes) - sizes / 2
    per_unit = np.searchsorted(np.cumsum(counts)[:2], middle, side="right")
    cut: np.ndarray = per_unit[unit].astype("int64")
    return cut


def split_rows(df: pd.DataFrame, schema: SchemaConfig, how: str, valid_share: float, test_share: float,
               seed: int) -> dict[str, pd.DataFrame]:
    """Train, valid and test rows of `df` (see split_positions), identical rows (features and label) together."""
    groups = row_digests(df, [*schema.feature_columns, schema.target])
    return {name: df.iloc[rows].reset_index(drop=True)
            for name, rows in split_positions(df, schema, how, valid_share, test_share, seed, groups).items()}


def duplicates_of(rows: pd.DataFrame, seen: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Which of `rows` equal a row of `seen` on `columns` (features and label): nulls compare equal, numbers
    compare as numbers (1 and 1.0 alike). Both hold validated rows, so each column has one type in both."""
    return np.isin(row_digests(rows, columns), row_digests(seen, columns))


def row_digests(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """A 64-bit hash of each row's `columns` (pandas' vectorized hashing: about 1 s per million rows)."""
    as_hashed = {c: frame[c].astype("float64") if types.is_numeric_dtype(frame[c]) else frame[c] for c in columns}
    return pd.util.hash_pandas_object(pd.DataFrame(as_hashed, index=frame.index), index=False).to_numpy()


def fit_positions(train: pd.DataFrame, schema: SchemaConfig, rows: int | None, seed: int) -> np.ndarray | None:
    """Sorted positions in `train` of the rows the transform is fitted on: None for all of them (`rows` None, or no
    more than `rows`), else a seeded sample of `rows` with the first row of every categorical value and class
    added. `train` needs only the categorical columns and the target."""
    if rows is None or len(train) <= rows:
        return None
    keep = np.random.default_rng([seed, 3]).choice(len(train), rows, replace=False)
    firsts = [*schema.categorical, *([schema.target] if schema.is_classification else [])]
    every = [np.flatnonzero(~train[c].duplicated().to_numpy()) for c in firsts]
    chosen = np.unique(np.concatenate([keep, *every]))
    log.info("transform fitted on %d of %d training rows (prepare.fit_rows)", len(chosen), len(train))
    return chosen


def chunks(positions: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """`positions` as consecutive slices of at most `size` (one empty slice for none: the file keeps its columns)."""
    for start in range(0, max(len(positions), 1), size):
        yield positions[start:start + size]


def rows_at(table: pa.Table, positions: np.ndarray) -> pd.DataFrame:
    """The rows of `table` at `positions`, in that order, as pandas."""
    import pyarrow as pa

    rows: pd.DataFrame = table.take(pa.array(positions, type=pa.int64())).to_pandas()
    return rows


@stage(
    params=("seed", "schema", "prepare", "clean", "report.reference_rows", "scale.score_chunk_rows"),
    deps=("validated",),
    outs=(Out("features"), Out("reference")),
    metrics=("prepare_report",),
    description="Split train/valid/test, fit the feature transform, keep the drift reference rows",
    atomic_outs=True,  # each written to a temp file or folder and renamed: DVC need not delete them first
)
def run(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Write raw splits to data/reference/, features to data/features/, and the fitted transform.

    The validated table is held once, as Arrow (compact: text is not one Python object per value); the split
    reads its key columns, and rows leave it `scale.score_chunk_rows` at a time to be compared, transformed
    and written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema, cfg, size = settings.data_schema, settings.prepare, settings.scale.score_chunk_rows
    table = pq.read_table(paths.validated_rows)
    keys = [c for c in (schema.time_column, schema.key_column, schema.target) if c and c in table.column_names]
    target = table.select([schema.target]).to_pandas()[schema.target]
    compared = table.select([*schema.feature_columns, schema.target])
    digests = np.concatenate([row_digests(compared.slice(start, size).to_pandas(), compared.column_names)
                              for start in range(0, len(table), size)] or [np.array([], dtype=np.uint64)])
    # identical rows (features and label) go to one split: a held-out copy of a training row would inflate the
    # held-out metrics, and dropping it would bias the test rows (and the prediction-drift reference made of them)
    splits = split_positions(table.select(list(dict.fromkeys(keys))).to_pandas(), schema, cfg.split,
                             cfg.valid_share, cfg.test_share, settings.seed, digests)
    summary: dict[str, Any] = {"split": cfg.split,
                               "duplicate_rows": int(len(digests) - len(np.unique(digests)))}
    for name in ("valid", "test"):  # 0 but for a class with fewer than 3 distinct rows (split row by row)
        summary[f"{name}_duplicates_of_train"] = int(np.isin(digests[splits[name]], digests[splits["train"]]).sum())
    del digests
    # monitoring's references are rows as they were drawn: with many copies, the grouped splits are not (the
    # copies of common rows gather in train, the test rows are the rare ones), and an iid batch would look drifted
    drawn = split_positions(table.select(list(dict.fromkeys(keys))).to_pandas(), schema, cfg.split,
                            cfg.valid_share, cfg.test_share, settings.seed)
    train = splits["train"]
    firsts = [*schema.categorical, *([schema.target] if schema.is_classification else [])]
    # categories as pandas categories: the first row of each value is found on codes, not one object per value
    chosen = fit_positions(table.select(firsts).take(pa.array(train, type=pa.int64())).to_pandas(
        strings_to_categorical=True), schema, cfg.fit_rows, settings.seed)
    transform = FeatureTransform.fit(rows_at(table, train if chosen is None else train[chosen]), schema,
                                     settings.clean)

    def features_of(positions: np.ndarray) -> Iterator[pd.DataFrame]:
        for part in chunks(positions, size):
            rows = rows_at(table, part)
            features = transform.transform(rows)
            features[schema.target] = transform.encode_target(rows[schema.target])
            yield features

    # each folder is written whole beside the old one and swapped in: a killed run leaves old or new, not a mix
    with atomic_dir(paths.features) as features_dir, atomic_dir(paths.reference) as reference_dir:
        transform.save(features_dir / paths.fitted_transform.name)
        for name, positions in splits.items():
            write_parquet_chunks(reference_dir / paths.split_rows(name).name,
                                 (table.take(pa.array(part, type=pa.int64())) for part in chunks(positions, size)),
                                 table.schema)
            write_parquet_chunks(features_dir / paths.split_features(name).name, features_of(positions))
            summary[f"{name}_rows"] = len(positions)
            if schema.is_classification:
                counts = target.iloc[positions].map(label_key).value_counts()
                summary[f"{name}_class_counts"] = {str(k): int(v) for k, v in sorted(counts.items())}
            else:
                summary[f"{name}_target_mean"] = round(float(target.iloc[positions].mean()), 6)
        # kept with the model: the drift reference, a seeded sample of the training period's rows in their order,
        # and the newest rows (the prediction drift reference: compress scores them), each as the table has them
        period = drawn["train"]
        picked = pd.RangeIndex(len(period)).to_series().sample(n=min(settings.report.reference_rows, len(period)),
                                                              random_state=settings.seed)
        write_parquet(reference_dir / paths.train_sample.name, rows_at(table, period[np.sort(picked.to_numpy())]))
        write_parquet_chunks(reference_dir / paths.recent_rows.name,
                             (table.take(pa.array(part, type=pa.int64())) for part in chunks(drawn["test"], size)),
                             table.schema)
    write_json(paths.prepare_report, summary)
    log.info("prepared splits %s", summary)
    return summary
