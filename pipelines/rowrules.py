"""Row rules: a Great Expectations suite's row-level expectations evaluated as vectorized pandas masks.

Great Expectations stays the source of truth: each rule is made from a GE expectation and evaluates the
condition GE's pandas engine evaluates for it (the same mask, the same null handling, the same counts and
the same unexpected values), but once per row, without GE's per-metric copies of the batch. `result` gives
GE's BASIC result for it, so GE's Data Docs render it as if GE had computed it.

An expectation that is not row-level (row count, a column statistic), or has no equivalent here, or needs
what only GE resolves (a row_condition, suite parameters, a column GE checks value by value) is left to
GE: `split` says which.

Rules are functions of a DataFrame chunk: a `Tally` takes a batch chunk by chunk and gives one `Outcome`
per rule. Uniqueness is judged over the whole batch, so a tally keeps that one column's values until
the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pandas.api import types

PARTIAL = 20  # unexpected values GE lists in a BASIC result (its partial_unexpected_count)
UNIQUE = "expect_column_values_to_be_unique"
NOT_NULL = "expect_column_values_to_not_be_null"
NULL = "expect_column_values_to_be_null"

Condition = Callable[[pd.Series, Mapping[str, Any]], pd.Series]  # True where a non-null value meets the rule


def _matches(values: pd.Series, regex: str) -> pd.Series:
    # astype(str) as GE does: a number 1.0 is matched as "1.0"
    return values.astype(str).str.contains(regex)


def _between(series: pd.Series, kw: Mapping[str, Any]) -> pd.Series:
    """GE's `min <= value <= max` (strict_min/strict_max: <), either bound optional; its errors too."""
    low, high = kw.get("min_value"), kw.get("max_value")
    if low is None and high is None:
        raise ValueError("min_value and max_value cannot both be None")
    if low is not None and high is not None and low > high:
        raise ValueError("min_value cannot be greater than max_value")
    meets = pd.Series(True, index=series.index)
    if low is not None:
        meets &= (series > low) if kw.get("strict_min") else (series >= low)
    if high is not None:
        meets &= (series < high) if kw.get("strict_max") else (series <= high)
    return meets


def _lengths(values: pd.Series) -> pd.Series:
    return values.astype(str).str.len()


def _regex_list(values: pd.Series, kw: Mapping[str, Any]) -> pd.DataFrame:
    return pd.concat([_matches(values, r) for r in kw["regex_list"]], axis=1, ignore_index=True)


def _match_list(values: pd.Series, kw: Mapping[str, Any]) -> pd.Series:
    matched, match_on = _regex_list(values, kw), kw.get("match_on", "any")
    if match_on not in ("any", "all"):
        raise ValueError("match_on must be either 'any' or 'all'")
    return matched.any(axis="columns") if match_on == "any" else matched.all(axis="columns")


# Each condition as GE's pandas metric computes it (great_expectations/expectations/metrics/column_map_metrics).
CONDITIONS: dict[str, Condition] = {
    NOT_NULL: lambda v, kw: v.notna(),
    NULL: lambda v, kw: v.isna(),
    "expect_column_values_to_be_in_set": lambda v, kw: v.isin(kw["value_set"]),
    "expect_column_values_to_not_be_in_set": lambda v, kw: ~v.isin(kw["value_set"]),
    "expect_column_values_to_be_between": _between,
    UNIQUE: lambda v, kw: ~v.duplicated(keep=False),
    "expect_column_values_to_match_regex": lambda v, kw: _matches(v, kw["regex"]),
    "expect_column_values_to_not_match_regex": lambda v, kw: ~_matches(v, kw["regex"]),
    "expect_column_values_to_match_regex_list": _match_list,
    "expect_column_values_to_not_match_regex_list": lambda v, kw: ~_regex_list(v, kw).any(axis="columns"),
    "expect_column_value_lengths_to_equal": lambda v, kw: _lengths(v) == kw["value"],
    "expect_column_value_lengths_to_be_between": lambda v, kw: _between(_lengths(v), kw),
}
_KEEPS_NULLS = (NOT_NULL, NULL)  # GE checks every row for these; for the others nulls are neither counted nor judged
_PER_CATEGORY = {  # text conditions: judged once per category of a category column, not once per row
    "expect_column_values_to_match_regex", "expect_column_values_to_not_match_regex",
    "expect_column_values_to_match_regex_list", "expect_column_values_to_not_match_regex_list",
    "expect_column_value_lengths_to_equal", "expect_column_value_lengths_to_be_between"}


