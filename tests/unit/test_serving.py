"""The serving pieces without a server: keys, routing, the request schema, the gateway, the prediction log,
and the BentoML service module imported without settings."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipelines.config import load_settings
from pipelines.serving.gateway import KEY_NAME, REQUEST_ID, ROUTE, ROUTES, Gateway
from pipelines.serving.metrics import BATCH_PHASES, REQUEST_PHASES, PhaseTimes, served_metrics
from pipelines.serving.routing import route
from pipelines.state.keys import ApiKeys, KeyStoreError
from pipelines.state.predlog import PredictionLog, PredictionRecord, log_entry, read_prediction_log, to_line
from tests.conftest import files_state, write_params

ROW = {"age": 41, "income": None, "loan_amount": 12000, "term_months": 60, "interest_rate": 14.5,
       "credit_score": 610, "debt_to_income": None, "employment_years": 3, "open_accounts": 7,
       "delinquencies_2y": 1, "home_ownership": "rent", "purpose": "car", "region": "south"}


def test_api_keys_are_stored_hashed_and_revocable(tmp_path):
    keys = ApiKeys(tmp_path / "keys.json")
    key = keys.add("app")
    assert key.startswith("amaas_") and len(key) > 40
    assert key not in (tmp_path / "keys.json").read_text()
    assert oct(os.stat(tmp_path / "keys.json").st_mode & 0o777) == "0o600"
    assert keys.valid(key) and not keys.valid(key + "x") and not keys.valid(None)
    with pytest.raises(ValueError, match="exists"):
        keys.add("app")
    keys.revoke("app")
    assert not keys.valid(key)
    with pytest.raises(ValueError, match="no API key named 'app'"):
        keys.revoke("app")


def test_routing_is_a_stable_share_of_request_ids():
    routes = [route(f"r{i}", 0.25, False) for i in range(4000)]
    assert abs(routes.count("challenger") / 4000 - 0.25) < 0.03
    assert routes == [route(f"r{i}", 0.25, False) for i in range(4000)]
    assert {route(f"r{i}", 0.0, False) for i in range(100)} == {"champion"}
    assert {route(f"r{i}", 0.5, True) for i in range(100)} == {"shadow"}


def test_prediction_log_appends_and_skips_a_torn_last_line(tmp_path):
    log = PredictionLog(tmp_path)
    log.append([PredictionRecord(request_id="a", probability=0.1), PredictionRecord(request_id="b", probability=0.2)])
    file = next(tmp_path.glob("*.jsonl"))
    with file.open("a") as fh:
        fh.write('{"request_id": "c", "probab')  # a crash mid-write of an unacknowledged batch
    assert [(r.request_id, r.probability) for r in read_prediction_log(tmp_path)] == [("a", 0.1), ("b", 0.2)]


def test_prediction_records_write_todays_keys_and_read_older_lines(tmp_path):
    answer = {"label": 1, "probabilities": {"0": 0.3, "1": 0.7}, "probability": 0.7}
    record = PredictionRecord(time="2026-01-01T00:00:00.000+00:00", **answer, model_version="v2", request_id="r",
                              route="shadow", id=7, features={"age": 41, "region": None},
                              shadow_model_version="v3", shadow={**answer, "probability": 0.6})
    line = record.to_json()
    assert list(json.loads(line)) == ["time", "label", "probabilities", "probability", "model_version",
                                      "request_id", "route", "id", "features", "shadow_model_version", "shadow"]
    assert PredictionRecord.from_json(line) == record
    # what the service writes without building records: the same bytes
    entry = log_entry(time=record.time, answer=answer, model_version="v2", request_id="r", key_name=None,
                      route="shadow", id=7, features={"age": 41, "region": None}, shadow_model_version="v3",
                      shadow={**answer, "probability": 0.6})
    assert to_line(entry) == record.to_line() == line.encode() + b"\n"
    log = PredictionLog(tmp_path)
    log.append([entry, PredictionRecord(request_id="b", key_name="k", value=float("nan"))])
    assert read_prediction_log(tmp_path) == [record, PredictionRecord(request_id="b", key_name="k")]  # NaN: null
    regression = json.loads(PredictionRecord(time="t", value=3.5, model_version="v", request_id="r",
                                             route="champion").to_json())
    assert regression == {"time": "t", "value": 3.5, "model_version": "v", "request_id": "r", "route": "champion",
                          "id": None, "features": {}}  # id always written, shadow fields only when shadowed
    explained = log_entry(time="t", answer={"value": 3.5}, model_version="v", request_id="r", key_name=None,
                          route="champion", id=None, features={}, explained=True)
    assert list(explained)[-1] == "explained" and PredictionRecord.from_dict(explained).explained
    assert to_line(explained) == PredictionRecord.from_dict(explained).to_line()  # an answer of /explain: flagged

    older = PredictionRecord.from_json('{"time": "t", "key": "h1", "output": {"value": 2.0}, "features": {},'
                                       ' "extra": 1}')
    assert (older.id, older.value, older.output) == ("h1", 2.0, None)
    assert PredictionRecord.from_json('{"time": "t", "output": [0.2, 0.8]}').output == [0.2, 0.8]


class _App:
    """Stands in for BentoML behind the gateway: records the requests passed on to it (`calls`) and the rows the
    gateway had scored (`predicted`, one list per request)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.predicted: list[list[dict]] = []

    async def __call__(self, scope, receive, send) -> None:
        body = (await receive()).get("body", b"")
        self.calls.append((scope["path"], body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"[]"})

    async def predict(self, scope, rows: list[dict]) -> list[dict]:
        self.predicted.append(rows)
        return [{"value": 1.5, "request_id": row[REQUEST_ID]} for row in rows]

    async def explain(self, scope, rows: list[dict]) -> list[dict]:
        self.predicted.append(rows)
        return [{"value": 1.5, "explanation": {"base": 1.0, "contributions": {"age": 0.5}},
                 "request_id": row[REQUEST_ID]} for row in rows]


