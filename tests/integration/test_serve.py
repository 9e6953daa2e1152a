"""A real `amaas serve` (bentoml serve of the champion's bento) on localhost answers predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import requests

from pipelines.bundle import ModelBundle
from pipelines.registry import Registry
from tests.conftest import served

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(trained_project):
    with served(trained_project) as url:
        yield url


def test_prediction_equals_offline_predict_proba(server, trained_project):
    champion = Registry(trained_project / "models" / "registry").champion
    bundle = ModelBundle.load(trained_project / "models" / "registry" / "versions" / champion)
    test = pd.read_parquet(trained_project / "data" / "reference" / "test.parquet").head(64)
    rows = test[bundle.transform.numeric + bundle.transform.categorical]
    payload = {"rows": [{k: (None if pd.isna(v) else v) for k, v in r.items()} for r in rows.to_dict("records")]}

    response = requests.post(f"{server}/predict", json=payload, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body) == len(rows)
    assert {b["model_version"] for b in body} == {champion}
    served = np.array([b["probability"] for b in body])
    np.testing.assert_allclose(served, bundle.predict_proba(rows), rtol=1e-9, atol=1e-12)
    assert [b["label"] for b in body] == [int(p >= 0.5) for p in served]


def test_raw_messy_input_is_cleaned_like_training(server):
    row = {"age": 41, "income": None, "loan_amount": 12000, "term_months": 60, "interest_rate": 14.5,
           "credit_score": 610, "debt_to_income": None, "employment_years": 3, "open_accounts": 7,
           "delinquencies_2y": 1, "home_ownership": "  RENT ", "purpose": "credit_card", "region": "south"}
    first = requests.post(f"{server}/predict", json={"rows": [row]}, timeout=30).json()
    second = requests.post(f"{server}/predict", json={"rows": [{**row, "home_ownership": "rent"}]}, timeout=30).json()
    assert 0 < first[0]["probability"] < 1
    assert first[0]["probability"] == second[0]["probability"]