@dataclass(frozen=True)
class RowRule:
    """One row-level GE expectation as a vectorized condition."""

    expectation: Any  # the GE expectation it evaluates (its configuration goes into the result)
    type: str
    column: str
    kwargs: Mapping[str, Any]
    mostly: float

    @property
    def name(self) -> str:
        return f"{self.type}({self.column})"

    @property
    def judges_nulls(self) -> bool:
        return self.type in _KEEPS_NULLS

    def unexpected(self, values: pd.Series, nulls: np.ndarray) -> np.ndarray:
        """A boolean mask over `values` (`nulls`: their null mask): the rows GE counts as unexpected.

        GE judges only the non-null values (but for the null rules); the conditions here are elementwise
        (or, for uniqueness, unaffected by nulls), so they run on the whole column and nulls are masked out.
        """
        condition = CONDITIONS[self.type]
        if self.judges_nulls:
            return nulls.copy() if self.type == NOT_NULL else ~nulls
        if self.type in _PER_CATEGORY and isinstance(values.dtype, pd.CategoricalDtype):
            per_category = ~condition(pd.Series(values.cat.categories, dtype=object), self.kwargs).to_numpy(dtype=bool)
            codes = values.cat.codes.to_numpy()  # -1 for a null, masked out below
            failing = per_category[codes] if len(per_category) else np.zeros(len(values), dtype=bool)
            return failing & ~nulls
        return ~condition(values, self.kwargs).to_numpy(dtype=bool) & ~nulls


def split(expectations: Iterable[Any], dtypes: pd.Series) -> tuple[list[RowRule], list[Any]]:
    """The expectations evaluated here as rules, and those left to Great Expectations, in suite order each.

    `dtypes` are the batch's column types (`frame.dtypes`): GE checks a range on a column that is neither
    numeric nor datetime value by value, with its own type rules, so such a range stays with GE.
    """
    rules, rest = [], []
    for expectation in expectations:
        rule = _rule(expectation, dtypes)
        if rule is None:
            rest.append(expectation)
        else:
            rules.append(rule)
    return rules, rest


def _rule(expectation: Any, dtypes: pd.Series) -> RowRule | None:
    cfg = expectation.configuration
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("column", "mostly", "result_format", "catch_exceptions")}
    column = cfg.kwargs.get("column")
    if cfg.type not in CONDITIONS or column not in dtypes:  # a missing column: GE reports it
        return None
    if any(isinstance(v, dict) for v in kwargs.values()) or kwargs.get("row_condition"):  # parameters, conditions
        return None
    dtype = dtypes[column]
    timestamps = isinstance(dtype, pd.DatetimeTZDtype) or types.is_datetime64_ns_dtype(dtype)
    if cfg.type == "expect_column_values_to_be_between" and dtype not in (int, float) and not timestamps:
        return None  # GE checks such a range value by value, with its own type rules
    if cfg.type == "expect_column_values_to_not_be_in_set" and timestamps:
        return None  # GE parses the set's text as dates first
    try:  # on no rows: what fails here (a broken regex, bounds of the wrong type) fails in GE too, which reports it
        CONDITIONS[cfg.type](pd.Series([], dtype=dtype), kwargs)
    except Exception:
        return None
    return RowRule(expectation, cfg.type, column, kwargs, float(cfg.kwargs.get("mostly", 1.0)))


