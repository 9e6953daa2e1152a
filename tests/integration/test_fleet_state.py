"""Replicas of a fleet, each started in an empty folder of its own with nothing but its environment (a real
PostgreSQL, Redis and a folder as the artifacts store), behave as one `amaas serve`: the same keys, one rate
limit, the champion the project host names, and one prediction log that monitoring reads."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psycopg
import pytest
import requests
import yaml

from pipelines.config import Paths, StateConfig
from pipelines.registry import Registry
from pipelines.state import Shared
from tests.conftest import BIN, free_port, register_copy, wait_ready

pytestmark = pytest.mark.slow
REPLICAS = 3
RELOAD_S = 1.0  # serve.reload_interval_s of the fleet


@pytest.fixture(scope="module")
def fleet(trained_project, postgres_url, redis_url, tmp_path_factory) -> Iterator[dict]:
    """A copy of the trained project moved onto a fresh state database (its registry, a bento in the artifacts
    store, keys), and REPLICAS replicas serving it from empty folders."""
    base = tmp_path_factory.mktemp("fleet")
    root = base / "project"
    shutil.copytree(trained_project, root, symlinks=True, ignore=shutil.ignore_patterns("logs", "serve*.log"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["serve"].update(reload_interval_s=RELOAD_S)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    name = "fleet" + uuid.uuid4().hex[:8]
    with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "AMAAS_STATE_URL": postgres_url.rsplit("/", 1)[0] + "/" + name, "AMAAS_REDIS_URL": redis_url,
           "AMAAS_ARTIFACTS_URL": str(base / "artifacts")}
    for var in ("AMAAS_ROOT", "AMAAS_PARAMS", "BENTOML_HOME"):
        env.pop(var, None)
    host = _amaas(root, env, "deploy")  # moves the registry into the database, puts the champion's bento
    assert host.returncode == 0, host.stderr[-2000:]
    key = _amaas(root, env, "keys", "add", "app").stdout.strip()
    admin = _amaas(root, env, "keys", "add", "ops", "--scope", "admin").stdout.strip()
    limited = _amaas(root, env, "keys", "add", "slow", "--rps", "5", "--burst", "5").stdout.strip()
    replicas = [_start(base / f"replica-{i}", env) for i in range(REPLICAS)]
    try:
        for url, proc, log in replicas:
            wait_ready(url, proc, log, timeout=180)
        yield {"root": root, "env": env, "urls": [r[0] for r in replicas], "key": key, "admin": admin,
               "limited": limited, "state": Shared(StateConfig(url=env["AMAAS_STATE_URL"]), Paths(root))}
    finally:
        for _, proc, _ in replicas:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc, _ in replicas:
            proc.wait(timeout=60)


def _amaas(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "amaas"), "--root", str(root), "--params", str(root / "params.yaml"), *args],
                          env=env, capture_output=True, text=True, timeout=600)


def _start(folder: Path, env: dict[str, str]) -> tuple[str, subprocess.Popen[bytes], Path]:
    """A replica: `amaas serve --port P` in an empty folder, with the fleet's environment only."""
    folder.mkdir()
    port = free_port()
    log = folder.parent / f"{folder.name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "amaas"), "serve", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return f"http://127.0.0.1:{port}", proc, log


def _rows(root: Path, n: int, seed: int = 0) -> list[dict]:
    """`n` validated rows as a client sends them: the id and the schema's feature columns."""
    from pipelines.config import load_settings

    schema = load_settings(root / "params.yaml").data_schema
    columns = [schema.id_column, *schema.numeric, *schema.categorical]
    validated = pd.read_parquet(root / "data" / "validated" / "data.parquet", columns=columns)
    return [{k: (None if pd.isna(v) else v) for k, v in r.items()}
            for r in validated.sample(n, random_state=seed).to_dict("records")]


def _row(root: Path) -> dict:
    return _rows(root, 1)[0]


def _post(url: str, key: str, body: dict, rid: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}", **({"X-Request-ID": rid} if rid else {})}
    return requests.post(f"{url}/predict", json=body, headers=headers, timeout=30)


def test_replicas_keep_no_file_another_needs(fleet):
    for i in range(REPLICAS):
        folder = fleet["root"].parent / f"replica-{i}"
        assert not (folder / "params.yaml").exists() and not (folder / "models").exists()
        assert not (folder / ".amaas" / "api_keys.json").exists() and not (folder / "logs").exists()
    models = [requests.get(f"{url}/models", timeout=10).json() for url in fleet["urls"]]
    assert all(m == models[0] for m in models) and models[0]["champion"] == Registry.of(
        Paths(fleet["root"]), _settings(fleet)).champion


