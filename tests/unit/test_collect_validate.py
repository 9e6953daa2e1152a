import json

import numpy as np
import pandas as pd
import pytest

from pipelines.config import Paths, load_settings
from pipelines.io import file_digest, read_json, write_json
from pipelines.sources import simulator
from pipelines.stages import collect, validate
from pipelines.stages.validate import REASONS, DataValidationError
from tests.conftest import write_params


@pytest.fixture
def project(tmp_path):
    return load_settings(write_params(tmp_path)), Paths(tmp_path)


def test_simulator_is_deterministic_and_drifts(project):
    settings, _ = project
    cfg = settings.source.simulator
    a = simulator.generate_batch(cfg, settings.seed, 1)
    pd.testing.assert_frame_equal(a, simulator.generate_batch(cfg, settings.seed, 1))
    drifted_cfg = cfg.model_copy(update={"drift_start_batch": 1, "drift_strength": 2.0})
    drifted = simulator.generate_batch(drifted_cfg, settings.seed, 1)
    assert drifted["credit_score"].mean() < a["credit_score"].mean() - 30
    assert drifted["default"].mean() > a["default"].mean()


def test_rows_in_equal_clean_plus_quarantined(project):
    settings, paths = project
    collect.run(settings, paths)
    summary = validate.run(settings, paths)
    clean = pd.read_parquet(paths.validated / "data.parquet")
    quarantine = pd.read_parquet(paths.quarantine / "quarantine.parquet")
    raw = validate.concat_batches(validate.load_batches(paths))
    assert summary["rows_in"] == len(raw) == len(clean) + len(quarantine)
    assert len(quarantine) > 0 and quarantine[REASONS].str.len().gt(0).all()
    # no row lost or duplicated: the (id, time) pairs of both sides together are exactly the input's
    key = ["loan_id", "event_time"]
    together = pd.concat([clean[key], quarantine[key]]).sort_values(key).reset_index(drop=True)
    expected = raw[key].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(together, expected, check_dtype=False)
    assert not clean["loan_id"].duplicated().any()


def _corrupt(paths: Paths, change) -> None:
    """Apply `change` to the first collected batch file and refresh the manifest (as if the source gave it)."""
    manifest = read_json(paths.raw / "manifest.json")
    file = paths.raw / manifest["batches"][0]["file"]
    df = change(pd.read_parquet(file))
    df.to_parquet(file, index=False)
    manifest["batches"][0]["rows"] = len(df)
    manifest["batches"][0]["sha256"] = file_digest(file)
    write_json(paths.raw / "manifest.json", manifest)


def test_each_malformed_row_is_quarantined_with_its_reason(tmp_path):
    settings = load_settings(write_params(tmp_path, **{"source.simulator.malformed_share": 0}))
    paths = Paths(tmp_path)
    collect.run(settings, paths)

    def break_rows(df):
        # a text column, as a CSV export gives: one value is not a number
        df["income"] = df["income"].map(lambda v: None if pd.isna(v) else str(v)).astype(object)
        df.loc[1, "age"] = 12
        df.loc[2, "purpose"] = "lottery"
        df.loc[3, "region"] = None
        df.loc[4, "loan_id"] = df.loc[5, "loan_id"]
        df.loc[6, "income"] = "lots"
        df.loc[7, "home_ownership"] = "  MORTGAGE "  # messy but valid: normalized, not quarantined
        return df

    _corrupt(paths, break_rows)
    validate.run(settings, paths)
    q = pd.read_parquet(paths.quarantine / "quarantine.parquet").set_index("__row__")[REASONS]
    assert "expect_column_values_to_be_between(age)" in q[1]
    assert "expect_column_values_to_be_in_set(purpose): 'lottery'" in q[2]
    assert "expect_column_values_to_not_be_null(region)" in q[3]
    assert "expect_column_values_to_be_unique(loan_id)" in q[5]  # the later duplicate goes, the first stays
    assert "expect_column_values_to_be_of_type(income): 'lots'" in q[6]
    assert pd.read_parquet(paths.quarantine / "quarantine.parquet").set_index("__row__").loc[6, "income"] == "lots"
    assert 7 not in q.index and 4 not in q.index


def test_missing_column_stops_with_named_column(project):
    settings, paths = project
    collect.run(settings, paths)
    _corrupt(paths, lambda df: df.drop(columns=["credit_score"]))
    with pytest.raises(DataValidationError, match="'credit_score' is missing"):
        validate.run(settings, paths)
    assert read_json(paths.reports / "validation.json")["status"] == "failed"


