"""The one fitted feature transform that training, evaluation and serving share.

It is fitted on training rows only, saved as JSON next to the model, and applied to raw rows
everywhere else, so there is no training/serving skew. Cleaning steps (category normalization,
missing-value imputation, outlier clipping) live here and nowhere else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import SchemaConfig
from pipelines.io import write_text

UNKNOWN = 0  # code of a category never seen in training; known categories are 1..n


def normalize_category(values: pd.Series) -> pd.Series:
    """'  Rent ' -> 'rent': trim, lower-case, inner spaces to underscores. Nulls stay null."""
    out = values.astype("string").str.strip().str.lower().str.replace(r"\s+", "_", regex=True)
    return out.astype(object).where(out.notna(), None)


@dataclass
class FeatureTransform:
    numeric: list[str]
    categorical: list[str]
    medians: dict[str, float]
    clip_low: dict[str, float]
    clip_high: dict[str, float]
    means: dict[str, float]
    stds: dict[str, float]
    vocab: dict[str, list[str]]

    @classmethod
    def fit(cls, df: pd.DataFrame, schema: SchemaConfig, clip_quantiles: tuple[float, float]) -> FeatureTransform:
        """Learn imputation values, clip bounds, scaling and category codes from training rows."""
        numeric, categorical = list(schema.numeric), list(schema.categorical)
        lo, hi = clip_quantiles
        x = df[numeric].astype("float64")
        low, high = x.quantile(lo), x.quantile(hi)
        clipped = x.clip(low, high, axis=1)
        medians = clipped.median().fillna(0.0)
        filled = clipped.fillna(medians)
        stds = filled.std(ddof=0).replace(0.0, 1.0).fillna(1.0)
        vocab = {
            col: sorted(normalize_category(df[col]).dropna().unique().tolist()) for col in categorical
        }
        return cls(
            numeric=numeric,
            categorical=categorical,
            medians=_floats(medians),
            clip_low=_floats(low.fillna(-np.inf)),
            clip_high=_floats(high.fillna(np.inf)),
            means=_floats(filled.mean().fillna(0.0)),
            stds=_floats(stds),
            vocab=vocab,
        )

    @property
    def feature_names(self) -> list[str]:
        return [*self.numeric, *(f"{c}_missing" for c in self.numeric), *self.categorical]

    @property
    def cardinalities(self) -> dict[str, int]:
        """Number of codes per categorical column, the unknown code included."""
        return {col: len(cats) + 1 for col, cats in self.vocab.items()}

    def transform(self, df: pd.DataFrame) -> pd.DataFrame:
        """Raw rows -> model features: clipped, imputed, standardized numerics + integer category codes."""
        missing = [c for c in (*self.numeric, *self.categorical) if c not in df.columns]
        if missing:
            raise KeyError(f"input is missing feature column(s) {missing}")
        x = df[self.numeric].apply(pd.to_numeric, errors="coerce").astype("float64")
        flags = x.isna().astype("float64").add_suffix("_missing")
        x = x.clip(pd.Series(self.clip_low), pd.Series(self.clip_high), axis=1).fillna(pd.Series(self.medians))
        x = (x - pd.Series(self.means)) / pd.Series(self.stds)
        codes = {}
        for col in self.categorical:
            lookup = {cat: i + 1 for i, cat in enumerate(self.vocab[col])}
            codes[col] = normalize_category(df[col]).map(lookup).fillna(UNKNOWN).astype("int64")
        out = pd.concat([x, flags, pd.DataFrame(codes, index=df.index)], axis=1)
        return out[self.feature_names].reset_index(drop=True)

    def save(self, path: Path) -> None:
        write_text(path, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> FeatureTransform:
        return cls(**json.loads(path.read_text()))


def _floats(series: pd.Series) -> dict[str, float]:
    return {str(k): float(v) for k, v in series.items()}