def _settings(fleet):
    from pipelines.config import load_settings

    return load_settings(fleet["root"] / "params.yaml")


def test_one_bucket_for_the_whole_fleet(fleet):
    row, admitted, started = _row(fleet["root"]), [], time.monotonic()

    def hammer(url: str) -> None:
        with requests.Session() as session:
            while time.monotonic() - started < 10:
                r = session.post(f"{url}/predict", json={"row": row}, timeout=30,
                                 headers={"Authorization": f"Bearer {fleet['limited']}"})
                admitted.append(r.status_code)

    threads = [threading.Thread(target=hammer, args=(url,)) for url in fleet["urls"] for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    assert admitted.count(200) <= 5 * elapsed + 5, (admitted.count(200), elapsed)
    assert admitted.count(429) > 0 and set(admitted) <= {200, 429}


def test_a_revoked_key_is_refused_by_every_replica_within_a_second(fleet):
    row = _row(fleet["root"])
    doomed = _amaas(fleet["root"], fleet["env"], "keys", "add", "doomed").stdout.strip()
    assert all(_post(url, doomed, {"row": row}).status_code == 200 for url in fleet["urls"])
    _amaas(fleet["root"], fleet["env"], "keys", "revoke", "doomed")
    revoked_at = time.monotonic()
    pending = set(fleet["urls"])
    while pending:
        pending = {url for url in pending if _post(url, doomed, {"row": row}).status_code != 401}
        assert not pending or time.monotonic() - revoked_at < 1.0 + 0.5, f"still admitted by {pending}"
    assert time.monotonic() - revoked_at < 1.5


def test_promote_and_rollback_reach_every_replica(fleet, tmp_path):
    root, env = fleet["root"], fleet["env"]
    registry = Registry.of(Paths(root), _settings(fleet))
    before = registry.champion
    register_copy(registry, "vfleet", tmp_path)
    promoted = _amaas(root, env, "promote", "--force", "--version", "vfleet", "--reason", "fleet test")
    assert promoted.returncode == 0, promoted.stderr[-2000:]
    _all_serve(fleet, "vfleet", within=RELOAD_S + 1.0 + 5.0)  # + fetching and loading the new bento once
    rolled = _amaas(root, env, "rollback", "--reason", "fleet test")
    assert rolled.returncode == 0, rolled.stderr[-2000:]
    _all_serve(fleet, before, within=RELOAD_S + 1.0)  # its model is loaded already: only the switch


def _all_serve(fleet, version: str, within: float) -> None:
    started = time.monotonic()
    while True:
        try:
            models = [requests.get(f"{url}/models", timeout=5).json() for url in fleet["urls"]]
        except requests.RequestException:
            models = []
        if models and all(m["champion"] == version for m in models):
            return
        assert time.monotonic() - started < within, f"not all replicas serve {version} after {within} s: {models}"
        time.sleep(0.1)


def test_one_prediction_log_holds_every_answer_and_monitoring_reads_it(fleet, tmp_path):
    root, row = fleet["root"], _row(fleet["root"])
    payload = _rows(root, 240, seed=3)
    answered = []
    for i in range(0, len(payload), 40):
        url = fleet["urls"][(i // 40) % REPLICAS]
        r = _post(url, fleet["key"], {"rows": payload[i:i + 40]}, rid=f"fleetlog-{i}")
        assert r.status_code == 200
        answered.extend(a["request_id"] for a in r.json())
    assert _post(fleet["urls"][0], fleet["key"], {"row": row}, rid="fleetlog-one").status_code == 200
    logged = [r for r in fleet["state"].predictions() if (r.request_id or "").startswith("fleetlog-")]
    assert sorted(r.request_id for r in logged) == sorted([*answered, "fleetlog-one"])  # one record per answer

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["report"].update(current="prediction_log", min_labeled_rows=100, max_key_share=1.0)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    report = _amaas(root, fleet["env"], "report")
    assert report.returncode == 0, report.stderr[-2000:]
    summary = json.loads((root / "reports" / "drift_details.json").read_text())
    assert summary["current_rows"] >= len(logged) and summary["labeled_rows"] >= 240
    assert summary["prediction_drift"] is not None and summary["metric_current"] is not None
