"""Seeded samples of large tables: the rows the learners fit on when `train.max_rows` caps them (train, and
compress's student, fit on the same ones)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def sample_index(y: np.ndarray, max_rows: int | None, seed: int, stratify: bool) -> np.ndarray | None:
    """Sorted positions of a seeded sample of about `max_rows` of the labels `y` (None: keep every row, as with
    `max_rows` None or no more rows than it). Stratified: each class in proportion, and at least one row of each."""
    n = len(y)
    if max_rows is None or n <= max_rows:
        return None
    rng = np.random.default_rng([seed, 5])
    if not stratify:
        return np.sort(rng.choice(n, max_rows, replace=False))
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    quotas = np.minimum(counts, np.maximum(1, np.round(counts * max_rows / n).astype(int)))
    picked = [rng.choice(np.flatnonzero(inverse == k), quotas[k], replace=False) for k in range(len(classes))]
    return np.sort(np.concatenate(picked))


def training_rows(file: Path, target: str, max_rows: int | None, seed: int, stratify: bool
                  ) -> tuple[pd.DataFrame, int]:
    """The training features the learners fit on (see sample_index), and how many rows the file holds. The
    sample is read one row group at a time, so memory holds the sample and one group, not the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    y = pd.read_parquet(file, columns=[target])[target].to_numpy()
    index = sample_index(y, max_rows, seed, stratify)
    if index is None:
        return pd.read_parquet(file), len(y)
    parquet, parts, start = pq.ParquetFile(file), [], 0
    for group in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        mine = index[(index >= start) & (index < start + size)] - start
        if len(mine):
            parts.append(parquet.read_row_group(group).take(pa.array(mine)))
        start += size
    log.info("learners fit on a sample of %d of %d training rows (train.max_rows)", len(index), len(y))
    return pa.concat_tables(parts).to_pandas(), len(y)
