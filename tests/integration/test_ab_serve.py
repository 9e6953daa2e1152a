"""The canary's A/B test end to end: a real `amaas serve` with 2 workers answers simulated rows over both routes,
their labels arrive later with the simulator's next days (the collect and validate stages), and with
serve.canary_policy: auto the report stage ends the canary of a worse challenger, then promotes a better one.
Stages run in-process through run_stage (what `amaas <stage>` and the DAGs run), to spare the imports."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import requests
import yaml
from sklearn.metrics import roc_auc_score

from pipelines.config import Paths, load_settings
from pipelines.registry import Registry, force_promote
from pipelines.runner import run_stage
from pipelines.serving.routing import route
from pipelines.sources.simulator import generate_batch
from pipelines.state.keys import ApiKeys
from tests.conftest import served
from tests.unit.test_alerts import webhook  # noqa: F401 (the local webhook server fixture)

pytestmark = pytest.mark.slow

NEW_DAYS = range(3, 11)  # the simulator's days after the project's three: served first, their labels collected later
ROWS_PER_REQUEST = 50  # one route per request (a hash of its X-Request-ID)
CANARY_SHARE = 0.5


def _update(root, **sections) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in sections.items():
        node = params
        for part in section.split("."):
            node = node[part]
        node.update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _serve_rows(server, rows: pd.DataFrame, tag: str) -> pd.DataFrame:
    """Send `rows` in requests of ROWS_PER_REQUEST rows, each with its own X-Request-ID: first, alone, one the
    product routes to the challenger (the A/B test counts rows from the challenger's first answer on), then the
    others from 4 connections (a shed request is retried with the same id, so it keeps its route). The answers:
    each row's id, its request's route, the version that answered it and its probability."""
    headers = dict(server.session.headers)
    payload = [{k: (None if pd.isna(v) else v) for k, v in r.items()} for r in rows.to_dict("records")]
    requests_ = {f"{tag}-{i}": payload[i:i + ROWS_PER_REQUEST] for i in range(0, len(payload), ROWS_PER_REQUEST)}

    def send(request_id: str) -> list[dict]:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = requests.post(f"{server.url}/predict", json={"rows": requests_[request_id]}, timeout=10,
                                  headers={**headers, "X-Request-ID": request_id})
                if r.status_code != 503:
                    assert r.status_code == 200, r.text
                    where = route(request_id, CANARY_SHARE, False)
                    return [{"id": row["loan_id"], "route": where, "version": a["model_version"],
                             "probability": a["probability"]} for row, a in zip(requests_[request_id], r.json(),
                                                                                  strict=True)]
            except requests.Timeout:
                pass
            assert time.monotonic() < deadline, f"request {request_id} not answered in 30 s"

    lead = next(rid for rid in requests_ if route(rid, CANARY_SHARE, False) == "challenger")
    with ThreadPoolExecutor(4) as pool:
        answers = [*send(lead), *(a for got in pool.map(send, [r for r in requests_ if r != lead]) for a in got)]
    return pd.DataFrame(answers)


def _reload(server, admin: str) -> dict:
    """Both workers take up the registry now (POST /admin/reload answers once both followed); GET /models."""
    reloaded = requests.post(f"{server.url}/admin/reload", headers={"Authorization": f"Bearer {admin}"}, timeout=40)
    assert reloaded.status_code == 200 and reloaded.json()["followed"] == 2, reloaded.text
    return requests.get(f"{server.url}/models", timeout=10).json()


def _assert_routes(result: dict, answers: pd.DataFrame, labels: pd.Series, champion: str, challenger: str) -> None:
    """Each route's model answered its requests; the A/B result's route holds exactly those rows, all labelled,
    and its metric is the ROC-AUC of those answers against their labels."""
    for role, version in (("champion", champion), ("challenger", challenger)):
        mine = answers[answers["route"] == role]
        assert set(mine["version"]) == {version}
        assert result[role]["version"] == version
        assert result[role]["served_rows"] == result[role]["labeled_rows"] == len(mine) > 2000, result[role]
        expected = roc_auc_score(labels.loc[mine["id"]], mine["probability"])
        assert result[role]["metric"] == pytest.approx(expected, abs=1e-6)


def _ab_test(root: Path) -> dict:
    """The report stage as `amaas report` and the monitoring DAG run it; what it wrote to reports/ab_test.json."""
    run_stage("report", root / "params.yaml", root)
    return json.loads((root / "reports" / "ab_test.json").read_text())


def test_auto_policy_ends_a_worse_canary_and_promotes_a_better_one(two_models, webhook, tmp_path):  # noqa: F811
    source, strong, weak = two_models
    hook, alerts, _ = webhook
    root = tmp_path / "project"
    shutil.copytree(source, root, symlinks=True)
    shutil.rmtree(root / "logs", ignore_errors=True)
    registry = Registry(root / "models" / "registry")
    assert (registry.aliases()["champion"], registry.aliases()["challenger"]) == (strong, weak)
    _update(root, serve={"workers": 2, "canary_share": CANARY_SHARE, "shadow": False, "canary_policy": "auto",
                         "reload_interval_s": 3600, "cache": {"size": 0}},
            **{"serve.ab_test": {"min_effect": 0.06, "min_rows": 100, "cooldown_h": 0},
               "alerts": {"webhook_url": hook}, "source.simulator": {"malformed_share": 0.0}})
    settings = load_settings(root / "params.yaml")
    days = pd.concat([generate_batch(settings.source.simulator, settings.seed, day) for day in NEW_DAYS])
    labels = days.set_index("loan_id")["default"]
    rows = days[["loan_id", *settings.data_schema.feature_columns]]
    admin = ApiKeys(root / ".amaas" / "api_keys.json").add("ab-admin", scopes=("admin",))

    with served(root) as server:
        first = _serve_rows(server, rows, "ab-1")
        _update(root, **{"source.simulator": {"n_batches": 3 + len(NEW_DAYS)}})  # days later, the labels arrive
        for stage in ("collect", "validate"):
            run_stage(stage, root / "params.yaml", root)

        result = _ab_test(root)
        assert result["verdict"] == "challenger_loses", result["reasons"]
        _assert_routes(result, first, labels, strong, weak)
        assert result["action"]["taken"] == "canary_ended"
        assert (registry.aliases()["champion"], registry.aliases()["challenger"]) == (strong, None)
        decision = registry.decisions()[-1]
        assert (decision["action"], decision["verdict"], decision["champion_after"], decision["tested_challenger"]
                ) == ("ab_test", "challenger_loses", strong, weak)
        assert [a["details"]["verdict"] for a in alerts if a["kind"] == "ab_test"] == ["challenger_loses"]
        assert _reload(server, admin)["challenger"] is None  # both workers follow: no canary any more

        # the mirror case: the weak model champion (by force, as an operator would), the strong one challenger
        force_promote(Registry(Paths(root).registry), weak, "A/B test of a better challenger")
        registry.register(registry.version_dir(strong))  # what the gate does with a new version: the challenger
        assert _reload(server, admin)["challenger"] == strong
        second = _serve_rows(server, rows, "ab-2")  # the same people again: their labels are in already

    result = _ab_test(root)  # the first round's rows do not count: the routes' models were the other way round
    assert result["verdict"] == "challenger_wins", result["reasons"]
    _assert_routes(result, second, labels, weak, strong)
    assert result["action"]["taken"] == "promoted"
    assert (registry.aliases()["champion"], registry.champion) == (strong, strong)
    decision = registry.decisions()[-1]
    assert (decision["action"], decision["verdict"], decision["champion_before"], decision["champion_after"]) == (
        "ab_test", "challenger_wins", weak, strong)
    assert [a["details"]["verdict"] for a in alerts if a["kind"] == "ab_test"] == ["challenger_loses",
                                                                                  "challenger_wins"]