def _call(gateway: Gateway, path: str, body: bytes, headers: dict[str, Any], method: str = "POST"
          ) -> tuple[int, dict, dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path,
             "headers": [(k.lower().encode(), v if isinstance(v, bytes) else v.encode()) for k, v in headers.items()]}
    asyncio.run(gateway(scope, receive, send))
    start = sent[0]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    try:
        answer = json.loads(payload or b"0")
    except ValueError:  # /metrics: Prometheus text
        answer = payload.decode()
    return start["status"], dict((k.decode(), v.decode()) for k, v in start["headers"]), answer


@pytest.fixture
def gateway(tmp_path):
    params = write_params(tmp_path, **{"serve.max_rows": 3, "serve.max_body_bytes": 4096, "serve.canary_share": 1.0})
    app = _App()
    keys = ApiKeys(tmp_path / "keys.json")
    key = keys.add("t")
    return Gateway(app, lambda: load_settings(params), files_state(tmp_path / "keys.json"), lambda: (1.0, False),
                   lambda: {"champion": "v1", "challenger": None}, app.predict, explain=app.explain), app, key


def test_explain_takes_the_keys_scopes_limits_and_schema_of_predict(gateway, tmp_path):
    gw, app, key = gateway
    admin = ApiKeys(tmp_path / "keys.json").add("ops", scopes=("admin",))
    row = json.dumps({"row": ROW}).encode()
    status, _, body = _call(gw, "/explain", row, {"X-API-Key": admin})
    assert status == 403 and "'predict' scope" in body["error"]
    assert _call(gw, "/explain", row, {})[0] == 401
    assert _call(gw, "/explain", json.dumps({"rows": [ROW] * 4}).encode(), {"X-API-Key": key})[0] == 413
    status, _, body = _call(gw, "/explain", json.dumps({"rows": [{**ROW, "age": 7}]}).encode(), {"X-API-Key": key})
    assert status == 422 and body["detail"][0]["loc"] == ["rows", 0, "age"]
    assert not app.predicted  # nothing refused reached the model
    status, headers, body = _call(gw, "/explain", row, {"X-API-Key": key})
    assert status == 200 and body[0]["explanation"]["contributions"] == {"age": 0.5}
    assert body[0]["request_id"] == headers["x-request-id"] and len(app.predicted) == 1
    alone = Gateway(app, gw.settings, files_state(tmp_path / "keys.json"), lambda: (0.0, False), dict, app.predict)
    assert _call(alone, "/explain", row, {"X-API-Key": key})[0] == 404  # a server that does not explain says so


def test_gateway_reads_settings_on_first_use_not_when_built(gateway, tmp_path):
    gw, _, key = gateway
    loads: list[int] = []

    def settings():
        loads.append(1)
        return gw.settings()

    app = _App()
    lazy = Gateway(app, settings, files_state(tmp_path / "keys.json"), lambda: (0.0, False), dict, app.predict)
    assert not loads  # BentoML builds the middleware at import, before any settings exist
    assert _call(lazy, "/readyz", b"", {}, method="GET")[0] == 200 and not loads  # health needs no settings
    assert _call(lazy, "/predict", json.dumps({"row": ROW}).encode(), {"X-API-Key": key})[0] == 200
    calls = len(loads)
    assert _call(lazy, "/predict", json.dumps({"row": ROW}).encode(), {"X-API-Key": key})[0] == 200
    assert 0 < calls == len(loads)  # read once, then kept


