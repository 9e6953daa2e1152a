"""Simulator of a production loan table: realistic, noisy, and drifting when asked.

Each daily batch is a pure function of (seed, batch index), so a rerun gives the same rows. With
`extra_features: n` it is a wide table: n more numeric columns extra_0 .. extra_{n-1}, each a noisy function
of the real ones (from a random stream of their own: the 13 real columns are the same with or without them);
`extra_schema(n)` gives their schema.numeric rules.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING

from pipelines.config import SimulatorConfig
from pipelines.sources import Watermark, Watermarks

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

HOME = ["rent", "own", "mortgage", "other"]
PURPOSE = ["debt_consolidation", "credit_card", "home_improvement", "small_business", "car", "medical", "other"]
REGION = ["north", "south", "east", "west"]
_PURPOSE_RISK = dict(zip(PURPOSE, [0.1, 0.0, -0.2, 0.6, -0.3, 0.3, 0.1], strict=True))
_HOME_RISK = dict(zip(HOME, [0.25, -0.2, -0.1, 0.1], strict=True))
ID_STRIDE = 10_000_000  # ids of batch k start at k * ID_STRIDE: unique across batches
# The real numeric columns the extra ones derive from, each with a centre and a scale (after log for money).
_BASES = {"age": (46.0, 17.0), "income": (10.9, 0.5), "loan_amount": (9.6, 0.6), "term_months": (43.0, 11.0),
          "interest_rate": (11.0, 3.0), "credit_score": (680.0, 60.0), "debt_to_income": (0.35, 0.2),
          "employment_years": (6.0, 4.0), "open_accounts": (8.0, 2.8), "delinquencies_2y": (0.3, 0.55)}
_LOGGED = ("income", "loan_amount")
EXTRA_BOUND = 50.0  # extra columns are clipped to [-EXTRA_BOUND, EXTRA_BOUND]


class SimulatorSource:
    """The simulated production table: `n_batches` days of rows, each day a pure function of (seed, day)."""

    def __init__(self, cfg: SimulatorConfig, seed: int, watermarks: Watermarks) -> None:
        self.cfg, self.seed, self.watermarks = cfg, seed, watermarks
        self.description = f"simulator(seed={seed}, days={cfg.n_batches} from {cfg.start_date})"

    def read(self, low: Watermark | None, high: Watermark | None) -> tuple[pd.DataFrame, int]:
        import pandas as pd

        days = [generate_batch(self.cfg, self.seed, i) for i in range(self.cfg.n_batches) if self._may_hold(i, low)]
        rows = pd.concat(days, ignore_index=True) if days else generate_batch(self.cfg, self.seed, 0).head(0)
        return self.watermarks.select(rows, low, high), 0

    def read_days(self, low: Watermark | None) -> Iterator[pd.DataFrame]:
        """The rows of read(low, None), one day at a time in order (days hold disjoint watermark ranges), so
        collect holds one day in memory, not the table."""
        for i in range(self.cfg.n_batches):
            if self._may_hold(i, low):
                rows = self.watermarks.select(generate_batch(self.cfg, self.seed, i), low, None)
                if len(rows):
                    yield rows

    def state(self) -> str:
        """Its rows are a pure function of its settings and seed: those (and how they are read) are its state."""
        described = f"{self.seed}|{self.cfg.model_dump_json()}|{self.watermarks}"
        return hashlib.sha256(described.encode()).hexdigest()

    def _may_hold(self, index: int, low: Watermark | None) -> bool:
        """Whether day `index` can hold a row newer than `low` (skips generating days already collected)."""
        if low is None:
            return True
        if self.watermarks.is_time:
            import pandas as pd

            assert isinstance(low, pd.Timestamp)  # the simulator's time column holds timestamps
            return batch_date(self.cfg, index) + pd.Timedelta(days=1) > low
        return (index + 1) * ID_STRIDE > int(low)


def batch_date(cfg: SimulatorConfig, index: int) -> pd.Timestamp:
    import pandas as pd

    return pd.Timestamp(cfg.start_date + timedelta(days=index))


def _drift(cfg: SimulatorConfig, index: int) -> float:
    if cfg.drift_start_batch is None or index < cfg.drift_start_batch:
        return 0.0
    return cfg.drift_strength


def generate_batch(cfg: SimulatorConfig, seed: int, index: int) -> pd.DataFrame:
    """Rows of batch `index` (one day), with the configured share of malformed rows."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng([seed, index])
    n, d = cfg.rows_per_batch, _drift(cfg, index)

    age = rng.integers(18, 76, n)
    income = np.round(rng.lognormal(np.log(55_000) - 0.25 * d, 0.5, n), 2)
    employment = np.minimum(age - 18, np.round(rng.gamma(2.0, 3.0, n), 1))
    # drawn as indexes into one array of the labels: the same draws as choosing labels, and each row points at
    # one shared string (a few bytes a row, not a string object each)
    home = np.array(HOME, dtype=object)[rng.choice(len(HOME), n, p=[0.4, 0.2, 0.35, 0.05])]
    p_purpose = np.array([0.35, 0.2, 0.12, 0.06, 0.12, 0.05, 0.1]) + d * np.array([-0.1, 0, 0, 0.06, 0, 0.04, 0])
    purpose = np.array(PURPOSE, dtype=object)[rng.choice(len(PURPOSE), n, p=p_purpose / p_purpose.sum())]
    region = np.array(REGION, dtype=object)[rng.choice(len(REGION), n)]
    credit = np.clip(np.round(rng.normal(680 - 30 * d, 60, n)), 300, 850)
    amount = np.round(np.clip(rng.lognormal(np.log(15_000), 0.6, n), 500, 500_000), 2)
    term = rng.choice([36, 60], n, p=[0.7, 0.3])
    rate = np.round(np.clip(4 + (850 - credit) / 25 + rng.normal(0, 1.5, n) + d, 1, 35), 2)
    dti = np.round(np.clip(amount * 12 / term / income + rng.beta(2, 5, n) * 0.4, 0, 4.9), 4)
    accounts = rng.poisson(8, n)
    delinq = rng.poisson(0.3 + 0.2 * d, n)

    z = (
        -2.3
        + 0.015 * (680 - credit)
        + 1.5 * (dti - 0.35)
        + 0.12 * (rate - 12)
        + 0.45 * delinq
        + 0.35 * (term == 60)
        + np.vectorize(_PURPOSE_RISK.get)(purpose)
        + np.vectorize(_HOME_RISK.get)(home)
        - 0.03 * employment
        + 0.5 * (age < 25)
        + 0.8 * ((dti > 0.5) & (credit < 640))
        + d * 0.6 * (region == "south")  # concept drift: the same applicant gets riskier in one region
    )
    target = (rng.random(n) < 1 / (1 + np.exp(-z))).astype("int64")

    seconds = np.sort(rng.uniform(0, 86_400, n))
    df = pd.DataFrame(
        {
            "loan_id": index * ID_STRIDE + np.arange(1, n + 1),
            "event_time": batch_date(cfg, index) + pd.to_timedelta(seconds, unit="s"),
            "age": age.astype("float64"),
            "income": income,
            "loan_amount": amount,
            "term_months": term.astype("float64"),
            "interest_rate": rate,
            "credit_score": credit,
            "debt_to_income": dti,
            "employment_years": employment,
            "open_accounts": accounts.astype("float64"),
            "delinquencies_2y": delinq.astype("float64"),
            "home_ownership": home,
            "purpose": purpose,
            "region": region,
            "default": target,
        }
    )
    if cfg.extra_features:
        extra = extra_columns(df, cfg.extra_features, np.random.default_rng([seed, index, 1]))
        df = pd.concat([df.drop(columns=["default"]), extra, df[["default"]]], axis=1)
    _add_real_world_noise(df, rng)
    _add_malformed_rows(df, rng, cfg.malformed_share)
    return df


