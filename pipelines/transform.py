"""The one fitted feature transform that training, evaluation and serving share.

It is fitted on training rows only, saved as JSON next to the model, and applied to raw rows
everywhere else, so there is no training/serving skew. Cleaning steps (category normalization,
missing-value imputation, outlier clipping), as params.yaml `clean` configures them, live here and
nowhere else; the fitted values and the choices are both in the saved JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import CleanConfig, SchemaConfig
from pipelines.io import write_text

UNKNOWN = 0  # code of a category never seen in training; known categories are 1..n; missing is n+1
_SPACES = re.compile(r"\s+")


def normalize_value(value: object) -> str:
    """'  Rent ' -> 'rent': trim, lower-case, inner spaces to underscores."""
    return _SPACES.sub("_", str(value).strip().lower())


def normalize_category(values: pd.Series) -> pd.Series:
    """normalize_value on every value of a column; nulls stay null. Each distinct value is spelled once."""
    return pd.Series(_per_distinct(values, normalize_value, None), index=values.index, dtype=object, name=values.name)


def _per_distinct(values: pd.Series, spell: Callable[[object], Any], missing: Any) -> np.ndarray:
    """`spell` applied to each distinct value (fast on large and on one-row inputs); `missing` for nulls."""
    # an object array, not the Series: pandas then skips an Index of the distinct values (half the cost on 100 rows)
    keys, distinct = pd.factorize(np.asarray(values, dtype=object), use_na_sentinel=True)
    spelled = np.array([spell(v) for v in distinct] + [missing], dtype=object)
    return spelled[keys]  # -1, the null key, picks the trailing `missing`


def _numbers(values: pd.Series) -> np.ndarray:
    """A numeric column as float64, missing as NaN; text that does not parse as a number is missing."""
    try:
        return values.to_numpy(dtype="float64", na_value=np.nan)
    except (TypeError, ValueError):
        return pd.to_numeric(values, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)


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
    nullable: list[str] = field(default_factory=list)  # categorical columns where missing is a code of its own
    task: str = "binary"
    classes: list[str | int] | None = None  # classification: labels in encoded order (0..k-1)
    reference: dict[str, list[float]] = field(default_factory=dict)  # numeric column: [low, high] training saw
    #   (schema.numeric's reference ranges; transforms saved before them have none)

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
            nullable=[c for c, rule in schema.categorical.items() if rule.nullable],
            task=schema.task,
            classes=fit_classes(df[schema.target], schema) if schema.is_classification else None,
            reference={c: list(rule.reference) for c, rule in schema.numeric.items() if rule.reference is not None},
        )

    @property
    def feature_names(self) -> list[str]:
        flags = [f"{c}_missing" for c in self.numeric] if self.missing_indicators else []
        return [*self.numeric, *flags, *self.categorical]

    @property
    def cardinalities(self) -> dict[str, int]:
        """Number of codes per categorical column, the unknown code included."""
        return {col: len(cats) + 1 + (col in self.nullable) for col, cats in self.vocab.items()}

    def transform(self, df: pd.DataFrame) -> pd.DataFrame:
        """Raw rows -> model features: clipped, imputed, standardized numerics + integer category codes."""
        absent = [c for c in (*self.numeric, *self.categorical) if c not in df.columns]
        if absent:
            raise KeyError(f"input is missing feature column(s) {absent}")
        x = np.empty((len(df), len(self.numeric)), dtype="float64")
        for i, col in enumerate(self.numeric):  # column by column: no copy of the frame (one row is served fast)
            x[:, i] = _numbers(df[col])
        missing = np.isnan(x)
        vector = lambda values: np.array([values[c] for c in self.numeric])  # noqa: E731
        x = np.where(missing, vector(self.fill_values), np.clip(x, vector(self.clip_low), vector(self.clip_high)))
        x = (x - vector(self.means)) / vector(self.stds)
        columns: dict[str, np.ndarray] = {c: x[:, i] for i, c in enumerate(self.numeric)}
        if self.missing_indicators:
            columns |= {f"{c}_missing": missing[:, i].astype("float64") for i, c in enumerate(self.numeric)}
        spell = normalize_value if self.normalize else str
        for col in self.categorical:
            lookup = {cat: i + 1 for i, cat in enumerate(self.vocab[col])}
            missing_code = len(lookup) + 1 if col in self.nullable else UNKNOWN

            def code(value: object, lk: dict[str, int] = lookup) -> int:
                return lk.get(spell(value), UNKNOWN)

            columns[col] = _per_distinct(df[col], code, missing_code).astype("int64")
        return pd.DataFrame(columns, copy=False)  # built in the order of feature_names

    def notices(self, df: pd.DataFrame) -> list[dict[str, list[str]]]:
        """Per row, what the model answers without having seen it: `unseen` (categorical columns whose value no
        training row had: scored as the unknown category) and `out_of_reference` (numeric columns outside their
        reference range: scored, and drift for monitoring). Empty dicts for ordinary rows."""
        spell = normalize_value if self.normalize else str
        flags: dict[str, list[tuple[str, np.ndarray]]] = {"unseen": [], "out_of_reference": []}
        for col in self.categorical:
            known = set(self.vocab[col])

            def unseen(value: object, k: set[str] = known) -> bool:
                return spell(value) not in k

            # each distinct value spelled once, as `transform` codes them (a 100-row request: 3 spellings, not 300)
            flags["unseen"].append((col, _per_distinct(df[col], unseen, False).astype(bool)))
        for col, (low, high) in self.reference.items():
            numbers = _numbers(df[col])
            flags["out_of_reference"].append((col, (numbers < low) | (numbers > high)))
        out: list[dict[str, list[str]]] = [{} for _ in range(len(df))]
        for kind, masks in flags.items():
            for col, mask in masks:
                for i in np.flatnonzero(mask):
                    out[i].setdefault(kind, []).append(col)
        return out

    def encode_target(self, values: pd.Series | np.ndarray) -> np.ndarray:
        """Labels as the model sees them: class indexes 0..k-1 (classification) or float values (regression)."""
        if self.classes is None:
            return pd.to_numeric(pd.Series(values), errors="raise").to_numpy(dtype="float64")
        index = {label_key(c): i for i, c in enumerate(self.classes)}
        keys = [label_key(v) for v in values]
        unknown = sorted({k for k in keys if k not in index})
        if unknown:
            raise ValueError(f"label(s) {unknown[:5]} are not among the model's classes "
                             f"{[str(c) for c in self.classes]}")
        return np.fromiter((index[k] for k in keys), dtype="int64", count=len(keys))

    def decode_labels(self, indexes: np.ndarray) -> list[str | int]:
        """Class indexes -> the labels as the data spells them."""
        assert self.classes is not None
        return [self.classes[int(i)] for i in indexes]

    def save(self, path: Path) -> None:
        write_text(path, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> FeatureTransform:
        fields = json.loads(path.read_text())
        if "medians" in fields:  # saved before cleaning was configurable: median imputation, flags, normalized
            fields = {"normalize": True, "impute": "median", "missing_indicators": True,
                      "fill_values": fields.pop("medians"), **fields}
        return cls(**fields)


def label_key(value: object) -> str:
    """One spelling per label whatever its type on the way in: 1, 1.0 and "1" are the same class."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    return str(value).strip()