# Checks run in the interpreter of service_module, in this order (the last one turns batching off).
SERVICE_CHECKS = {"challenger": """import bentos.service as s

class Bundle:
    def __init__(self, version): self.version = version

class Registry:
    store = None  # one host: the aliases in files
    def __init__(self, aliases): self._aliases, self.loads = aliases, []
    def aliases(self): return self._aliases
    def load(self, version):
        self.loads.append(version)
        if version == "broken": raise FileNotFoundError("model.txt is missing")
        return Bundle(version)

models = s.Models(Bundle("v1"))
registry = Registry({"champion": "v2", "challenger": "broken"})
models.follow(registry)
assert models.current["champion"].version == "v2" and models.current["challenger"] is None
assert models.routing() == (0.0, False)
models.follow(registry)
assert registry.loads == ["v2", "broken"]  # not tried again every interval
registry._aliases = {"champion": "v2", "challenger": "v3"}
models.follow(registry)
assert models.current["challenger"].version == "v3"

entered = []  # loads happen inside `loading` (the workers' rolling lock), which is taken only to load
class Loading:
    def __enter__(self): entered.append(("in", len(registry.loads)))
    def __exit__(self, *exc): entered.append(("out", len(registry.loads)))
registry._aliases = {"champion": "v3", "challenger": None}  # the challenger promoted: it serves as it is
models.follow(registry, Loading)
assert models.current == {"champion": models.current["champion"], "challenger": None}
assert models.current["champion"].version == "v3" and registry.loads == ["v2", "broken", "v3"] and entered == []
registry._aliases = {"champion": "v4", "challenger": "v5"}
models.follow(registry, Loading)
assert entered == [("in", 3), ("out", 5)] and [b.version for b in models.current.values()] == ["v4", "v5"]
""", "batching": """import asyncio, functools, threading
import pytest
import bentos.service as s

class Factory:  # BentoML's ServiceAppFactory: its routes call its api_endpoint_wrapper
    def __init__(self): self.batched = []
    async def api_endpoint_wrapper(self, name, request): raise AssertionError("not the route")
    async def batch_infer(self, name, args, kwargs):
        self.batched.append((name, args[0]))
        return [{"value": 2.0} for _ in args[0]]

class Route:
    def __init__(self, name, endpoint): self.name, self.endpoint = name, endpoint

factory = Factory()
app = type("App", (), {"routes": [Route("index", lambda request: None),
                                  Route("predict", functools.partial(factory.api_endpoint_wrapper, "predict"))]})()
shared, rows = s._Shared(), [{"a": 1}, {"a": 2}]
assert asyncio.run(shared.predict({"app": app}, rows)) == [{"value": 2.0}] * 2
assert factory.batched == [("predict", rows)]
shared.cached_answer = lambda rows: [{"value": 3.0}] * len(rows) if rows[0]["a"] == 1 else None
assert asyncio.run(shared.predict({"app": app}, rows)) == [{"value": 3.0}] * 2 and len(factory.batched) == 1
assert asyncio.run(shared.predict({"app": app}, [{"a": 2}])) == [{"value": 2.0}] and len(factory.batched) == 2
with pytest.raises(RuntimeError, match="no predict route"):
    asyncio.run(s._Shared().predict({"app": type("App", (), {"routes": []})()}, rows))

s.ARGS.batching = False  # each request on the model's thread, one at a time
threads = []
unbatched = s._Shared()
unbatched.answer = lambda rows: threads.append(threading.current_thread()) or [{"value": 4.0}] * len(rows)
assert asyncio.run(unbatched.predict({"app": app}, rows)) == [{"value": 4.0}] * 2 and len(factory.batched) == 2
assert threads and threads[0] is not threading.main_thread()
"""}


