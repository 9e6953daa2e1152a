"""prepare: time-ordered train/valid/test split and the fitted feature transform."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from pipelines.config import Paths, Settings
from pipelines.io import write_json, write_parquet
from pipelines.registry import SAMPLE_FILE
from pipelines.transform import FeatureTransform

log = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")


def split_by_time(df: pd.DataFrame, time_col: str, id_col: str, valid_share: float, test_share: float
                  ) -> dict[str, pd.DataFrame]:
    """Oldest rows train, newer rows validate, newest rows test: no look-ahead leakage."""
    ordered = df.sort_values([time_col, id_col], kind="mergesort").reset_index(drop=True)
    n = len(ordered)
    n_test, n_valid = int(n * test_share), int(n * valid_share)
    n_train = n - n_valid - n_test
    return {
        "train": ordered.iloc[:n_train],
        "valid": ordered.iloc[n_train : n_train + n_valid],
        "test": ordered.iloc[n_train + n_valid :],
    }


def run(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Write raw splits to data/reference/, features to data/features/, and the fitted transform."""
    schema, cfg = settings.data_schema, settings.prepare
    data = pd.read_parquet(paths.validated / "data.parquet")
    splits = split_by_time(data, schema.time_column, schema.id_column, cfg.valid_share, cfg.test_share)
    transform = FeatureTransform.fit(splits["train"], schema, settings.clean)
    transform.save(paths.features / "transform.json")
    summary: dict[str, Any] = {}
    for name, rows in splits.items():
        write_parquet(paths.reference / f"{name}.parquet", rows)
        features = transform.transform(rows)
        features[schema.target] = rows[schema.target].astype("int64").to_numpy()
        write_parquet(paths.features / f"{name}.parquet", features)
        summary[f"{name}_rows"] = len(rows)
        summary[f"{name}_positive_rate"] = round(float(rows[schema.target].mean()), 6)
    sample = splits["train"].sample(n=min(settings.report.reference_rows, len(splits["train"])),
                                    random_state=settings.seed).sort_index()
    write_parquet(paths.reference / SAMPLE_FILE, sample)  # kept with the model: monitoring's drift reference
    write_json(paths.reports / "prepare.json", summary)
    log.info("prepared splits %s", summary)
    return summary
