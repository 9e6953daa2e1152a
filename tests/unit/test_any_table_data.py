"""collect and validate on tables that are not the simulator's: string labels, no id, no time, a year, string ids.

Each test builds its own small table (a few hundred rows, mixed-case categories, missing values, a rare
class) in a drop folder and runs collect and validate on it directly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipelines.config import ROW_KEY, Paths, load_settings
from pipelines.io import read_json
from pipelines.sources import parse_time
from pipelines.stages import collect, validate
from pipelines.stages.validate import REASONS, DataValidationError
from tests.conftest import write_params


@pytest.fixture(autouse=True)
def drop_folder(tmp_path: Path) -> Path:
    (tmp_path / "data" / "drop").mkdir(parents=True)
    return tmp_path / "data" / "drop"


def _table(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """A small user table: mixed-case categories, missing values, a rare class, string labels."""
    rng = np.random.default_rng(seed)
    grade = rng.choice(["High", "low", "Mid"], n, p=[0.45, 0.45, 0.10])  # Mid is the rare class
    return pd.DataFrame({
        "size": np.round(rng.uniform(1, 100, n), 1),
        "weight": np.where(rng.random(n) < 0.1, np.nan, np.round(rng.normal(50, 10, n), 2)),
        "region": rng.choice(["North", "SOUTH", "  east ", "South"], n),
        "colour": np.where(rng.random(n) < 0.15, None, rng.choice(["Red", "blue"], n)),
        "grade": grade,
    })


def _project(root: Path, schema: dict[str, Any], **overrides: Any) -> tuple[Any, Paths]:
    """Settings for a files source on data/drop with the given schema (no slices: the columns differ)."""
    params = {"source.kind": "files", "source.files.pattern": "*.csv", "schema": schema, "evaluate.slices": [],
              **overrides}
    if schema.get("task") == "multiclass":
        params.setdefault("promote.metric", "f1_macro")
    if schema.get("task") == "regression":
        params.setdefault("promote.metric", "rmse")
    if not schema.get("time_column"):
        params.setdefault("prepare.split", "random")
    return load_settings(write_params(root, **params)), Paths(root)


SCHEMA = {"task": "multiclass", "target": "grade",
          "numeric": {"size": {"min": 0, "max": 100}, "weight": {"min": 0, "max": 200, "nullable": True}},
          "categorical": {"region": ["North", "South", "East"],  # as the data spells them, not normalized
                          "colour": {"values": ["Red", "Blue"], "nullable": True}}}


def test_csv_drop_folder_without_time_or_id_takes_each_new_file_once(tmp_path, caplog):
    settings, paths = _project(tmp_path, SCHEMA)
    drop = tmp_path / "data" / "drop"
    first, second = _table(300, 0), _table(200, 1)
    first.loc[7, "region"] = "Nroth"
    first.to_csv(drop / "a.csv", index=False)
    assert collect.run(settings, paths)["new_rows"] == 300
    assert collect.run(settings, paths)["new_rows"] == 0  # a file seen before is not collected again
    second.to_csv(drop / "b.csv", index=False)
    got = collect.run(settings, paths)
    assert got["new_batches"] == 1 and got["new_rows"] == 200
    manifest = read_json(paths.raw / "manifest.json")
    assert [(b["batch"], b["source_file"]) for b in manifest["batches"]] == [("000001", "a.csv"), ("000002", "b.csv")]
    assert manifest["watermark_column"] is None and all(len(b["source_sha256"]) == 64 for b in manifest["batches"])

    summary = validate.run(settings, paths)
    assert summary["rows_in"] == 500 == summary["rows_clean"] + summary["rows_quarantined"]
    q = pd.read_parquet(paths.quarantine / "quarantine.parquet")
    assert q[REASONS].tolist() == ["expect_column_values_to_be_in_set(region): 'nroth'"]  # the one misspelling
    clean = pd.read_parquet(paths.validated / "data.parquet")
    assert set(clean["grade"]) == {"High", "low", "Mid"}  # labels as spelled, the rare class kept
    assert clean["grade"].dtype == object
    assert clean["colour"].isna().sum() > 0 and set(clean["colour"].dropna()) == {"red", "blue"}  # missing stays
    assert clean[ROW_KEY].dtype == "int64" and clean[ROW_KEY].is_unique
    before = clean.set_index(ROW_KEY)
    validate.run(settings, paths)  # the key is stable: the same rows get the same keys
    pd.testing.assert_frame_equal(pd.read_parquet(paths.validated / "data.parquet").set_index(ROW_KEY), before)

    first.iloc[:250].to_csv(drop / "a.csv", index=False)  # a collected file changes: reported, not collected
    with caplog.at_level(logging.WARNING):
        again = collect.run(settings, paths)
    assert again["new_rows"] == 0 and again["changed_files"] == ["a.csv"]
    assert "a.csv changed since it was collected as batch 000001" in caplog.text
    rerun = collect.run(settings, paths, rerun="000001")  # takes the file's current rows
    assert (rerun["rows"], rerun["rows_added"], rerun["rows_removed"]) == (250, 0, 50)
    assert collect.run(settings, paths)["changed_files"] == []


def test_binary_target_with_three_labels_stops_with_what_to_change(tmp_path):
    settings, paths = _project(tmp_path, {**SCHEMA, "task": "binary"}, **{"promote.metric": "roc_auc"})
    _table().to_csv(tmp_path / "data" / "drop" / "a.csv", index=False)
    collect.run(settings, paths)
    with pytest.raises(DataValidationError, match="target 'grade' must have 2 classes for task binary; set "
                                                  "schema.task: multiclass for 3 classes found: High, Mid, low"):
        validate.run(settings, paths)

    # with the classes listed, the third label is quarantined and its reason names it
    settings, paths = _project(tmp_path, {**SCHEMA, "task": "binary", "classes": ["low", "High"]},
                               **{"promote.metric": "roc_auc", "validate.max_bad_share": 0.5})
    validate.run(settings, paths)
    q = pd.read_parquet(paths.quarantine / "quarantine.parquet")
    assert len(q) > 0 and q[REASONS].eq("expect_column_values_to_be_in_set(grade): 'Mid'").all()
    assert set(pd.read_parquet(paths.validated / "data.parquet")["grade"]) == {"low", "High"}


def test_integer_labels_and_regression_targets(tmp_path):
    rows = _table()
    rows["grade"] = np.where(rows["grade"] == "High", 1.0, 0.0)  # 1.0 and 0.0: integer labels
    rows.loc[3, "grade"] = None
    rows.to_csv(tmp_path / "data" / "drop" / "a.csv", index=False)
    settings, paths = _project(tmp_path, {**SCHEMA, "task": "binary"}, **{"promote.metric": "roc_auc"})
    collect.run(settings, paths)
    validate.run(settings, paths)
    clean = pd.read_parquet(paths.validated / "data.parquet")
    assert clean["grade"].dtype == "int64" and set(clean["grade"]) == {0, 1}
    assert "expect_column_values_to_not_be_null(grade)" in pd.read_parquet(
        paths.quarantine / "quarantine.parquet")[REASONS].tolist()

    rows["grade"] = rows["size"] * 2.5
    rows["grade"] = rows["grade"].astype(object)
    rows.loc[5, "grade"] = "tbd"
    rows.to_csv(tmp_path / "data" / "drop" / "a.csv", index=False)
    settings, paths = _project(tmp_path, {**SCHEMA, "task": "regression"})
    collect.run(settings, paths, rerun="000001")
    validate.run(settings, paths)
    q = pd.read_parquet(paths.quarantine / "quarantine.parquet")
    assert len(q) == 1 and "expect_column_values_to_be_of_type(grade): 'tbd'" in q[REASONS].iloc[0]
    assert pd.read_parquet(paths.validated / "data.parquet")["grade"].dtype == "float64"


def test_stop_message_lists_the_top_unexpected_values(tmp_path):
    rows = _table()
    rows.loc[:99, "region"] = ["Nroth"] * 60 + ["Sth"] * 30 + ["x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8",
                                                               "x9", "x10"]
    rows.to_csv(tmp_path / "data" / "drop" / "a.csv", index=False)
    settings, paths = _project(tmp_path, SCHEMA)
    collect.run(settings, paths)
    with pytest.raises(DataValidationError) as err:
        validate.run(settings, paths)
    assert ("expect_column_values_to_be_in_set(region) unexpected values: 'nroth' (60), 'sth' (30), 'x1' (1), "
            "'x10' (1), 'x2' (1)") in str(err.value)
    details = read_json(paths.reports / "validation_details.json")
    assert details["unexpected_values"]["expect_column_values_to_be_in_set(region)"][:2] == [["'nroth'", 60],
                                                                                              ["'sth'", 30]]


def test_integer_years_are_ordinal_not_nanoseconds(tmp_path):
    years = pd.Series([2001, 2005, 2010])
    assert parse_time(years, None).tolist() == [2001, 2005, 2010]
    assert parse_time(years, "D").tolist() == [pd.Timestamp("1975-06-25"), pd.Timestamp("1975-06-29"),
                                               pd.Timestamp("1975-07-04")]
    assert parse_time(pd.Series(["2026-01-02", "2026-01-03", 7]), None).isna().tolist() == [False, False, True]

    rows = _table(300).assign(year=np.repeat(np.arange(2001, 2011), 30))
    rows.loc[4, "year"] = None
    drop = tmp_path / "data" / "drop"
    rows.iloc[:240].to_csv(drop / "a.csv", index=False)
    settings, paths = _project(tmp_path, {**SCHEMA, "time_column": "year"}, **{"prepare.split": "time"})
    first = collect.run(settings, paths)
    assert first["new_batches"] == 1 and first["watermark"] == 2008  # one batch per run, not one per "day"
    assert first["rows_without_watermark"] == 1
    rows.to_csv(drop / "a.csv", index=False)  # two more years arrive
    assert collect.run(settings, paths)["new_rows"] == 60
    validate.run(settings, paths)
    clean = pd.read_parquet(paths.validated / "data.parquet")
    assert clean["year"].dtype == "int64" and clean["year"].between(2001, 2010).all()


def test_epoch_seconds_with_a_time_unit_are_timestamps(tmp_path):
    rows = _table(200).assign(ts=1_767_225_600 + np.arange(200) * 3600)  # 2026-01-01, one row an hour
    rows.to_csv(tmp_path / "data" / "drop" / "a.csv", index=False)
    settings, paths = _project(tmp_path, {**SCHEMA, "time_column": "ts", "time_unit": "s"},
                               **{"prepare.split": "time"})
    got = collect.run(settings, paths)
    assert got["new_batches"] == 9  # split by calendar day: 200 hours
    assert read_json(paths.raw / "manifest.json")["batches"][0]["batch"] == "2026-01-01"
    validate.run(settings, paths)
    assert pd.read_parquet(paths.validated / "data.parquet")["ts"].min() == pd.Timestamp("2026-01-01")
    changed, _ = _project(tmp_path, {**SCHEMA, "time_column": "ts"}, **{"prepare.split": "time"})
    with pytest.raises(Exception, match="schema.time_unit"):  # never read differently without saying so
        collect.run(changed, paths)


def test_a_repaired_row_is_collected_by_rerunning_its_batch(tmp_path, caplog):
    rows = _table(300).assign(year=np.repeat(np.arange(2001, 2011), 30))
    rows["year"] = rows["year"].astype(object)
    rows.loc[10, "year"] = "unknown"
    file = tmp_path / "data" / "drop" / "a.csv"
    rows.to_csv(file, index=False)
    settings, paths = _project(tmp_path, {**SCHEMA, "time_column": "year"})
    with caplog.at_level(logging.WARNING):
        assert collect.run(settings, paths)["new_rows"] == 299
    assert "give it a year after the current watermark 2010" in caplog.text
    assert "amaas collect --rerun BATCH" in caplog.text

    rows.loc[10, "year"] = 2001  # repaired as advised: its true year, inside the collected interval
    rows.to_csv(file, index=False)
    assert collect.run(settings, paths)["new_rows"] == 0  # at or below the watermark: not new
    got = collect.run(settings, paths, rerun="000001")
    assert (got["rows"], got["rows_added"], got["rows_removed"]) == (300, 1, 0)
    assert collect.run(settings, paths, rerun="000001")["identical"]


def test_string_ids_stay_text_and_duplicates_keep_the_first(tmp_path):
    rows = _table(200).assign(code=[f"A-{i:04d}" for i in range(200)])
    rows.loc[5, "code"] = "A-0004"
    rows.loc[6, "code"] = None
    rows.to_csv(tmp_path / "data" / "drop" / "a.csv", index=False)
    settings, paths = _project(tmp_path, {**SCHEMA, "id_column": "code"})
    collect.run(settings, paths)  # no time column: the files source takes the file whole, the id is no watermark
    assert read_json(paths.raw / "manifest.json")["watermark_column"] is None
    validate.run(settings, paths)
    q = pd.read_parquet(paths.quarantine / "quarantine.parquet").set_index("__row__")[REASONS]
    assert q[5] == "expect_column_values_to_be_unique(code): 'A-0004'"
    assert q[6] == "expect_column_values_to_not_be_null(code)"
    clean = pd.read_parquet(paths.validated / "data.parquet")
    assert clean["code"].dtype == object and clean["code"].iloc[4] == "A-0004" and ROW_KEY not in clean


def test_rows_without_id_are_read_in_the_same_order(tmp_path):
    rows = _table(200).assign(year=np.repeat(np.arange(2001, 2011), 20))
    drop = tmp_path / "data" / "drop"
    rows.to_csv(drop / "a.csv", index=False)
    settings, paths = _project(tmp_path, {**SCHEMA, "time_column": "year"})
    from pipelines.sources import open_source

    source = open_source(settings, paths)
    once, _ = source.read(2003, 2006)
    rows.sample(frac=1, random_state=1).to_csv(drop / "a.csv", index=False)  # the same rows, shuffled
    twice, _ = source.read(2003, 2006)
    pd.testing.assert_frame_equal(once, twice)
    assert len(once) == 60 and once["year"].is_monotonic_increasing


def test_sql_source_with_a_year_and_no_id(tmp_path):
    import sqlalchemy as sa

    rows = _table(200).assign(year=np.repeat(np.arange(2001, 2011), 20))
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'data' / 'source.db'}")
    rows.iloc[:100].sample(frac=1, random_state=0).to_sql("items", engine, index=False)
    settings, paths = _project(tmp_path, {**SCHEMA, "time_column": "year"},
                               **{"source.kind": "sql", "source.sql.table": "items"})
    first = collect.run(settings, paths)
    assert (first["new_rows"], first["watermark"]) == (100, 2005)
    rows.iloc[100:].to_sql("items", engine, index=False, if_exists="append")
    assert collect.run(settings, paths)["new_rows"] == 100
    assert collect.run(settings, paths, rerun="000001")["identical"]  # no id: ordered by the row content
    validate.run(settings, paths)
    clean = pd.read_parquet(paths.validated / "data.parquet")
    assert len(clean) == 200 and clean["year"].dtype == "int64" and ROW_KEY in clean