@pytest.fixture(scope="module")
def service_module(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """bentos/service.py imported in an interpreter of its own (it sets OpenMP's policy and BentoML's arguments
    at import), as a server of a project whose params.yaml is missing would import it; then, the project's
    params.yaml written, each check of SERVICE_CHECKS run there in turn, in that one process (importing BentoML
    is most of the cost). Per check: "ok" or the traceback."""
    tmp_path = tmp_path_factory.mktemp("service")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "AMAAS_ROOT": str(tmp_path), "AMAAS_PARAMS": str(tmp_path / "params.yaml"),
           "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    code = f"""
import json, traceback
import bentos.service as s
found = {{"import": [s.settings.cache_info().currsize, s.AmaasService.name]}}
s.PARAMS.write_text({(root / "params.yaml").read_text()!r})
for name, check in {SERVICE_CHECKS!r}.items():
    try:
        exec(check, {{"__name__": name}})
        found[name] = "ok"
    except BaseException:
        found[name] = traceback.format_exc()
print(json.dumps(found))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_service_reads_no_settings(service_module):
    """BentoML imports bentos/service.py to find the service (and `bentoml build` does so at packaging):
    params.yaml is read when the server starts, so a missing one does not break the import."""
    assert service_module["import"] == [0, "amaas_service"]


def test_gateway_answers_401_413_422_and_scores_tagged_rows(gateway):
    gw, app, key = gateway
    auth = {"Authorization": f"Bearer {key}"}
    assert _call(gw, "/predict", json.dumps({"row": ROW}).encode(), {})[0] == 401
    assert _call(gw, "/predict", b"{}", {"X-API-Key": "nope"})[0] == 401
    assert _call(gw, "/predict", json.dumps({"rows": [ROW] * 4}).encode(), auth)[0] == 413
    assert _call(gw, "/predict", b" " * 5000, auth)[0] == 413
    status, _, body = _call(gw, "/predict", json.dumps({"rows": [{**ROW, "age": 7}]}).encode(), auth)
    assert status == 422 and body["detail"][0]["loc"] == ["rows", 0, "age"]
    assert _call(gw, "/predict", json.dumps({"rows": [ROW], "row": ROW}).encode(), auth)[0] == 422
    assert not app.calls and not app.predicted  # nothing invalid reached the model

    status, headers, body = _call(gw, "/predict", json.dumps({"row": ROW}).encode(),
                                  {**auth, "X-Request-ID": "r1", "Content-Type": "text/plain"})  # the body is JSON
    assert status == 200 and headers["x-request-id"] == "r1" and headers["content-type"] == "application/json"
    assert body == [{"value": 1.5, "request_id": "r1"}]  # the service's answers, as JSON
    rows = app.predicted[-1]  # the rows as checked: nothing behind the gateway parses them again
    assert rows[0][REQUEST_ID] == "r1" and rows[0][ROUTE] == "challenger" and not app.calls
    assert rows[0]["home_ownership"] == "rent" and rows[0]["loan_id"] is None
    left_out = {k: v for k, v in ROW.items() if k not in ("income", "debt_to_income")}  # nullable: may be left out
    assert _call(gw, "/predict", json.dumps({"rows": [left_out]}).encode(), auth)[0] == 200
    rows = app.predicted[-1]
    assert rows[0]["income"] is None and rows[0]["debt_to_income"] is None and rows[0]["age"] == 41.0


def test_gateway_leaves_health_metrics_and_docs_open(gateway):
    gw, app, _ = gateway
    for path in ("/readyz", "/metrics", "/docs"):
        assert _call(gw, path, b"", {}, method="GET")[0] == 200
    assert app.calls[-1][0] == "/"  # /docs shows the Swagger UI that BentoML serves at /
    calls = len(app.calls)
    status, _, body = _call(gw, "/models", b"", {}, method="GET")
    assert (status, body) == (200, {"champion": "v1", "challenger": None})
    assert len(app.calls) == calls  # answered by the gateway itself


@pytest.mark.parametrize("task", ["binary", "multiclass", "regression"])
def test_openapi_shows_the_rows_and_the_answer_of_the_task(task, tmp_path):
    import yaml

    from pipelines.config import load_settings
    from pipelines.serving.openapi import document
    from pipelines.serving.schema import answer_model, explained_answer_model, request_schema
    from tests.tables import params_for

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_for(task)))
    schema = load_settings(tmp_path / "params.yaml").data_schema
    doc = document({"title": "t", "version": "v"}, request_schema(schema, 10), answer_model(schema), True,
                   ROUTES, {"max_rows": 10, "max_body_bytes": 1000}, explained_answer_model(schema))
    row = doc["components"]["schemas"]["Row"]
    # no id column in this table; its time column may be sent (not a feature)
    assert set(row["properties"]) == {"day", "x1", "x2", "color", "size"}
    assert set(row["required"]) == {"x1", "color"}  # x2 and size are nullable, day optional
    answer = doc["components"]["schemas"]["Answer"]
    expected = {"binary": {"label", "probability", "probabilities"}, "multiclass": {"label", "probabilities"},
                "regression": {"value"}}[task]
    assert set(answer["properties"]) == expected | {"model_version", "request_id", "unseen", "out_of_reference"}
    explain = doc["paths"]["/explain"]["post"]
    assert explain["requestBody"] == doc["paths"]["/predict"]["post"]["requestBody"]  # the same body
    explained = doc["components"]["schemas"]["ExplainedAnswer"]
    assert explain["responses"]["200"]["content"]["application/json"]["schema"]["items"] == {
        "$ref": "#/components/schemas/ExplainedAnswer"}
    assert set(explained["properties"]) == set(answer["properties"]) | {"explanation"}
    parts = doc["components"]["schemas"]["Explanation"]["properties"]
    assert set(parts) == {"method", "output", "base", "contributions"}
    assert ("additionalProperties" in parts["base"]) is (task != "regression")  # per class, or one number
    json.dumps(doc, allow_nan=False)  # a valid JSON document


