"""The one fitted feature transform that training, evaluation and serving share.

It is fitted on training rows only, saved as JSON next to the model, and applied to raw rows
everywhere else, so there is no training/serving skew. Cleaning steps (category normalization,
missing-value imputation, outlier clipping), as params.yaml `clean` configures them, live here and
nowhere else; the fitted values and the choices are both in the saved JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import CleanConfig, SchemaConfig
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
    normalize: bool  # normalize category spelling before encoding
    impute: str  # how fill_values were fitted: median | mean | zero
    missing_indicators: bool
    fill_values: dict[str, float]
    clip_low: dict[str, float]
    clip_high: dict[str, float]
    means: dict[str, float]
    stds: dict[str, float]
    vocab: dict[str, list[str]]

    @classmethod
    def fit(cls, df: pd.DataFrame, schema: SchemaConfig, clean: CleanConfig) -> FeatureTransform:
        """Learn imputation values, clip bounds, scaling and category codes from training rows."""
        numeric, categorical = list(schema.numeric), list(schema.categorical)
        x = df[numeric].astype("float64")
        if clean.clip_quantiles is None:
            low, high = pd.Series(-np.inf, index=numeric), pd.Series(np.inf, index=numeric)
        else:
            low, high = x.quantile(clean.clip_quantiles[0]), x.quantile(clean.clip_quantiles[1])
        clipped = x.clip(low, high, axis=1)
        fill = {"median": clipped.median(), "mean": clipped.mean(), "zero": pd.Series(0.0, index=numeric)}
        fill_values = fill[clean.impute].fillna(0.0)
        filled = clipped.fillna(fill_values)
        stds = filled.std(ddof=0).replace(0.0, 1.0).fillna(1.0)
        spell = normalize_category if clean.normalize_categories else _as_text
        vocab = {col: sorted(spell(df[col]).dropna().unique().tolist()) for col in categorical}
        return cls(
            numeric=numeric,
            categorical=categorical,
            normalize=clean.normalize_categories,
            impute=clean.impute,
            missing_indicators=clean.missing_indicators,
            fill_values=_floats(fill_values),
            clip_low=_floats(low.fillna(-np.inf)),
            clip_high=_floats(high.fillna(np.inf)),
            means=_floats(filled.mean().fillna(0.0)),
            stds=_floats(stds),
            vocab=vocab,
        )

    @property
    def feature_names(self) -> list[str]:
        flags = [f"{c}_missing" for c in self.numeric] if self.missing_indicators else []
        return [*self.numeric, *flags, *self.categorical]

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
        x = x.clip(pd.Series(self.clip_low), pd.Series(self.clip_high), axis=1).fillna(pd.Series(self.fill_values))
        x = (x - pd.Series(self.means)) / pd.Series(self.stds)
        codes = {}
        spell = normalize_category if self.normalize else _as_text
        for col in self.categorical:
            lookup = {cat: i + 1 for i, cat in enumerate(self.vocab[col])}
            codes[col] = spell(df[col]).map(lookup).fillna(UNKNOWN).astype("int64")
        out = pd.concat([x, flags, pd.DataFrame(codes, index=df.index)], axis=1)
        return out[self.feature_names].reset_index(drop=True)

    def save(self, path: Path) -> None:
        write_text(path, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> FeatureTransform:
        fields = json.loads(path.read_text())
        if "medians" in fields:  # saved before cleaning was configurable: median imputation, flags, normalized
            fields = {"normalize": True, "impute": "median", "missing_indicators": True,
                      "fill_values": fields.pop("medians"), **fields}
        return cls(**fields)


def _as_text(values: pd.Series) -> pd.Series:
    """Categories exactly as spelled (clean.normalize_categories: false). Nulls stay null."""
    out = values.astype("string")
    return out.astype(object).where(out.notna(), None)


def _floats(series: pd.Series) -> dict[str, float]:
    return {str(k): float(v) for k, v in series.items()}
