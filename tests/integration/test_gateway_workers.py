"""A real `amaas serve` with `serve.workers: 2`: per-key rate limits hold across both workers, scopes guard the
admin endpoints, /admin/reload switches both workers to a new champion (one after the other), drain turns both
away, and usage is summed over both."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from typing import Any

import pytest
import requests
import yaml

from pipelines.config import Paths
from pipelines.registry import Registry, force_promote
from pipelines.state.keys import ApiKeys
from tests.conftest import BIN, amaas, free_port, register_copy, wait_ready

pytestmark = pytest.mark.slow

ROW = {"age": 41, "income": None, "loan_amount": 12000, "term_months": 60, "interest_rate": 14.5,
       "credit_score": 610, "debt_to_income": None, "employment_years": 3, "open_accounts": 7,
       "delinquencies_2y": 1, "home_ownership": "rent", "purpose": "car", "region": "south"}
RPS, BURST = 5.0, 5
SHED = "overloaded, retry"  # a 503 of BentoML's load shedding: admitted by the limits, not answered in time


def _send(url: str, key: str, tag: str, until: float, statuses: list[tuple[int, Any, str]]) -> None:
    """Requests back to back on a connection of its own (so the kernel spreads connections over the workers)."""
    with requests.Session() as session:
        i = 0
        while time.monotonic() < until:
            try:
                r = session.post(f"{url}/predict", json={"row": ROW}, timeout=10,
                                 headers={"Authorization": f"Bearer {key}", "X-Request-ID": f"{tag}-{i}"})
                statuses.append((r.status_code, r.headers, r.text[:200]))  # headers: case-insensitive
            except requests.Timeout:
                pass
            i += 1


def _answering_pids(root, tag: str) -> set[str]:
    """The workers (pids, from the prediction log's file names) that answered requests tagged `tag`."""
    return {f.stem.rsplit("-", 1)[1] for f in (root / "logs" / "predictions").glob("*.jsonl")
            if f"{tag}-" in f.read_text()}


def test_limits_scopes_reload_and_drain_hold_across_two_workers(trained_project, tmp_path):
    root = tmp_path / "project"  # a copy: this test promotes a new champion
    shutil.copytree(trained_project, root, symlinks=True, ignore=shutil.ignore_patterns("logs", "serve*.log"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["serve"].update(workers=2, reload_interval_s=3600)  # a reload within the test is /admin/reload's doing
    (root / "params-workers.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    tag = f"w{time.time_ns()}"
    keys = ApiKeys(root / ".amaas" / "api_keys.json")
    limited, free = keys.add(f"{tag}-limited", rps=RPS, burst=BURST), keys.add(f"{tag}-free")
    admin = keys.add(f"{tag}-admin", scopes=("admin",))
    spread = keys.add(f"{tag}-spread")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (root / "serve-workers.log").open("w")
    proc = subprocess.Popen([str(BIN / "amaas"), "--params", str(root / "params-workers.yaml"), "--root", str(root),
                             "serve", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_ready(url, proc, root / "serve-workers.log")

        for _ in range(6):  # warm both workers up (fresh connections), so that few requests are shed below
            requests.post(f"{url}/predict", json={"row": ROW}, timeout=30,
                          headers={"Authorization": f"Bearer {free}"})

        # 8 connections over the limited key and 2 over the free one, for 2 s
        got: dict[str, list[tuple[int, Any, str]]] = {"limited": [], "free": []}
        started = time.monotonic()
        threads = [threading.Thread(target=_send, args=(url, k, f"{tag}-{name}-{n}", started + 2.0, got[name]))
                   for name, k, count in (("limited", limited, 8), ("free", free, 2)) for n in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        statuses = Counter("shed" if status == 503 and SHED in text else status for status, _, text in got["limited"])
        assert set(statuses) <= {200, 429, "shed"} and statuses[200] and statuses[429], got["limited"][:20]
        admitted = statuses[200] + statuses["shed"]
        assert admitted <= BURST + RPS * elapsed, (statuses, elapsed)  # one bucket for both workers, not one each
        refused = next(headers for status, headers, _ in got["limited"] if status == 429)
        assert int(refused["Retry-After"]) >= 1 and refused["X-RateLimit-Limit"] == str(BURST)
        assert refused["X-RateLimit-Remaining"] == "0" and "X-RateLimit-Reset" in refused
        free_statuses = Counter(status for status, _, _ in got["free"])
        assert set(free_statuses) <= {200, 503} and free_statuses[200] > 2, free_statuses  # never limited
        # both workers answered: the kernel spreads connections, but a loaded machine may hand one worker all of
        # the burst's; then fresh connections (over a key of their own, so the counts below stay the burst's) until
        # the other answers too
        deadline, i = time.monotonic() + 60, 0
        while len(pids := _answering_pids(root, tag)) < 2 and time.monotonic() < deadline:
            with contextlib.suppress(requests.Timeout):
                requests.post(f"{url}/predict", json={"row": ROW}, timeout=10,
                              headers={"Authorization": f"Bearer {spread}", "X-Request-ID": f"{tag}-spread-{i}"})
            i += 1
        assert len(pids) == 2, pids

        # scopes: a predict key gets 403 on /admin/*, no key 401, the admin key 200
        for path, method in (("/admin/keys", "GET"), ("/admin/reload", "POST"), ("/admin/drain", "POST")):
            assert requests.request(method, f"{url}{path}", timeout=10,
                                    headers={"Authorization": f"Bearer {free}"}).status_code == 403, path
            assert requests.request(method, f"{url}{path}", timeout=10).status_code == 401, path
        as_admin = {"Authorization": f"Bearer {admin}"}
        # a new champion: on /admin/reload both workers load it (one at a time) and switch; answered once both have
        registry = Registry(Paths(root).registry)
        register_copy(registry, "vrolled", tmp_path)
        force_promote(Registry(Paths(root).registry), "vrolled", "test")
        reloaded = requests.post(f"{url}/admin/reload", headers=as_admin, timeout=60)
        assert reloaded.status_code == 200 and reloaded.json()["followed"] == 2 == reloaded.json()["workers"]
        assert reloaded.json()["models"]["champion"] == "vrolled"
        for _ in range(6):  # fresh connections, spread over both workers: every answer is the new champion's
            answer = requests.post(f"{url}/predict", json={"row": ROW}, timeout=30,
                                   headers={"Authorization": f"Bearer {spread}"})
            assert answer.status_code == 200 and answer.json()[0]["model_version"] == "vrolled", answer.text

        # usage, summed over both workers: /admin/keys, /metrics and `amaas keys list` agree with what we saw
        usage = requests.get(f"{url}/admin/keys", headers=as_admin, timeout=10).json()[f"{tag}-limited"]
        assert (usage["requests"], usage["rows"], usage["limited"]) == (len(got["limited"]), admitted, statuses[429])
        metrics = requests.get(f"{url}/metrics", timeout=10).text
        assert f'amaas_key_rate_limited_total{{key="{tag}-limited"}} {statuses[429]:.1f}' in metrics
        free_rows = next(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                         if line.startswith(f'amaas_key_rows_total{{key="{tag}-free"}}'))
        assert free_statuses[200] <= free_rows <= len(got["free"]) + 6  # its 200s, and any shed (also admitted)
        listed = json.loads(amaas("keys", "list", root=root).stdout)[f"{tag}-limited"]
        assert (listed["requests"], listed["limited"], listed["rps"]) == (usage["requests"], usage["limited"], RPS)

        # drain: readiness and /predict turn away on both workers (fresh connections), then back
        assert requests.post(f"{url}/admin/drain", headers=as_admin, timeout=10).json() == {"draining": True}
        for _ in range(6):
            assert requests.get(f"{url}/readyz", timeout=10).status_code == 503
            drained = requests.post(f"{url}/predict", json={"row": ROW}, timeout=10,
                                    headers={"Authorization": f"Bearer {free}"})
            assert drained.status_code == 503 and "Retry-After" in drained.headers
        assert requests.post(f"{url}/admin/drain", json={"drain": False}, headers=as_admin, timeout=10).ok
        assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
