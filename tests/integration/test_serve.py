"""A real `amaas serve` (bentoml serve of the champion's bento) on localhost: predictions equal offline
scoring, auth, request validation and limits, the prediction log, canary and shadow traffic, and a
rollback while requests keep coming."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time

import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from sklearn.metrics import roc_auc_score

from pipelines.bundle import ModelBundle
from pipelines.config import load_settings
from pipelines.registry import Registry
from pipelines.runner import STAGES
from pipelines.state.predlog import read_prediction_log
from tests.conftest import amaas, served

pytestmark = pytest.mark.slow

ROW = {"age": 41, "income": None, "loan_amount": 12000, "term_months": 60, "interest_rate": 14.5,
       "credit_score": 610, "debt_to_income": None, "employment_years": 3, "open_accounts": 7,
       "delinquencies_2y": 1, "home_ownership": "  RENT ", "purpose": "credit_card", "region": "south"}


def test_prediction_equals_offline_predict_proba(server, trained_project):
    champion = Registry(trained_project / "models" / "registry").champion
    bundle = ModelBundle.load(trained_project / "models" / "registry" / "versions" / champion)
    assert bundle.metadata["compressed_as"] == "student" and bundle.ensemble.names == ["student_lightgbm"]
    test = pd.read_parquet(trained_project / "data" / "reference" / "test.parquet").head(64)
    rows = test[bundle.transform.numeric + bundle.transform.categorical]
    payload = {"rows": [{k: (None if pd.isna(v) else v) for k, v in r.items()} for r in rows.to_dict("records")]}

    response = server.session.post(f"{server.url}/predict", json=payload, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body) == len(rows)
    assert {b["model_version"] for b in body} == {champion}
    served_proba = np.array([b["probability"] for b in body])
    np.testing.assert_allclose(served_proba, bundle.predict(rows)[:, 1], rtol=1e-9, atol=1e-12)
    assert [b["label"] for b in body] == [int(p >= bundle.threshold) for p in served_proba]
    for b in body:  # each class's probability, by the class label as the data spells it
        assert b["probabilities"] == pytest.approx({"0": 1 - b["probability"], "1": b["probability"]}, abs=1e-12)
    assert len({b["request_id"] for b in body}) == 1 == len({response.headers["x-request-id"]})


def test_raw_messy_input_is_cleaned_like_training(server):
    first = server.session.post(f"{server.url}/predict", json={"row": ROW}, timeout=30).json()
    second = server.session.post(f"{server.url}/predict", json={"rows": [{**ROW, "home_ownership": "rent"}]},
                                 timeout=30).json()
    assert 0 < first[0]["probability"] < 1
    assert first[0]["probability"] == second[0]["probability"]


def test_api_keys_are_required_and_health_stays_open(server, trained_project):
    assert requests.post(f"{server.url}/predict", json={"row": ROW}, timeout=30).status_code == 401
    wrong = requests.post(f"{server.url}/predict", json={"row": ROW}, timeout=30,
                          headers={"Authorization": "Bearer amaas_not-a-key"})
    assert wrong.status_code == 401 and "amaas keys add" in wrong.json()["error"]
    for path in ("/readyz", "/livez", "/metrics", "/docs", "/docs.json"):
        assert requests.get(f"{server.url}{path}", timeout=30).status_code == 200, path
    assert "/predict" in requests.get(f"{server.url}/docs.json", timeout=30).json()["paths"]
    assert "bentoml_service_request" in requests.get(f"{server.url}/metrics", timeout=30).text
    created = amaas("keys", "add", "temporary", root=trained_project).stdout.strip()
    stored_text = (trained_project / ".amaas" / "api_keys.json").read_text()
    stored = json.loads(stored_text)  # hashes only (other tests of the session add keys with scopes and limits)
    assert created not in stored_text and set(stored["temporary"]) == {"sha256", "created"}
    assert all(set(entry) <= {"sha256", "created", "scopes", "rps", "burst", "daily_quota"}
               for entry in stored.values())
    ok = requests.post(f"{server.url}/predict", json={"row": ROW}, timeout=30,
                       headers={"Authorization": f"Bearer {created}"})
    assert ok.status_code == 200
    amaas("keys", "revoke", "temporary", root=trained_project)
    revoked = requests.post(f"{server.url}/predict", json={"row": ROW}, timeout=30,
                            headers={"Authorization": f"Bearer {created}"})
    assert revoked.status_code == 401


def test_bad_requests_get_422_with_field_errors_and_413_over_the_limits(server, trained_project):
    post = server.session.post
    wrong_type = post(f"{server.url}/predict", json={"rows": [{**ROW, "age": "forty"}]}, timeout=30)
    assert wrong_type.status_code == 422
    assert wrong_type.json()["detail"][0]["loc"] == ["rows", 0, "age"]
    missing = post(f"{server.url}/predict", json={"rows": [{k: v for k, v in ROW.items() if k != "region"}]},
                   timeout=30)
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["rows", 0, "region"]
    out_of_range = post(f"{server.url}/predict", json={"row": {**ROW, "credit_score": 9999}}, timeout=30)
    assert out_of_range.status_code == 422 and out_of_range.json()["detail"][0]["loc"] == ["row", "credit_score"]
    unknown = post(f"{server.url}/predict", json={"row": {**ROW, "salary": 1}}, timeout=30)
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["row", "salary"]
    assert post(f"{server.url}/predict", data=b"{not json", timeout=30).status_code == 422
    limit = load_settings(trained_project / "params.yaml").serve.max_rows
    assert post(f"{server.url}/predict", json={"rows": [ROW] * (limit + 1)}, timeout=30).status_code == 413
    # a request of as many rows as the limits allow is one model call: answered, never shed
    full = post(f"{server.url}/predict", json={"rows": [ROW] * limit}, timeout=30)
    assert full.status_code == 200 and len(full.json()) == limit
    huge = post(f"{server.url}/predict", data=b'{"rows": [' + b" " * 2_000_000 + b"]}", timeout=30)
    assert huge.status_code == 413


def test_every_answered_prediction_is_in_the_log(server, trained_project):
    rid = f"log-check-{time.time_ns()}"
    sent = [{**ROW, "loan_id": 77, "event_time": "2026-12-07T10:00:00"}, ROW]  # a row as the table has it
    answer = server.session.post(f"{server.url}/predict", json={"rows": sent}, headers={"X-Request-ID": rid},
                                 timeout=30).json()
    logged = [r for r in read_prediction_log(trained_project / "logs" / "predictions") if r.request_id == rid]
    assert [r.probability for r in logged] == [a["probability"] for a in answer]
    assert logged[0].id == 77 and logged[0].features["credit_score"] == 610
    assert logged[0].row_time == "2026-12-07T10:00:00" and "event_time" not in logged[0].features
    assert logged[0].features["home_ownership"] == "  RENT "  # as received; the model cleans it
    assert {r.model_version for r in logged} == {answer[0]["model_version"]}
    assert len({r.key_name for r in logged}) == 1 and logged[0].key_name.startswith("tests-")  # its name, not the key
    lines = [json.loads(line) for file in (trained_project / "logs" / "predictions").glob("*.jsonl")
             for line in file.read_text().splitlines()]
    assert [list(line) for line in lines if line["request_id"] == rid] == [  # the format on disk
        ["time", "label", "probabilities", "probability", "model_version", "request_id", "key_name", "route", "id",
         "row_time", "features"],
        ["time", "label", "probabilities", "probability", "model_version", "request_id", "key_name", "route", "id",
         "features"]]


def test_explain_answers_why_with_the_keys_of_predict_logged_and_counted(server, trained_project):
    rid = f"explain-{time.time_ns()}"
    sent = [ROW, {**ROW, "credit_score": 780, "home_ownership": "own", "income": 90000}]
    response = server.session.post(f"{server.url}/explain", json={"rows": sent}, headers={"X-Request-ID": rid},
                                   timeout=30)
    assert response.status_code == 200, response.text
    explained = response.json()
    predicted = server.session.post(f"{server.url}/predict", json={"rows": sent}, timeout=30).json()
    columns = set(ModelBundle.load(trained_project / "models" / "challenger").transform.numeric) | set(
        ModelBundle.load(trained_project / "models" / "challenger").transform.categorical)
    for answer, same in zip(explained, predicted, strict=True):
        why = answer.pop("explanation")
        assert {k: v for k, v in answer.items() if k != "request_id"} == {
            k: v for k, v in same.items() if k != "request_id"}  # the answer of /predict, with why
        assert why["output"] == "probability" and "student_lightgbm (tree SHAP)" in why["method"]
        for name, p in answer["probabilities"].items():  # base + contributions = the answer, per class
            assert set(why["contributions"][name]) == columns
            assert why["base"][name] + sum(why["contributions"][name].values()) == pytest.approx(p, rel=1e-6)
    logged = [r for r in read_prediction_log(trained_project / "logs" / "predictions") if r.request_id == rid]
    assert len(logged) == 2 and all(r.explained for r in logged)
    assert [r.probability for r in logged] == [a["probability"] for a in explained]
    metrics = requests.get(f"{server.url}/metrics", timeout=30).text
    assert float(re.search(r"^amaas_explained_rows_total (\S+)$", metrics, re.M)[1]) >= 2
    admin = amaas("keys", "add", f"explain-admin-{time.time_ns()}", "--scope", "admin",
                  root=trained_project).stdout.strip()
    refused = requests.post(f"{server.url}/explain", json={"row": ROW}, timeout=30,
                            headers={"Authorization": f"Bearer {admin}"})
    assert refused.status_code == 403 and "'predict' scope" in refused.json()["error"]
    assert requests.post(f"{server.url}/explain", json={"row": ROW}, timeout=30).status_code == 401
    docs = requests.get(f"{server.url}/docs.json", timeout=30).json()
    explained = docs["paths"]["/explain"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert explained["items"] == {"$ref": "#/components/schemas/ExplainedAnswer"}
    assert "explanation" in docs["components"]["schemas"]["ExplainedAnswer"]["properties"]


def test_monitoring_judges_served_predictions_and_joins_delayed_labels(server, trained_project, tmp_path):
    validated = pd.read_parquet(trained_project / "data" / "validated" / "data.parquet")
    rows = validated.sample(300, random_state=1)
    transform = ModelBundle.load(trained_project / "models" / "challenger").transform
    features = [*transform.numeric, *transform.categorical]
    payload = [{k: (None if pd.isna(v) else v) for k, v in r.items()}
               for r in rows[["loan_id", *features]].to_dict("records")]
    for part in (payload[:150], payload[150:]):  # within serve.max_rows
        assert server.session.post(f"{server.url}/predict", json={"rows": part}, timeout=60).status_code == 200
    assert server.session.post(f"{server.url}/predict", json={"row": ROW}, timeout=60).status_code == 200  # no id

    root = tmp_path / "project"
    root.mkdir()
    for part in ("params.yaml", "data/validated", "models/registry", "logs"):
        (shutil.copytree if (trained_project / part).is_dir() else shutil.copy2)(trained_project / part, root / part)
    # one key sent nearly all rows here; report.max_key_share (unit-tested) would thin them to the others'
    _set_params(root, "report", current="prediction_log", min_labeled_rows=100, max_key_share=1.0)
    amaas("report", root=root)
    summary = json.loads((root / "reports" / "drift_details.json").read_text())

    logged = pd.DataFrame([r.to_dict() for r in read_prediction_log(root / "logs" / "predictions")])
    labels = validated.drop_duplicates("loan_id").set_index("loan_id")["default"]
    joined = logged[logged["id"].isin(labels.index)]
    assert summary["current_rows"] == len(logged) and summary["labeled_rows"] == len(joined) >= 300
    expected = roc_auc_score(labels.loc[joined["id"].astype("int64")].to_numpy(), joined["probability"].to_numpy())
    assert summary["metric_current"] == pytest.approx(expected, abs=1e-6)
    assert summary["prediction_drift"] is not None and summary["n_columns"] == len(features)
    assert (root / "reports" / "performance.html").stat().st_size > 10_000


def _set_params(root, section: str, **values) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def _serve_params(root, **serve) -> None:
    _set_params(root, "serve", reload_interval_s=0.5, **serve)


def test_a_release_the_service_never_takes_up_is_rolled_back(two_models, tmp_path):
    source, champion, challenger = two_models
    root = tmp_path / "project"
    shutil.copytree(source, root, symlinks=True)
    amaas("promote", "--force", "--reason", "test", root=root)
    _set_params(root, "deploy", endpoint="http://127.0.0.1:9", timeout_s=1)  # nothing listens there
    failed = amaas("deploy", root=root, check=False)
    assert failed.returncode == 2 and "did not serve champion" in failed.stderr
    assert f"the registry is back on {champion}" in failed.stderr
    assert Registry(root / "models" / "registry").champion == champion
    assert Registry(root / "models" / "registry").decisions()[-1]["action"] == "rollback"
    assert json.loads((root / "models" / "deployment.json").read_text())["champion"] == champion  # still live


def _cache_metrics(server) -> dict[str, float]:
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    return {name: float(value) for name, value in re.findall(r"^amaas_cache_(\w+) (\S+)$", text, re.M)}


def test_canary_shadow_and_rollback_while_serving(two_models):
    """With the response cache on: the same row again and again, answered by two versions (canary, shadow)."""
    root, champion, challenger = two_models
    _serve_params(root, canary_share=0.3, cache={"size": 1000})
    with served(root) as server:
        answers = [server.session.post(f"{server.url}/predict", json={"row": ROW}, timeout=30,
                                       headers={"X-Request-ID": f"canary-{i}"}).json()[0] for i in range(400)]
        versions = [a["model_version"] for a in answers]
        for version in (champion, challenger):  # a cached answer is the model's: the same as offline scoring
            bundle = ModelBundle.load(root / "models" / "registry" / "versions" / version)
            offline = bundle.answers(pd.DataFrame([ROW]))[0]["probability"]
            served_probability = {a["probability"] for a in answers if a["model_version"] == version}
            assert len(served_probability) == 1 and served_probability.pop() == pytest.approx(offline, rel=1e-9)
        assert _cache_metrics(server)["hits_total"] >= 398  # one miss per version
        logged = {r.request_id for r in read_prediction_log(root / "logs" / "predictions")}
        assert {f"canary-{i}" for i in range(400)} <= logged  # cached answers are logged like any other
        share = versions.count(challenger) / len(versions)
        # the route is a hash of the request id: 400 ids give a binomial share, sd 0.023; allow 3.5 sd
        assert abs(share - 0.3) < 0.08, share
        assert set(versions) == {champion, challenger}
        again = server.session.post(f"{server.url}/predict", json={"row": ROW}, timeout=30,
                                    headers={"X-Request-ID": "canary-7"}).json()[0]["model_version"]
        assert again == versions[7]  # a retry with the same id lands on the same model

        _serve_params(root, canary_share=0.0, shadow=True)  # the server follows params.yaml while running
        deadline = time.monotonic() + 20
        while True:
            rid = f"shadow-{time.monotonic_ns()}"
            answer = server.session.post(f"{server.url}/predict", json={"row": ROW}, timeout=30,
                                         headers={"X-Request-ID": rid}).json()[0]
            record = next(r for r in read_prediction_log(root / "logs" / "predictions") if r.request_id == rid)
            if record.shadow is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert answer["model_version"] == champion and record.shadow_model_version == challenger
        assert record.shadow["probability"] != answer["probability"]

        distinct = [{**ROW, "age": age} for age in range(20, 60)]
        assert server.session.post(f"{server.url}/predict", json={"rows": distinct}, timeout=30).status_code == 200
        assert _cache_metrics(server)["entries"] >= 40

        # promote the challenger by force, then roll back, while a client keeps sending requests
        statuses, seen, stop = [], [], threading.Event()

        def client() -> None:
            while not stop.is_set():
                r = server.session.post(f"{server.url}/predict", json={"row": ROW}, timeout=30)
                statuses.append(r.status_code)
                if r.status_code == 200:
                    seen.append(r.json()[0]["model_version"])

        thread = threading.Thread(target=client)
        thread.start()
        amaas("promote", "--force", "--reason", "test", root=root)
        _set_params(root, "deploy", endpoint=server.url, timeout_s=30)
        amaas("deploy", root=root)  # returns once the live server answers with the new champion
        deployed = json.loads((root / "models" / "deployment.json").read_text())
        assert deployed["verified"] and deployed["served"]["champion"] == challenger
        _wait_for(seen, challenger)
        amaas("rollback", "--reason", "test", root=root)
        _wait_for(seen, champion)
        stop.set()
        thread.join(timeout=30)
        assert _cache_metrics(server)["entries"] <= 3  # emptied by each switch; the client's row since
    assert statuses and set(statuses) == {200}, set(statuses)  # no request dropped while models switched
    switched = [v for i, v in enumerate(seen) if i == 0 or v != seen[i - 1]]
    assert switched[-2:] == [challenger, champion]


def _wait_for(seen: list[str], version: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not (seen and seen[-1] == version):
        assert time.monotonic() < deadline, f"server still answers with {seen[-1:]} instead of {version}"
        time.sleep(0.1)


def test_every_stage_is_costed_and_status_shows_the_served_model(trained_project):
    cost = json.loads((trained_project / "reports" / "cost.json").read_text())
    assert set(cost["stages"]) == set(STAGES)
    assert all(s["status"] == "ok" and s["cpu_s"] > 0 and s["usd"] > 0 for s in cost["stages"].values())
    assert 0 < cost["total"]["usd"] < 0.01  # a retrain of small data at the default price
    status = json.loads(amaas("status", root=trained_project).stdout)
    assert status["champion_serving"]["model"] == "student"
    assert 0 < status["champion_serving"]["usd_per_1k_rows"] < 0.001
    assert status["training_cost"] == cost["total"]
    card = (trained_project / "reports" / "model_card.md").read_text()
    assert "Serves: **student** (serve.model: student)" in card and "per 1,000 predictions" in card