def extra_schema(n: int) -> dict[str, dict[str, float]]:
    """schema.numeric rules of the `n` extra columns (params.yaml lists them so that validation checks them)."""
    return {f"extra_{k}": {"min": -EXTRA_BOUND, "max": EXTRA_BOUND} for k in range(n)}


def extra_columns(df: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """`n` numeric columns of a wide table: extra_k is a standardized real column plus noise (k even), or the
    product of two of them plus noise (k odd), clipped to +-EXTRA_BOUND."""
    import numpy as np
    import pandas as pd

    z = {}
    for col, (centre, scale) in _BASES.items():
        values = df[col].to_numpy(dtype="float64")
        z[col] = ((np.log(values) if col in _LOGGED else values) - centre) / scale
    names, out = list(_BASES), {}
    for k in range(n):
        a, b = z[names[k % len(names)]], z[names[(3 * k + 1) % len(names)]]
        value = a * b + rng.normal(0, 0.5, len(df)) if k % 2 else a + rng.normal(0, 1, len(df))
        out[f"extra_{k}"] = np.round(np.clip(value, -EXTRA_BOUND, EXTRA_BOUND), 4)
    return pd.DataFrame(out, index=df.index)


def _add_real_world_noise(df: pd.DataFrame, rng: np.random.Generator) -> None:
    """Missing values and messy category spelling: cleaning handles these, validation passes them."""
    import numpy as np

    n = len(df)
    missing_income = rng.random(n) < 0.04
    df.loc[missing_income, ["income", "debt_to_income"]] = np.nan
    df.loc[rng.random(n) < 0.06, "employment_years"] = np.nan
    messy = rng.random(n) < 0.03
    df.loc[messy, "home_ownership"] = df.loc[messy, "home_ownership"].str.upper().str.pad(8, side="both")


def _add_malformed_rows(df: pd.DataFrame, rng: np.random.Generator, share: float) -> None:
    """Defects a production table really has; each must end in quarantine, not in training."""
    import numpy as np

    n_bad = int(round(share * len(df)))
    if n_bad == 0:
        return
    rows = rng.choice(np.arange(1, len(df)), size=min(n_bad, len(df) - 1), replace=False)
    # on the columns' arrays, one row at a time (a row may copy an id changed before it): `df.loc` per row
    # costs time in proportion to the batch, so a day of a million rows took minutes
    columns = {c: df[c].to_numpy(copy=True) for c in ("age", "credit_score", "purpose", "loan_amount", "loan_id")}
    for row, kind in zip(rows, rng.integers(0, 5, len(rows)), strict=True):
        if kind == 0:
            columns["age"][row] = rng.choice([-1.0, 150.0])
        elif kind == 1:
            columns["credit_score"][row] = 9999.0
        elif kind == 2:
            columns["purpose"][row] = "crypto"
        elif kind == 3:
            columns["loan_amount"][row] = np.nan
        else:
            columns["loan_id"][row] = columns["loan_id"][row - 1]
    for column, values in columns.items():
        df[column] = values