def test_openapi_lists_every_route_and_status_and_the_schema_the_gateway_enforces(gateway):
    """Issue 33, item 11: the document once had no 401/403/413/422/429/503 and no admin routes; `{}` passed its
    schema but got 422, and numbers took "30" and true."""
    import jsonschema

    from pipelines.serving.openapi import document
    from pipelines.serving.schema import answer_model, request_schema

    gw, app, key = gateway
    status, _, doc = _call(gw, "/docs.json", b"", {}, method="GET")
    assert status == 200 and doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == set(ROUTES)
    predict = doc["paths"]["/predict"]["post"]
    assert {"200", "401", "403", "413", "422", "429", "503"} <= set(predict["responses"])
    assert {"401", "403"} <= set(doc["paths"]["/admin/drain"]["post"]["responses"])
    for path, methods in ROUTES.items():  # every other method: 405 naming the route's (documented)
        assert "405" in doc["paths"][path][methods[0].lower()]["responses"]
        status, headers, _ = _call(gw, path, b"", {}, method="DELETE")
        assert (status, headers["allow"]) == (405, methods[0])
    # the request schema as a document of its own, its references resolved in the components beside it
    validator = jsonschema.Draft202012Validator({**predict["requestBody"]["content"]["application/json"]["schema"],
                                                 "components": doc["components"]})
    auth = {"X-API-Key": key}
    for request, valid in [({"row": ROW}, True), ({"rows": [ROW, ROW]}, True), ({}, False),
                           ({"row": ROW, "rows": [ROW]}, False), ({"rows": [ROW] * 4}, False),
                           ({"row": {**ROW, "age": "30"}}, False), ({"row": {**ROW, "age": True}}, False),
                           ({"row": {**ROW, "age": 30}}, True), ({"rows": None, "row": ROW}, True)]:
        assert validator.is_valid(request) == valid, request
        assert (_call(gw, "/predict", json.dumps(request).encode(), auth)[0] == 200) == valid, request
    # the document follows the server: a route it does not describe is an error, not a silent gap
    with pytest.raises(RuntimeError, match="/extra"):
        document({}, request_schema(gw.settings().data_schema, 3), answer_model(gw.settings().data_schema), True,
                 {**ROUTES, "/extra": ("GET",)}, {"max_rows": 3, "max_body_bytes": 1})


def test_malformed_requests_get_a_4xx_at_once_and_nothing_escapes(gateway):
    """Issue 16, items 1-3 and 5: each of these once hung 30 s and gave a 500, or grew the logs or /metrics."""
    gw, app, key = gateway
    auth = {"Authorization": f"Bearer {key}"}
    row = json.dumps({"row": ROW}).encode()
    assert _call(gw, "/predict", row, {"X-Junk": b"\xff\xfe"})[0] == 401  # a header that is not UTF-8
    assert _call(gw, "/predict", row, {**auth, "X-Junk": b"\xff"})[0] == 200  # ...is no error with a key
    assert _call(gw, "/predict", row, {"Authorization": b"Bearer \xff\xfe"})[0] == 401
    status, _, body = _call(gw, "/predict", b'{"row": "\xff"}', auth)
    assert status == 422 and "UTF-8" in body["detail"][0]["msg"]
    assert _call(gw, "/predict", b"[" * 1000 + b"]" * 1000, auth)[0] == 422
    assert _call(gw, "/predict", b'{"rows": ' * 400 + b"1" + b"}" * 400, auth)[0] == 422
    assert _call(gw, "/predict", b"[" * 4000, auth)[0] == 422
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        status, _, body = _call(gw, "/predict", b'{"row": {"age": ' + constant + b"}}", auth)
        assert status == 422 and "not a JSON number" in body["detail"][0]["msg"]
    assert _call(gw, "/predict", row, {**auth, "X-Big": "a" * 20_000})[0] == 431
    assert _call(gw, "/predict", row, {**auth, "Content-Length": "-1"})[0] == 400
    for path in ("/nope", "/predict/x", "/static_content/../../etc/passwd", "/static_content/nope.js"):
        assert _call(gw, path, b"", {}, method="GET")[0] == 404, path
    assert _call(gw, "/static_content/swagger-ui.css", b"", {}, method="GET")[0] == 200
    assert len(app.predicted) == 1 and len(app.calls) == 1  # the keyed request with a junk header; the static file


def test_request_ids_are_capped_to_a_safe_alphabet(gateway, caplog):
    gw, app, key = gateway
    auth = {"Authorization": f"Bearer {key}"}
    row = json.dumps({"row": ROW}).encode()
    assert _call(gw, "/predict", row, {**auth, "X-Request-ID": "abc-1.2:3_x"})[1]["x-request-id"] == "abc-1.2:3_x"
    for bad in ("a" * 129, "a b", "a\nforged log line", b"\xff\xfe"):
        with caplog.at_level("WARNING", logger="amaas.gateway"):
            caplog.clear()
            status, headers, _ = _call(gw, "/predict", row, {**auth, "X-Request-ID": bad})
        assert status == 200 and len(headers["x-request-id"]) == 32 and headers["x-request-id"] != bad
        assert app.predicted[-1][0][REQUEST_ID] == headers["x-request-id"]
        assert len(caplog.records) == 1 and len(caplog.records[0].getMessage()) < 300
        assert "\n" not in caplog.records[0].getMessage()


