"""The suite's row rules, evaluated vectorized (pipelines.rowrules), agree with Great Expectations.

The table is small and built here: mixed-case categories, missing values, a rare class, out-of-range
numbers, unknown categories, nulls where none are allowed, a duplicate id; the suite uses every
expectation type that has a vectorized rule, plus some that stay with GE.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines import rowrules
from pipelines.config import Paths, load_settings
from pipelines.stages import collect, validate
from pipelines.stages.validate import REASONS, ROW
from tests.conftest import write_params

ROWS = 300


def _table() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    x1 = rng.normal(0, 1, ROWS)
    x1[[3, 40, 200]] = [9.5, -np.inf, np.nan]
    label = rng.choice(["low", "mid", "high"], ROWS, p=[0.48, 0.48, 0.04]).astype(object)  # "high" is rare
    label[[5, 250]] = [None, "High "]
    colour = rng.choice(["red", "green", "blue"], ROWS).astype(object)
    colour[[8, 9, 160, 161]] = ["purple", None, "Red", None]  # unknown, null, not normalized
    size = rng.choice(["small", "large", None], ROWS).astype(object)
    size[12] = "huge"
    code = rng.choice(["AB-12", "XY-3", "ab-7", "AB 12", "", "QQQ-1234"], ROWS).astype(object)
    code[rng.random(ROWS) < 0.05] = None
    ident = np.array([f"id{i}" for i in range(ROWS)], dtype=object)
    ident[[70, 220]] = ["id19", None]  # a duplicate (of row 19: same batch, another chunk) and a null
    return pd.DataFrame({
        ROW: np.arange(ROWS), "ident": ident, "x1": x1, "n": rng.integers(0, 8, ROWS), "colour": colour,
        "size": size, "code": code, "label": label,
        "day": pd.Timestamp("2026-03-01") + pd.to_timedelta(rng.integers(0, 4 * 86_400, ROWS), unit="s"),
        "note": np.where(rng.random(ROWS) < 0.97, None, "checked").astype(object),
    }).astype({"colour": "category"}).assign(n32=lambda t: t["n"].astype("int32"))


def _suite() -> list[Any]:
    import great_expectations as gx

    e = gx.expectations
    return [
        e.ExpectTableRowCountToBeBetween(min_value=1, max_value=1000),
        e.ExpectColumnValuesToNotBeNull(column="ident"),
        e.ExpectColumnValuesToBeUnique(column="ident"),
        e.ExpectColumnValuesToNotBeNull(column="label"),
        e.ExpectColumnValuesToBeInSet(column="label", value_set=["low", "mid", "high"]),
        e.ExpectColumnValuesToNotBeNull(column="colour"),
        e.ExpectColumnValuesToBeInSet(column="colour", value_set=["red", "green", "blue"]),
        e.ExpectColumnValuesToBeInSet(column="size", value_set=["small", "large"]),
        e.ExpectColumnValuesToNotBeInSet(column="size", value_set=["huge"]),
        e.ExpectColumnValuesToBeBetween(column="x1", min_value=-3, max_value=3),
        e.ExpectColumnValuesToBeBetween(column="x1", min_value=0, strict_min=True, mostly=0.4),
        e.ExpectColumnValuesToBeBetween(column="n", max_value=6, strict_max=True),
        e.ExpectColumnValuesToBeBetween(column="day", min_value="2026-03-01T00:00:00", max_value="2026-03-04T00:00:00"),
        e.ExpectColumnValuesToBeNull(column="note", mostly=0.9),
        e.ExpectColumnValuesToMatchRegex(column="code", regex=r"^[A-Z]{2}-\d+$"),
        e.ExpectColumnValuesToMatchRegex(column="colour", regex=r"^[a-z]+$"),  # per category
        e.ExpectColumnValuesToNotMatchRegex(column="code", regex=r"\s"),
        e.ExpectColumnValuesToMatchRegexList(column="code", regex_list=["^[A-Z]", r"\d$"], match_on="all"),
        e.ExpectColumnValuesToNotMatchRegexList(column="code", regex_list=["^Q", "^$"]),
        e.ExpectColumnValueLengthsToEqual(column="code", value=5),
        e.ExpectColumnValueLengthsToBeBetween(column="colour", min_value=4, max_value=5),
        # left to GE: no vectorized rule, a range GE checks value by value, a row condition, a batch statistic
        e.ExpectColumnPairValuesAToBeGreaterThanB(column_A="x1", column_B="n"),
        e.ExpectColumnValuesToBeBetween(column="n32", min_value=0, max_value=6),
        e.ExpectColumnValuesToBeBetween(column="day", min_value="2026-03-01", max_value="2026-03-04"),  # GE: an error
        e.ExpectColumnValuesToBeInSet(column="size", value_set=["small"], row_condition='n>5',
                                      condition_parser="pandas"),
        e.ExpectColumnMeanToBeBetween(column="n", min_value=0, max_value=3),
    ]


LEFT_TO_GE = 6


def test_split_leaves_to_ge_what_has_no_vectorized_rule():
    frame, suite = _table(), _suite()
    rules, rest = rowrules.split(suite, frame.dtypes)
    assert len(rules) == len(suite) - LEFT_TO_GE
    assert [x.expectation_type for x in rest] == [
        "expect_table_row_count_to_be_between", "expect_column_pair_values_a_to_be_greater_than_b",
        "expect_column_values_to_be_between", "expect_column_values_to_be_between", "expect_column_values_to_be_in_set",
        "expect_column_mean_to_be_between"]


def test_row_rules_find_the_rows_and_reasons_ge_finds():
    frame, suite = _table(), _suite()
    batches = [("a", frame.iloc[:150]), ("b", frame.iloc[150:])]
    ge = validate.run_expectations(batches, suite, None, vectorized=False)
    fast = validate.run_expectations(batches, suite, None, chunk_rows=64)  # 3 chunks per batch
    assert {r: sorted(n) for r, n in fast.row_failures.items()} == {r: sorted(n) for r, n in ge.row_failures.items()}
    assert fast.expectations == ge.expectations and fast.batch_failures == ge.batch_failures
    # every row-level expectation found rows, so each rule's agreement was tested on real failures
    assert [name for name, seen in fast.expectations.items() if seen["unexpected_count"] == 0] == [
        "expect_table_row_count_to_be_between", "expect_column_mean_to_be_between(n)"]
    assert "expect_column_values_to_be_in_set(colour): 'Red'" in fast.row_failures[160]
    assert "expect_column_values_to_be_between(x1): -inf" in fast.row_failures[40]
    assert fast.expectations["expect_column_values_to_be_unique(ident)"]["unexpected_count"] == 2  # both copies
    assert "expect_column_values_to_be_unique(ident): 'id19'" not in fast.row_failures[70]  # the stage's own check
    assert sum("mean_to_be_between(n) failed" in f for f in fast.batch_failures) == 2


def test_rule_results_are_ge_basic_results():
    """What Data Docs renders for a rule is what GE would have computed: counts, percentages, sample, success."""
    import great_expectations as gx
    from great_expectations.validator.v1_validator import Validator

    frame, suite = _table(), _suite()
    rules, _ = rowrules.split(suite, frame.dtypes)
    ctx = gx.get_context(mode="ephemeral")
    batch = ctx.data_sources.add_pandas("t").add_dataframe_asset("t").add_batch_definition_whole_dataframe("t")
    checked = gx.ExpectationSuite(name="t", expectations=[rule.expectation for rule in rules])
    by_ge = Validator(batch, "BASIC", {"dataframe": frame}).validate_expectation_suite(checked).results
    outcomes = {_key(o.rule.expectation.configuration): o for o in rowrules.evaluate(rules, frame, ROW, chunk_rows=100)}
    assert len(by_ge) == len(outcomes) == len(rules)
    for res in by_ge:  # GE gives its results in an order of its own
        outcome = outcomes[_key(res.expectation_config)]
        assert (res.success, _plain(res.result)) == (outcome.success, _plain(outcome.result())), outcome.rule.name


def _key(cfg: Any) -> str:
    return json.dumps([cfg.type, {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}], sort_keys=True, default=str)


def _plain(result: dict[str, Any]) -> str:
    """A result as comparable text: NaN and None alike (a null's spelling differs by column type)."""
    def fix(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        return [fix(x) for x in v] if isinstance(v, list) else v

    return json.dumps({k: fix(v) for k, v in result.items()}, sort_keys=True, default=str)


def test_stage_quarantines_by_rules_in_chunks_and_keeps_every_row(tmp_path: Path):
    frame = _table().drop(columns=[ROW, "note"])
    frame["colour"] = frame["colour"].astype(object)
    frame.loc[frame.index % 3 == 0, "colour"] = frame["colour"].str.upper()  # mixed case: valid once normalized
    drop = tmp_path / "data" / "drop"
    drop.mkdir(parents=True)
    frame.to_parquet(drop / "table.parquet", index=False)
    (tmp_path / "rules.json").write_text(json.dumps([
        {"type": "expect_column_values_to_match_regex", "kwargs": {"column": "code", "regex": r"^[a-z]{2}-\d+$"}}]))
    schema = {"task": "multiclass", "id_column": "ident", "time_column": "day", "target": "label",
              "classes": ["low", "mid", "high"],
              "numeric": {"x1": {"min": -3, "max": 3, "nullable": True}, "n": {"min": 0, "max": 6}},
              "categorical": {"colour": ["Red", "Green", "Blue"], "size": {"values": ["small", "large"],
                                                                           "nullable": True},
                              "code": {"values": ["AB-12", "XY-3", "ab-7", "AB 12", "QQQ-1234"], "nullable": True}}}
    settings = load_settings(write_params(tmp_path, **{
        "source.kind": "files", "source.files.pattern": "*.parquet", "schema": schema, "evaluate.slices": [],
        "promote.metric": "f1_macro", "validate.expectations_file": "rules.json", "validate.chunk_rows": 70,
        "validate.max_bad_share": 0.9, "validate.min_rows": 10}))
    paths = Paths(tmp_path)
    collect.run(settings, paths)
    summary = validate.run(settings, paths)
    clean = pd.read_parquet(paths.validated / "data.parquet")
    quarantine = pd.read_parquet(paths.quarantine / "quarantine.parquet")
    assert summary["rows_in"] == ROWS == len(clean) + len(quarantine) == summary["rows_clean"] + summary[
        "rows_quarantined"]
    assert sorted([*clean["ident"], *quarantine["ident"].dropna()]) == sorted(frame["ident"].dropna())
    reasons = quarantine.set_index("ident")[REASONS]
    assert "expect_column_values_to_be_in_set(colour): 'purple'" in reasons["id8"]
    assert "expect_column_values_to_be_in_set(size): 'huge'" in reasons["id12"]
    assert "expect_column_values_to_be_in_set(label): 'high'" not in reasons.str.cat()  # the rare class is valid
    assert reasons.str.contains("match_regex(code): 'ab_12'", regex=False).any()  # normalized, then the user's rule
    assert reasons.str.contains("match_regex(code): 'qqq-1234'", regex=False).any()
    assert clean["code"].dropna().isin(["ab-12", "xy-3", "ab-7"]).all()
    assert clean["colour"].isin(["red", "green", "blue"]).all()
    assert (paths.reports / "data_docs" / "index.html").is_file()
