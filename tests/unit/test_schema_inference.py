"""`amaas init`'s inference on small frames: roles, ranges, tasks, sizes, refusals, and a loadable params.yaml."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines.config import load_settings
from pipelines.schema_inference import InitError, infer_schema, numeric_rule, params_text, url_without_password
from tests.tables import make_survey, make_table


def test_roles_ranges_and_comments_of_a_survey():
    inferred = infer_schema(make_survey(300, seed=5), "grade")
    schema = inferred.schema
    assert (schema["task"], schema["id_column"], schema["time_column"], schema["time_unit"]) == (
        "multiclass", "customer_id", "year", None)
    age = schema["numeric"]["age"]
    # never negative: a hard min 0 and no hard max; the sample's range is the reference range
    assert age == {"min": 0, "reference": [18, 79]}
    assert schema["numeric"]["income"]["nullable"] is True and "max" not in schema["numeric"]["income"]
    assert schema["categorical"]["region"] == {"values": ["North", "SOUTH", "West ", "east"], "nullable": True}
    assert "comment" not in schema["categorical"]
    assert any("free text" in r and "`comment`" in r for r in inferred.review)
    assert inferred.comments["categorical.region"] == "4 distinct, 6% null"
    assert inferred.overrides["prepare.split"] == "time" and inferred.overrides["source.split_by_day"] is False


def test_tasks_from_the_target():
    table = make_table("regression", 200, seed=1)
    assert infer_schema(table, "label").schema["task"] == "regression"
    binary = make_table("binary", 200, seed=1)
    inferred = infer_schema(binary, "label")
    assert inferred.schema["task"] == "binary" and inferred.overrides["promote.metric"] == "roc_auc"
    assert inferred.schema["time_column"] == "day" and inferred.overrides["source.split_by_day"]
    assert inferred.schema["id_column"] is None  # no id: a row hash
    with pytest.raises(InitError, match="--task binary, but target 'label' has 4 values; use --task multiclass"):
        infer_schema(make_table("multiclass", 200, seed=1), "label", "binary")
    with pytest.raises(InitError, match="no column 'grade'"):
        infer_schema(binary, "grade")


def test_epoch_seconds_get_their_unit():
    frame = pd.DataFrame({"event_ts": 1_760_000_000 + np.arange(50) * 3600, "x": np.arange(50.0),
                          "y": np.tile([0, 1], 25)})
    inferred = infer_schema(frame, "y")
    assert (inferred.schema["time_column"], inferred.schema["time_unit"]) == ("event_ts", "s")


def test_written_params_load_and_keep_the_comments(tmp_path):
    inferred = infer_schema(make_survey(300, seed=6), "grade")
    text = params_text(inferred, {"kind": "files", "files": {"path": "data/drop", "pattern": "*.csv"}},
                       "300 rows of a test table")
    (tmp_path / "params.yaml").write_text(text)
    settings = load_settings(tmp_path / "params.yaml")
    assert settings.data_schema.task == "multiclass" and settings.promote.metric == "f1_macro"
    assert settings.report.min_labeled_rows == 30 and settings.validation.min_rows == 60
    assert "# integer years 2019-2022: an ordinal watermark" in text
    assert yaml.safe_load(text)["schema"]["categorical"]["member"] == ["False", "True"]


def test_a_password_never_reaches_params_yaml():
    assert url_without_password("postgresql+psycopg://bob:s3cret@db:5432/shop") == "postgresql+psycopg://bob@db:5432/shop"
    assert url_without_password("sqlite:///data/source.db") == "sqlite:///data/source.db"


def test_hard_bounds_only_where_the_data_shows_one():
    shares = pd.Series(np.linspace(0.03, 0.91, 40))
    assert numeric_rule("default_rate", shares)[0] == {"min": 0, "max": 1, "reference": [0.03, 0.91]}
    signed = pd.Series([-3.21, 0.5, 17.3456])
    rule, said = numeric_rule("delta", signed)
    assert rule == {"reference": [-3.21, 17.35]} and "hard" not in said  # no bound: any number is possible
    counts = pd.Series([0, 1, 1, 0])  # integers 0/1, a name that is no fraction: only never negative
    assert numeric_rule("children", counts)[0] == {"min": 0, "reference": [0, 1]}
    big = pd.Series([123_456.0, 987_654.0])  # rounded outward: the sample stays inside its reference range
    low, high = numeric_rule("amount", big)[0]["reference"]
    assert low <= 123_456 and high >= 987_654
    assert numeric_rule("amount", big, margin=0.5)[0]["reference"][1] > 987_654 * 1.3


def test_the_task_says_why_and_names_the_switch_and_a_small_continuous_target_is_regression():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(0, 1, 20), "y": rng.normal(50, 10, 20).round(2)})  # 20 distinct values
    inferred = infer_schema(frame, "y")
    assert inferred.schema["task"] == "regression"
    assert inferred.review[0].startswith("task regression for target 'y': numbers with 20 distinct values")
    assert "`--task multiclass`" in inferred.review[0]
    codes = infer_schema(frame.assign(y=rng.integers(0, 5, 20)), "y")
    assert codes.schema["task"] == "multiclass" and "`--task regression`" in codes.review[0]


def test_a_split_error_on_numeric_labels_suggests_regression(tmp_path):
    from pipelines.stages.prepare import SplitError, split_rows
    from tests.tables import params_for

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_for("multiclass")))
    schema = load_settings(tmp_path / "params.yaml").data_schema
    table = make_table("multiclass", 40, seed=1).assign(label=np.arange(40) % 20, _row_key=np.arange(40))
    with pytest.raises(SplitError, match=r"set schema.task: regression \(or rerun `amaas init --task regression`\)"):
        split_rows(table, schema, "random", 0.15, 0.15, seed=0)