def test_a_422_echoes_little_and_is_strict_json(gateway):
    gw, _, key = gateway
    auth = {"Authorization": f"Bearer {key}"}
    rows = [{**ROW, "age": "x" * 1500, "region": ["y" * 1500]}]
    status, headers, body = _call(gw, "/predict", json.dumps({"rows": rows}).encode(), auth)
    assert status == 422 and body["error"].endswith("invalid field(s)")
    assert int(headers["content-length"]) < 3000
    assert all(len(json.dumps(d["input"])) < 150 for d in body["detail"])
    status, _, body = _call(gw, "/predict", json.dumps({"row": {k: ["x"] for k in ROW}}).encode(), auth)
    assert status == 422 and int(body["error"].split()[0]) > 20 == len(body["detail"])


def test_a_corrupt_key_file_is_a_503_at_once_logged_once(gateway, tmp_path, caplog):
    gw, app, key = gateway
    (tmp_path / "keys.json").write_text('{"t": ')
    with caplog.at_level("ERROR", logger="amaas.gateway"):
        for _ in range(3):
            status, _, body = _call(gw, "/predict", json.dumps({"row": ROW}).encode(), {"X-API-Key": key})
            assert status == 503 and "key store" in body["error"]
    assert len(caplog.records) == 1 and str(tmp_path / "keys.json") in caplog.records[0].getMessage()
    assert _call(gw, "/readyz", b"", {}, method="GET")[0] == 200  # health stays open
    with pytest.raises(KeyStoreError, match="amaas keys add"):
        ApiKeys(tmp_path / "keys.json").names()
    (tmp_path / "keys.json").write_text('{"t": 1}')
    with pytest.raises(KeyStoreError):
        ApiKeys(tmp_path / "keys.json").valid("x")


