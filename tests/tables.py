"""Small tables that tests build themselves, the kind users bring: a few hundred rows, categories spelled
in mixed case, missing values, a nullable category, one rare class; and the params.yaml that describes them.

Each table has a learnable signal, so a model trained on it is better than chance.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tests.conftest import small_params

COLORS = ["Red", "GREEN", "blue "]  # as the data spells them; params list them as "Red", "Green", "Blue"
SIZES = ["Small", "Large"]


def make_table(task: str, rows: int, seed: int = 0, start: str = "2026-03-01", days: int = 3,
               shift: float = 0.0) -> pd.DataFrame:
    """A table for `task` (binary, multiclass, regression) over `days` days; `shift` moves column x1."""
    rng = np.random.default_rng(seed)
    x1 = rng.normal(0, 1, rows)
    x2 = rng.uniform(0, 10, rows)
    x2[rng.random(rows) < 0.1] = np.nan  # missing values in a nullable numeric column
    color = rng.choice(COLORS, rows)
    size = rng.choice(SIZES, rows).astype(object)
    size[rng.random(rows) < 0.15] = None  # a nullable categorical
    signal = 1.6 * x1 + 0.25 * np.nan_to_num(x2, nan=5.0) - 1.25 + 0.9 * (color == "Red") - 0.6 * (size == "Large")
    signal += rng.normal(0, 0.5, rows)
    frame = pd.DataFrame({
        "x1": x1 + shift, "x2": x2, "color": color, "size": size,
        "day": pd.Timestamp(start) + pd.to_timedelta(np.sort(rng.integers(0, days * 86_400, rows)), unit="s"),
    })
    if task == "binary":
        frame["label"] = np.where(signal > 0.6, "yes", "no")
    elif task == "multiclass":
        label = np.select([signal < -0.3, signal < 1.3], ["low", "mid"], "high").astype(object)
        label[np.argsort(signal)[-max(rows // 25, 4):]] = "extreme"  # a rare class: ~4% of rows
        frame["label"] = label
    else:
        frame["label"] = 10 * signal + 50
    return frame


def params_for(task: str, **overrides: Any) -> dict[str, Any]:
    """params.yaml for a table of make_table: the schema, small models, thresholds for small data."""
    schema = {
        "task": task,
        "id_column": None,
        "time_column": "day",
        "target": "label",
        "numeric": {"x1": {"min": -20, "max": 20}, "x2": {"min": 0, "max": 10, "nullable": True}},
        "categorical": {"color": ["Red", "Green", "Blue"], "size": {"values": ["Small", "Large"], "nullable": True}},
    }
    metric = {"binary": "roc_auc", "multiclass": "f1_macro", "regression": "rmse"}[task]
    params = small_params(**{
        "schema": schema,
        "validate.min_rows": 50,
        "evaluate.slices": ["color"],
        "promote.metric": metric,
        "promote.min_improvement": 0.0,
        "report.min_labeled_rows": 30,
        "report.reference_rows": 1000,
        "train.lightgbm.min_child_samples": 5,
        "train.mlp.epochs": 8,
        "train.stacking_folds": 3,
        **overrides,
    })
    return params


def make_survey(rows: int, seed: int = 0, first_year: int = 2019, years: int = 4) -> pd.DataFrame:
    """A table as a user exports it, for `amaas init`: an id, an integer year, mixed types with nulls,
    mixed-case categories, a free-text column and a three-class string target."""
    rng = np.random.default_rng(seed)
    income = rng.lognormal(10.5, 0.4, rows).round(2)
    income[rng.random(rows) < 0.08] = np.nan
    age = rng.integers(18, 80, rows)
    region = rng.choice(["North", "SOUTH", "east", "West "], rows).astype(object)
    region[rng.random(rows) < 0.05] = None
    member = rng.random(rows) < 0.4
    score = (np.log(np.nan_to_num(income, nan=36_000)) - 10.5) * 2 + (age - 50) / 20 + 0.8 * member
    score += rng.normal(0, 0.6, rows)
    return pd.DataFrame({
        "customer_id": np.arange(seed * 100_000 + 1, seed * 100_000 + rows + 1),
        "year": np.sort(rng.integers(first_year, first_year + years, rows)),
        "income": income, "age": age, "region": region, "member": member,
        "comment": [f"call {i}: {w}" for i, w in zip(range(rows), rng.choice(["ok", "late", "moved"], rows),
                                                     strict=True)],
        "grade": np.select([score < -0.5, score < 0.6], ["low", "mid"], "high"),
    })
