"""Hard bounds against reference ranges: what validation quarantines and serving refuses (hard bounds only),
what is answered, counted and reported as drift (outside the reference range), and rows sent as the table
has them (id and time columns) or with categories the model never saw."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipelines.bundle import ModelBundle
from pipelines.config import ConfigError, load_settings
from pipelines.serving.cache import ResponseCache
from pipelines.serving.metrics import served_metrics
from pipelines.stages import report
from pipelines.state.predlog import PredictionRecord
from pipelines.transform import FeatureTransform
from tests.conftest import files_state, write_params
from tests.unit.test_serving import ROW, _App, _call

AGE = {"min": 18, "max": 100, "reference": [25, 60]}  # hard: impossible ages; reference: what training saw


@pytest.fixture
def gateway(tmp_path):
    from pipelines.serving.gateway import Gateway
    from pipelines.state.keys import ApiKeys

    params = write_params(tmp_path, **{"schema.numeric.age": AGE})
    app = _App()
    key = ApiKeys(tmp_path / "keys.json").add("t")
    gw = Gateway(app, lambda: load_settings(params), files_state(tmp_path / "keys.json"), lambda: (0.0, False),
                 lambda: {"champion": "v1", "challenger": None}, app.predict)
    return gw, app, {"X-API-Key": key}


def test_serving_refuses_only_what_is_impossible(gateway):
    gw, app, auth = gateway
    status, _, _ = _call(gw, "/predict", json.dumps({"row": {**ROW, "age": 70}}).encode(), auth)
    assert status == 200 and app.predicted[-1][0]["age"] == 70  # outside the reference range: answered
    status, _, body = _call(gw, "/predict", json.dumps({"row": {**ROW, "age": 101}}).encode(), auth)
    assert status == 422 and body["detail"][0]["loc"] == ["row", "age"]  # beyond a hard bound


def test_a_row_as_the_table_has_it_with_its_id_and_time_is_served(gateway):
    gw, app, auth = gateway
    for when in ("2026-03-01T10:00:00", 1_772_000_000, None):
        row = {**ROW, "loan_id": "L-17", "event_time": when}
        status, _, _ = _call(gw, "/predict", json.dumps({"row": row}).encode(), auth)
        assert status == 200, when
    assert app.predicted[-1][0]["loan_id"] == "L-17"
    status, _, _ = _call(gw, "/predict", json.dumps({"row": {**ROW, "shoe_size": 9}}).encode(), auth)
    assert status == 422  # a column the table does not have is still refused


def test_old_params_keep_min_max_as_hard_bounds_and_a_bad_reference_names_the_fix(tmp_path):
    settings = load_settings(write_params(tmp_path / "old"))  # the shipped params: min/max only
    rule = settings.data_schema.numeric["age"]
    assert (rule.min, rule.max, rule.reference) == (18, 100, None)
    assert not rule.outside_reference(pd.Series([1.0, 500.0])).any()  # no reference range: nothing is drift
    with pytest.raises(ConfigError, match=r"reference \[60.0, 25.0\] must be \[low, high\]"):
        load_settings(write_params(tmp_path / "bad", **{"schema.numeric.age": {"reference": [60, 25]}}))


class _Fixed:
    """An ensemble stand-in: the same probabilities for every row."""

    def predict_output(self, features: pd.DataFrame) -> np.ndarray:
        return np.tile([0.8, 0.2], (len(features), 1))


def _bundle() -> ModelBundle:
    transform = FeatureTransform(
        numeric=["age"], categorical=["home"], normalize=True, impute="median", missing_indicators=False,
        fill_values={"age": 40.0}, clip_low={"age": 18.0}, clip_high={"age": 90.0}, means={"age": 40.0},
        stds={"age": 10.0}, vocab={"home": ["own", "rent"]}, nullable=["home"], task="binary", classes=[0, 1],
        reference={"age": [25.0, 60.0]})
    return ModelBundle(transform=transform, ensemble=_Fixed(), metadata={"version": "v1"})  # type: ignore[arg-type]


def test_unseen_categories_and_values_outside_the_reference_are_answered_and_counted():
    bundle, cache = _bundle(), ResponseCache(10)
    rows: list[dict[str, Any]] = [{"age": 41.0, "home": "Rent "}, {"age": 70.0, "home": "castle"},
                                  {"age": 20.0, "home": None}, {"age": None, "home": "castle"}]
    answers = cache.answers(bundle, rows)
    assert [a.get("unseen") for a in answers] == [None, ["home"], None, ["home"]]  # null: the missing category
    assert [a.get("out_of_reference") for a in answers] == [None, ["age"], ["age"], None]
    assert all(a["label"] == 0 for a in answers)  # every row is answered
    assert cache.answers(bundle, rows[1:2])[0]["unseen"] == ["home"]  # from the cache, counted again
    assert cache.stats()["unseen"] == {"home": 3} and cache.stats()["out_of_reference"] == {"age": 3}
    text = served_metrics({"champion": "v1", "challenger": None, "canary_share": 0.0, "shadow": False},
                          cache.stats())
    assert 'amaas_unseen_category_rows_total{column="home"} 3.0' in text
    assert 'amaas_out_of_reference_rows_total{column="age"} 3.0' in text
    logged = PredictionRecord(request_id="r", **{k: answers[1][k] for k in ("label", "unseen", "out_of_reference")})
    again = PredictionRecord.from_json(logged.to_json())
    assert (again.unseen, again.out_of_reference) == (["home"], ["age"])  # the prediction log keeps them


def test_the_drift_report_counts_values_outside_the_reference_range(tmp_path):
    schema = load_settings(write_params(tmp_path, **{"schema.numeric.age": AGE})).data_schema
    current = pd.DataFrame({"age": [30.0, 61.0, 99.0, None, 40.0], "income": [1.0] * 5})
    found = report.out_of_reference(current, schema)
    assert found == {"age": {"rows": 2, "share": 0.4, "reference": [25.0, 60.0], "seen": [61.0, 99.0]}}
    assert report.out_of_reference(current.assign(age=[30.0] * 5), schema) == {}


def test_notices_spell_each_distinct_category_once_and_say_what_each_row_would_say_alone():
    transform = _bundle().transform
    homes = [" RENT", "castle", None, float("nan"), "own", "castle", "Own ", 7, "rent", None]
    ages = [41.0, 70.0, None, 20.0, "not a number", 61.0, 25.0, 60.0, float("nan"), 18.0]
    frame = pd.DataFrame({"age": pd.Series(ages, dtype=object), "home": pd.Series(homes, dtype=object)})
    many = transform.notices(frame)
    alone = [transform.notices(frame.iloc[[i]].reset_index(drop=True))[0] for i in range(len(frame))]
    assert many == alone  # rows sharing a value are noticed exactly as one row with it
    assert [n.get("unseen") for n in many] == [None, ["home"], None, None, None, ["home"], None, ["home"], None, None]
    assert [n.get("out_of_reference") for n in many] == [None, ["age"], None, ["age"], None, ["age"], None, None,
                                                         None, ["age"]]
