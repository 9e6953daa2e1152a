"""Cleaning configured in params (`clean`) is fitted into the transform, saved with it, and applied the same."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.config import CleanConfig, load_settings
from pipelines.sources.simulator import generate_batch
from pipelines.transform import UNKNOWN, FeatureTransform
from tests.conftest import write_params


@pytest.fixture(scope="module")
def sample_rows(tmp_path_factory):
    settings = load_settings(write_params(tmp_path_factory.mktemp("p"), **{"source.simulator.malformed_share": 0}))
    return settings.data_schema, generate_batch(settings.source.simulator, 1, 0)


@pytest.mark.parametrize("impute", ["median", "mean", "zero"])
def test_imputation_fills_with_the_fitted_value(sample_rows, impute):
    schema, rows = sample_rows
    t = FeatureTransform.fit(rows, schema, CleanConfig(impute=impute, clip_quantiles=None))
    income = rows["income"]
    expected = {"median": income.median(), "mean": income.mean(), "zero": 0.0}[impute]
    assert t.fill_values["income"] == pytest.approx(expected)
    row = rows.iloc[[0]].assign(income=np.nan)
    scaled = t.transform(row)["income"].iloc[0]
    assert scaled == pytest.approx((expected - t.means["income"]) / t.stds["income"])


def test_clipping_and_indicators_follow_the_config(sample_rows, tmp_path):
    schema, rows = sample_rows
    clipped = FeatureTransform.fit(rows, schema, CleanConfig(clip_quantiles=(0.05, 0.95)))
    plain = FeatureTransform.fit(rows, schema, CleanConfig(clip_quantiles=None, missing_indicators=False))
    outlier = rows.iloc[[0]].assign(loan_amount=1e9)
    assert clipped.transform(outlier)["loan_amount"].iloc[0] < plain.transform(outlier)["loan_amount"].iloc[0]
    assert "income_missing" in clipped.feature_names and "income_missing" not in plain.feature_names
    assert list(plain.transform(rows.head(5)).columns) == plain.feature_names

    plain.save(tmp_path / "t.json")  # the choices travel with the transform to serving
    loaded = FeatureTransform.load(tmp_path / "t.json")
    assert loaded == plain and not loaded.missing_indicators
    pd.testing.assert_frame_equal(loaded.transform(rows), plain.transform(rows))


def test_category_normalization_can_be_off(sample_rows):
    schema, rows = sample_rows
    messy = rows.iloc[[0]].assign(home_ownership="  RENT ")
    normalizing = FeatureTransform.fit(rows, schema, CleanConfig())
    exact = FeatureTransform.fit(rows, schema, CleanConfig(normalize_categories=False))
    assert normalizing.transform(messy)["home_ownership"].iloc[0] == normalizing.vocab["home_ownership"].index(
        "rent") + 1
    # without normalization each spelling is its own category, and an unseen spelling is unknown
    assert "  RENT  " in exact.vocab["home_ownership"] and "  RENT  " not in normalizing.vocab["home_ownership"]
    assert exact.transform(messy)["home_ownership"].iloc[0] == UNKNOWN