def test_amaas_keys_list_says_how_to_repair_a_corrupt_file(tmp_path, capsys):
    from pipelines.cli import main

    write_params(tmp_path)
    (tmp_path / ".amaas").mkdir()
    (tmp_path / ".amaas" / "api_keys.json").write_bytes(b"\xff not json")
    assert main(["--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path), "keys", "list"]) == 2
    err = capsys.readouterr().err
    assert "api_keys.json is corrupt" in err and "move it aside" in err and "amaas keys add" in err


def test_shed_requests_say_overloaded_retry_and_log_one_line(tmp_path, caplog):
    from bentoml.exceptions import ServiceUnavailable

    params = write_params(tmp_path)
    keys = ApiKeys(tmp_path / "keys.json")
    key = keys.add("t")

    async def shedding(scope, rows) -> list[dict]:  # what BentoML's batching raises when it sheds load
        raise ServiceUnavailable("process is overloaded")

    gw = Gateway(_App(), lambda: load_settings(params), files_state(tmp_path / "keys.json"), lambda: (0.0, False),
                 dict, shedding)
    with caplog.at_level("WARNING", logger="amaas.gateway"):
        status, headers, body = _call(gw, "/predict", json.dumps({"row": ROW}).encode(),
                                      {"X-API-Key": key, "X-Request-ID": "r9"})
    assert status == 503 and body == {"error": "overloaded, retry", "request_id": "r9"}
    assert headers["retry-after"] == "1" and headers["x-request-id"] == "r9"
    assert len(caplog.records) == 1 and "overloaded" in caplog.records[0].getMessage()
    usage = gw.state.usage()["t"]  # nothing was predicted: a balancer resends it, so its rows are not counted
    assert usage.rows == usage.rows_today == 0 and usage.requests == 1


def test_the_key_name_reaches_the_log_never_the_key(gateway, tmp_path):
    gw, app, key = gateway
    assert _call(gw, "/predict", json.dumps({"row": ROW}).encode(), {"X-API-Key": key})[0] == 200
    assert app.predicted[-1][0][KEY_NAME] == "t"
    log = PredictionLog(tmp_path / "log")
    log.append([PredictionRecord(request_id="a", key_name="t", probability=0.1)])
    file = next((tmp_path / "log").glob("*.jsonl"))
    assert oct(os.stat(file).st_mode & 0o777) == "0o640"
    line = json.loads(file.read_text())
    assert line["key_name"] == "t" and key not in file.read_text()
    assert read_prediction_log(tmp_path / "log")[0].key_name == "t"
    assert PredictionRecord.from_json('{"time": "t", "request_id": "old"}').key_name is None  # older lines
    os.chmod(file, 0o644)  # a file from before: narrowed on the next append
    log.append([PredictionRecord(request_id="b")])
    assert oct(os.stat(file).st_mode & 0o777) == "0o640"


def test_one_key_cannot_steer_the_monitoring_window():
    import pandas as pd

    from pipelines.stages.report import KEY_NAME as LOGGED_KEY
    from pipelines.stages.report import cap_key_share

    window = pd.DataFrame({LOGGED_KEY: ["loud"] * 900 + ["a"] * 60 + ["b"] * 40 + [None] * 100,
                           "x": range(1100)})
    capped = cap_key_share(window, 0.5)
    shares = capped[LOGGED_KEY].fillna("none").value_counts(normalize=True)
    assert shares["loud"] <= 0.5 and shares.max() == shares["loud"]
    assert (capped[LOGGED_KEY] != "loud").sum() == 200  # nobody else loses rows
    assert capped.equals(cap_key_share(window, 0.5))  # deterministic
    loud = capped.loc[capped[LOGGED_KEY] == "loud", "x"]
    assert loud.min() < 100 and loud.max() > 800  # spread over the window, not its start
    assert len(cap_key_share(window, 1.0)) == 1100
    alone = pd.DataFrame({LOGGED_KEY: ["only"] * 50, "x": range(50)})
    assert len(cap_key_share(alone, 0.5)) == 50  # one source: nothing to balance
    several = cap_key_share(window, 0.3)
    assert several[LOGGED_KEY].value_counts().max() <= 0.3 * len(several)  # rows of no key are not capped


def test_an_answer_leaves_the_gateway_only_once_its_rows_are_durable(tmp_path):
    """The batch writes its rows and goes on; the gateway holds the answer until the log's fsync covers it."""
    params = write_params(tmp_path)
    key = ApiKeys(tmp_path / "keys.json").add("t")
    events: list[str] = []

    async def durable() -> None:
        await asyncio.sleep(0.01)  # a slow disk
        events.append("durable")

    async def send(message: dict) -> None:
        events.append(message["type"])

    async def receive() -> dict:
        return {"type": "http.request", "body": json.dumps({"row": ROW}).encode(), "more_body": False}

    app = _App()
    gw = Gateway(app, lambda: load_settings(params), files_state(tmp_path / "keys.json"), lambda: (0.0, False),
                 dict, app.predict, durable=durable)
    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [(b"x-api-key", key.encode())]}
    asyncio.run(gw(scope, receive, send))
    assert events == ["durable", "http.response.start", "http.response.body"]


def test_the_server_makes_no_spans_while_no_trace_is_sampled():
    from pipelines.cli import bentoml_overrides

    config = bentoml_overrides(None, "svc", 2)
    assert config == {"services": {"svc": {"workers": 2, "tracing": {"excluded_urls": ".*"}}}}
    traced = bentoml_overrides(json.dumps({"services": {"svc": {"tracing": {"sample_rate": 0.5}}}}), "svc", 1)
    assert traced["services"]["svc"] == {"workers": 1, "tracing": {"sample_rate": 0.5}}  # the user's tracing kept


def test_numbers_spelled_as_text_must_be_finite_and_json_numbers_must_fit_a_double(gateway):
    gw, app, key = gateway
    auth = {"Authorization": f"Bearer {key}"}
    for text in ("nan", "inf", "-Infinity"):
        status, _, body = _call(gw, "/predict", json.dumps({"row": {**ROW, "income": text}}).encode(), auth)
        assert status == 422 and body["detail"][0]["loc"] == ["row", "income"], (text, body)
    status, _, body = _call(gw, "/predict", b'{"row": {"age": 1e400}}', auth)
    assert status == 422 and "finite" in body["detail"][0]["msg"]
    assert not app.predicted


def test_bentoml_request_timeouts_leave_no_timer_behind_and_still_answer_504():
    """BentoML's TimeoutMiddleware left one live timer per request for traffic.timeout (30 s): 40,000 at 1,300 rps,
    and 90 ms collector pauses that shed requests."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    from pipelines.serving.gateway import cancelled_timeouts

    cancelled_timeouts()

    async def quick(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"[]"})

    async def slow(scope, receive, send) -> None:
        await asyncio.sleep(5)

    async def silent(scope, receive, send) -> None:
        return None

    async def run() -> tuple[list[int], list[int], float, float, int]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "path": "/predict", "method": "POST", "headers": []}
        for _ in range(50):
            await TimeoutMiddleware(quick, timeout=30)(scope, None, send)
        loop = asyncio.get_running_loop()
        live = sum(not h.cancelled() for h in loop._scheduled)  # type: ignore[attr-defined]
        statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
        start = time.perf_counter()
        await TimeoutMiddleware(silent, timeout=30)(scope, None, send)
        ended = time.perf_counter() - start
        sent.clear()
        start = time.perf_counter()
        await TimeoutMiddleware(slow, timeout=0.2)(scope, None, send)
        timed_out = time.perf_counter() - start
        return statuses, [m["status"] for m in sent if m["type"] == "http.response.start"], ended, timed_out, live

    statuses, late, ended, timed_out, live = asyncio.run(run())
    assert statuses == [200] * 50 and live == 0  # answered, and no timer waits 30 s for nothing
    assert ended < 1  # a request that ends without an answer does not wait for the timeout
    assert late == [504] and 0.15 < timed_out < 2


def test_a_challenger_that_does_not_load_leaves_the_champion_serving_everything(service_module):
    """A broken challenger once kept the server from starting (and, running, from following the registry at all),
    even at canary share 0 where it answers nothing."""
    assert service_module["challenger"] == "ok", service_module["challenger"]


def test_answers_are_strict_compact_json_with_numpy_numbers_as_numbers():
    import numpy as np

    from pipelines.serving.gateway import answers_body

    assert answers_body([{"label": "a", "probability": np.float32(0.5), "n": np.int64(2)}]) == (
        b'[{"label":"a","probability":0.5,"n":2}]')


def test_the_gateways_rows_go_to_bentomls_batching_unless_the_cache_has_them_all(service_module):
    """The service's side of the gateway (MODELS.predict): all cached, answered at once; else into the adaptive
    batching of BentoML's app behind the request (found by its predict route), or, batching off, on a thread."""
    assert service_module["batching"] == "ok", service_module["batching"]


def test_each_server_counts_its_metrics_in_a_folder_of_its_own(tmp_path):
    """Two servers of one project once shared BentoML's one Prometheus folder, which each start empties."""
    import subprocess

    from pipelines.serving.server import METRICS_DIR, metrics_folder

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / METRICS_DIR / str(gone.pid)).mkdir(parents=True)  # a server that was killed left its folder
    (tmp_path / METRICS_DIR / str(os.getppid())).mkdir()  # a server that runs
    mine = metrics_folder(tmp_path, os.getpid())
    assert mine == tmp_path / METRICS_DIR / str(os.getpid()) and mine != metrics_folder(tmp_path, os.getppid())
    assert sorted(p.name for p in (tmp_path / METRICS_DIR).iterdir()) == [str(os.getppid())]