@dataclass
class Outcome:
    """One rule on one batch: what GE's result for it holds, and every unexpected row."""

    rule: RowRule
    element_count: int
    null_count: int
    keys: np.ndarray  # the key (row id) of each unexpected row, in row order
    values: list[Any]  # its value

    @property
    def unexpected_count(self) -> int:
        return len(self.keys)

    @property
    def success(self) -> bool:
        """As GE decides: the share of expected rows among those judged reaches `mostly`."""
        judged = self.element_count if self.rule.judges_nulls else self.element_count - self.null_count
        if judged == 0:
            return True
        return (float(judged) - float(self.unexpected_count)) / float(judged) >= self.rule.mostly

    def result(self) -> dict[str, Any]:
        """GE's BASIC result dict (see great_expectations.expectations.expectation._format_map_output)."""
        total, unexpected = self.element_count, self.unexpected_count
        out: dict[str, Any] = {"element_count": total, "unexpected_count": unexpected}
        if self.rule.judges_nulls:  # GE gives these no missing counts
            out.update(unexpected_percent=unexpected / total * 100 if total else None,
                       partial_unexpected_list=self.values[:PARTIAL])
            return out
        nonnull = total - self.null_count
        percent = unexpected / nonnull * 100 if total and nonnull else None
        out.update(unexpected_percent=percent, partial_unexpected_list=self.values[:PARTIAL],
                   missing_count=self.null_count, missing_percent=self.null_count / total * 100 if total else None,
                   unexpected_percent_total=unexpected / total * 100 if total else None,
                   unexpected_percent_nonmissing=percent)
        return out


@dataclass
class Tally:
    """The rules over one batch, given chunk by chunk (`add`), each chunk holding `key` and the rules' columns."""

    rules: list[RowRule]
    key: str
    _rows: int = 0
    _nulls: dict[int, int] = field(default_factory=dict)
    _keys: dict[int, list[np.ndarray]] = field(default_factory=dict)
    _values: dict[int, list[list[Any]]] = field(default_factory=dict)
    _whole: dict[int, list[pd.DataFrame]] = field(default_factory=dict)  # uniqueness: the keys and column so far

    def add(self, chunk: pd.DataFrame) -> None:
        self._rows += len(chunk)
        keys = chunk[self.key].to_numpy()
        nulls: dict[str, np.ndarray] = {}  # per column, shared by its rules
        for i, rule in enumerate(self.rules):
            if rule.type == UNIQUE:
                self._whole.setdefault(i, []).append(chunk[[self.key, rule.column]])
                continue
            values = chunk[rule.column]
            if rule.column not in nulls:
                nulls[rule.column] = values.isna().to_numpy()
            self._count(i, values, keys, nulls[rule.column], rule)

    def _count(self, i: int, values: pd.Series, keys: np.ndarray, nulls: np.ndarray, rule: RowRule) -> None:
        mask = rule.unexpected(values, nulls)
        self._nulls[i] = self._nulls.get(i, 0) + int(nulls.sum())
        self._keys.setdefault(i, []).append(keys[mask])
        self._values.setdefault(i, []).append(values[mask].tolist())

    def outcomes(self) -> list[Outcome]:
        """One outcome per rule, in rule order, over every row added."""
        for i, rule in enumerate(self.rules):
            if i in self._whole:
                whole = pd.concat(self._whole.pop(i), ignore_index=True)
                values = whole[rule.column]
                self._count(i, values, whole[self.key].to_numpy(), values.isna().to_numpy(), rule)
        empty = np.array([], dtype=np.int64)
        return [Outcome(rule, self._rows, self._nulls.get(i, 0),
                        np.concatenate(self._keys[i]) if i in self._keys else empty,
                        [v for part in self._values.get(i, []) for v in part])
                for i, rule in enumerate(self.rules)]


def evaluate(rules: list[RowRule], frame: pd.DataFrame, key: str, chunk_rows: int) -> list[Outcome]:
    """The rules over a whole batch, `chunk_rows` rows at a time."""
    tally = Tally(rules, key)
    for start in range(0, len(frame), max(chunk_rows, 1)):
        tally.add(frame.iloc[start : start + chunk_rows])
    return tally.outcomes()