def test_bad_share_over_threshold_stops(project):
    settings, paths = project
    collect.run(settings, paths)
    _corrupt(paths, lambda df: df.assign(age=np.where(np.arange(len(df)) % 2 == 0, 500.0, df["age"])))
    with pytest.raises(DataValidationError, match="failed expectations"):
        validate.run(settings, paths)
    assert (paths.quarantine / "quarantine.parquet").is_file()
    assert not (paths.validated / "data.parquet").exists()


def test_truncated_file_is_a_clear_error(project):
    settings, paths = project
    collect.run(settings, paths)
    file = next(paths.raw.glob("batch_*.parquet"))
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(DataValidationError, match="cannot be read"):
        validate.run(settings, paths)


def test_tampered_batch_stops_with_its_name_and_the_fix(project):
    settings, paths = project
    collect.run(settings, paths)
    manifest = read_json(paths.raw_manifest)
    entry = manifest["batches"][1]
    file = paths.raw / entry["file"]
    df = pd.read_parquet(file)
    df.loc[0, "income"] = df["income"].max()  # a plausible edit: every row still passes the expectations
    df.to_parquet(file, index=False)
    with pytest.raises(DataValidationError) as err:
        validate.run(settings, paths)
    message = str(err.value)
    assert f"batch {entry['batch']}" in message and str(paths.raw_manifest) in message
    assert f"amaas collect --rerun {entry['batch']}" in message
    assert not (paths.validated / "data.parquet").exists()

    collect.run(settings, paths, rerun=entry["batch"])  # the fix the message names
    assert file_digest(file) == entry["sha256"]
    assert validate.run(settings, paths)["status"] == "passed"


def test_empty_batch_stops_with_the_row_count_expectation(project):
    settings, paths = project
    collect.run(settings, paths)
    _corrupt(paths, lambda df: df.head(0))
    with pytest.raises(DataValidationError, match="batch 2026-01-01: expect_table_row_count_to_be_between failed"):
        validate.run(settings, paths)
    report = read_json(paths.reports / "validation.json")
    assert report["failure"] == "batch_expectations" and report["rows_in"] == 2000


def test_wrong_type_and_renamed_column_stop_with_named_columns(project):
    settings, paths = project
    collect.run(settings, paths)
    _corrupt(paths, lambda df: df.assign(credit_score="high").rename(columns={"region": "Region"}))
    with pytest.raises(DataValidationError) as err:
        validate.run(settings, paths)
    message = str(err.value)
    assert "column 'region' is missing (the batch has unexpected column(s) 'Region': renamed?)" in message
    assert "column 'credit_score' should be numeric but has type object" in message


def test_user_expectations_are_added_to_the_generated_suite(tmp_path):
    (tmp_path / "rules.json").write_text(json.dumps([
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "interest_rate", "max_value": 15}},
    ]))
    settings = load_settings(write_params(tmp_path, **{"validate.expectations_file": "rules.json"}))
    paths = Paths(tmp_path)
    collect.run(settings, paths)
    validate.run(settings, paths)
    quarantine = pd.read_parquet(paths.quarantine / "quarantine.parquet")
    user_rule = quarantine[quarantine[REASONS].str.contains("be_between(interest_rate)", regex=False)]
    assert len(user_rule) > 0 and (user_rule["interest_rate"].astype(float) > 15).all()
    details = read_json(paths.reports / "validation_details.json")
    assert details["expectations"]["expect_table_row_count_to_be_between"]["success"]

    (tmp_path / "rules.json").write_text("{not json")
    with pytest.raises(DataValidationError, match="rules.json is not a JSON list of expectations"):
        validate.run(settings, paths)


def test_data_docs_have_a_page_per_batch(project):
    settings, paths = project
    collect.run(settings, paths)
    validate.run(settings, paths)
    docs = paths.reports / "data_docs"
    assert (docs / "index.html").is_file()
    pages = sorted(p.parent.parent.name for p in (docs / "validations").rglob("*.html"))
    assert pages == ["2026-01-01", "2026-01-02", "2026-01-03"]
    page = next((docs / "validations").rglob("*.html")).read_text()
    assert "values must never be null" in page and "credit_score" in page
    assert (docs / "expectations" / "amaas_suite.html").is_file()


def test_normalizing_categories_can_be_switched_off(tmp_path):
    settings = load_settings(write_params(tmp_path, **{"clean.normalize_categories": False,
                                                       "source.simulator.malformed_share": 0}))
    paths = Paths(tmp_path)
    collect.run(settings, paths)
    validate.run(settings, paths)
    quarantine = pd.read_parquet(paths.quarantine / "quarantine.parquet")
    # the simulator spells ~3% of home_ownership messily ("  RENT  "): valid only once normalized
    assert len(quarantine) > 0
    messy = r"expect_column_values_to_be_in_set\(home_ownership\): '\s*[A-Z]+\s*'"  # the reason shows the value
    assert quarantine[REASONS].str.fullmatch(messy).all()