def test_text_fields_are_bounded_before_anything_is_logged(gateway):
    """Hardening II, item 4: categories of any length up to the body limit were logged as sent (117 MB/s)."""
    from pipelines.serving.schema import CATEGORY_SLACK, MAX_ID_CHARS, MIN_CATEGORY_CHARS

    gw, app, key = gateway
    longest = max(len(v) for v in gw.settings().data_schema.categorical["purpose"].values)
    allowed = max(MIN_CATEGORY_CHARS, longest + CATEGORY_SLACK)
    status, _, body = _call(gw, "/predict", json.dumps({"row": {**ROW, "purpose": "x" * (allowed + 1)}}).encode(),
                            {"X-API-Key": key})
    assert status == 422 and "purpose" in body["detail"][0]["loc"] and "at most" in body["detail"][0]["msg"]
    assert _call(gw, "/predict", json.dumps({"row": {**ROW, "purpose": " " * 3 + "car"}}).encode(),
                 {"X-API-Key": key})[0] == 200  # padding and case are the transform's to clean
    assert _call(gw, "/predict", json.dumps({"row": {**ROW, "loan_id": "i" * (MAX_ID_CHARS + 1)}}).encode(),
                 {"X-API-Key": key})[0] == 422


def test_the_gateway_times_each_phase_of_an_answered_predict_and_metrics_show_them(tmp_path):
    params = write_params(tmp_path)
    app, phases = _App(), PhaseTimes()
    key = ApiKeys(tmp_path / "keys.json").add("t")
    gw = Gateway(app, lambda: load_settings(params), files_state(tmp_path / "keys.json"), lambda: (0.0, False),
                 lambda: {"champion": "v1", "challenger": None}, app.predict, explain=app.explain, phases=phases)
    auth = {"Authorization": f"Bearer {key}"}
    assert _call(gw, "/predict", json.dumps({"rows": [ROW, ROW]}).encode(), auth)[0] == 200
    assert _call(gw, "/explain", json.dumps({"row": ROW}).encode(), auth)[0] == 200  # /predict's phases only
    assert _call(gw, "/predict", json.dumps({"row": {**ROW, "age": 7}}).encode(), auth)[0] == 422  # not answered
    phases.batch([1.0, 1.25, 1.5])
    counted = phases.snapshot()
    assert counted["requests"] == 1 and counted["batches"] == 1
    assert set(counted["seconds"]) == {*REQUEST_PHASES, *BATCH_PHASES}
    assert all(counted["seconds"][p] > 0 for p in ("auth", "parse", "checks", "batch", "answer"))
    assert counted["seconds"]["score"] == counted["seconds"]["log"] == 0.25
    text = served_metrics({"champion": "v1", "challenger": None, "canary_share": 0.0, "shadow": False},
                          {"size": 0, "entries": 0, "hits": 0, "misses": 0}, phases=counted)
    worker = f'worker="{os.getpid()}"'
    assert f'amaas_predict_phase_seconds_total{{phase="score",{worker}}} 0.25' in text
    assert f"amaas_predict_phase_requests_total{{{worker}}} 1.0" in text
    assert "amaas_predict_phase" not in served_metrics({"canary_share": 0.0, "shadow": False}, {
        "size": 0, "entries": 0, "hits": 0, "misses": 0})  # a server that counts none shows none