def fit_classes(labels: pd.Series, schema: SchemaConfig) -> list[str | int]:
    """The class labels in encoded order: schema.classes, else the sorted labels of the training rows."""
    if schema.classes is not None:
        return list(schema.classes)
    found = {label_key(v): v for v in labels.dropna()}
    numeric = all(isinstance(v, (int, np.integer, float, np.floating)) for v in found.values())
    ordered = sorted(found, key=lambda k: (float(k), k) if numeric else (0, k))
    classes = [int(k) if numeric else k for k in ordered]
    need = 2 if schema.task == "binary" else 3
    if schema.task == "binary" and len(classes) != 2:
        hint = (f"set schema.task: multiclass for {len(classes)} classes found" if len(classes) > 2
                else "the training rows hold one class only")
        raise ValueError(f"target {schema.target!r} must have 2 classes for task binary; {hint}: "
                         f"{', '.join(map(str, classes))}")
    if len(classes) < need:
        raise ValueError(f"target {schema.target!r} has {len(classes)} class(es) in the training rows "
                         f"({', '.join(map(str, classes))}); task multiclass needs at least 3 "
                         f"(set schema.task: binary for 2)")
    return classes


def _as_text(values: pd.Series) -> pd.Series:
    """Categories exactly as spelled (clean.normalize_categories: false). Nulls stay null."""
    return pd.Series(_per_distinct(values, str, None), index=values.index, dtype=object, name=values.name)


def _floats(series: pd.Series) -> dict[str, float]:
    return {str(k): float(v) for k, v in series.items()}


def allowed_categories(values: list[str], normalize: bool) -> list[str]:
    """A categorical column's allowed values, spelled as the checked data is (normalized or as text)."""
    spell = normalize_value if normalize else str
    return sorted({spell(v) for v in values})
