"""Per-key limits without a server: the token bucket, the daily quota, usage, drain and reload in the shared
state (also from two processes at once), key scopes and limits in the key store, and the gateway's answers."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from pipelines.config import RateLimitConfig, load_settings
from pipelines.serving.gateway import Gateway
from pipelines.state.keys import ApiKeys, KeyStoreError
from pipelines.state.limits import DAY_S, Limit, SharedState, StateBusy, Usage, one_at_a_time, usage_metrics
from tests.conftest import files_state, write_params
from tests.unit.test_serving import ROW, _App, _call

T0 = 1_800_000_000.0 - 1_800_000_000.0 % DAY_S + 3600  # 01:00 UTC on some day


def test_token_bucket_admits_a_burst_then_the_rate(tmp_path):
    state, limit = SharedState(tmp_path / "limits.db"), Limit(rps=2.0, burst=3, daily_quota=None)
    first = [state.admit("s", "k", limit, now=T0) for _ in range(4)]
    assert [d.refused for d in first] == [None, None, None, "rate"]
    assert [d.remaining for d in first[:3]] == [2, 1, 0]
    refused = first[3]
    assert refused.retry_after_s == 1 and dict(refused.headers())[b"x-ratelimit-limit"] == b"3"
    assert dict(refused.headers())[b"retry-after"] == b"1" and dict(refused.headers())[b"x-ratelimit-reset"] == b"2"
    assert state.admit("s", "k", limit, now=T0 + 0.4).refused == "rate"  # 0.8 of a token
    assert state.admit("s", "k", limit, now=T0 + 0.5).refused is None  # 1 token after 0.5 s at 2/s
    assert state.admit("s", "other", limit, now=T0 + 0.5).refused is None  # one bucket per key
    assert [state.admit("s", "k", limit, now=T0 + 100).refused for _ in range(4)] == [None] * 3 + ["rate"]  # capped
    usage = state.usage(now=T0)
    assert (usage["k"].requests, usage["k"].limited) == (10, 3) and usage["other"].requests == 1
    unlimited = Limit(rps=None, burst=1, daily_quota=None)
    assert {state.admit("s", "free", unlimited, now=T0).refused for _ in range(5)} == {None}
    assert state.admit("s", "free", unlimited, now=T0).headers() == []  # no rate, no X-RateLimit-*


def test_daily_quota_counts_rows_and_renews_at_midnight_utc(tmp_path):
    state, limit = SharedState(tmp_path / "limits.db"), Limit(rps=None, burst=10, daily_quota=5)
    assert state.admit("s", "k", limit, now=T0).refused is None
    assert state.charge("k", 3, limit, now=T0) is None
    assert state.admit("s", "k", limit, now=T0).refused is None
    assert state.charge("k", 3, limit, now=T0) == 2  # 2 rows left: refused, nothing counted
    assert state.charge("k", 2, limit, now=T0) is None
    used_up = state.admit("s", "k", limit, now=T0)
    assert used_up.refused == "quota" and used_up.retry_after_s == DAY_S - 3600  # until 00:00 UTC
    assert state.usage(now=T0)["k"] == Usage(requests=3, rows=5, limited=2, rows_today=5)
    assert state.admit("s", "k", limit, now=T0 + DAY_S).refused is None  # a new UTC day
    assert state.charge("k", 5, limit, now=T0 + DAY_S) is None
    assert state.usage(now=T0 + DAY_S)["k"].rows == 10


def test_rows_without_a_quota_are_counted_per_utc_day(tmp_path):
    state, limit = SharedState(tmp_path / "limits.db"), Limit(rps=None, burst=10, daily_quota=None)
    assert state.charge("k", 4, limit, now=T0) is None  # a key that has sent nothing yet: nothing to count on
    assert state.admit("s", "k", limit, now=T0).refused is None
    assert state.charge("k", 4, limit, now=T0) is None and state.charge("k", 3, limit, now=T0) is None
    assert state.usage(now=T0)["k"] == Usage(requests=1, rows=7, limited=0, rows_today=7)
    assert state.charge("k", 2, limit, now=T0 + DAY_S) is None  # a new UTC day starts from 0
    assert state.usage(now=T0 + DAY_S)["k"] == Usage(requests=1, rows=9, limited=0, rows_today=2)


def _hammer(path: str, start: float, out: multiprocessing.Queue) -> None:
    state, limit = SharedState(Path(path)), Limit(rps=0.001, burst=40, daily_quota=None)
    while time.time() < start:
        time.sleep(0.001)
    out.put(sum(state.admit("s", "shared", limit).refused is None for _ in range(300)))


def test_two_processes_together_admit_one_bucket_not_two(tmp_path):
    """Workers of a server share the bucket: 2 processes sending 300 requests each get 40 between them (the
    burst; the refill is negligible), never 40 each."""
    path = tmp_path / "limits.db"
    SharedState(path).usage()  # the file exists before both start
    ctx = multiprocessing.get_context("fork")  # the children start with everything imported
    out: multiprocessing.Queue = ctx.Queue()
    start = time.time() + 0.5  # both processes are up by then; they race from the same moment
    procs = [ctx.Process(target=_hammer, args=(str(path), start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    admitted = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sum(admitted) == 40, admitted
    usage = SharedState(path).usage()["shared"]
    assert (usage.requests, usage.limited) == (600, 560)


def _hammer_for(path: str, start: float, seconds: float, out: multiprocessing.Queue) -> None:
    state, limit = SharedState(Path(path)), Limit(rps=5, burst=5, daily_quota=None)
    while time.time() < start:
        time.sleep(0.001)
    admitted = 0
    while time.time() < start + seconds:
        with contextlib.suppress(StateBusy):  # the lock stayed busy past its timeout: a 503, not admitted
            admitted += state.admit("s", "rated", limit).refused is None
    out.put(admitted)


def test_four_processes_admit_no_more_than_the_rate_allows(tmp_path):
    """Hardening II, item 1: the clock was read before the write lock, so a worker that waited for the lock wrote
    an older time over a newer one and a refill counted twice (132 admitted against 55 with 4 processes)."""
    path = tmp_path / "limits.db"
    SharedState(path).usage()
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()
    start, seconds = time.time() + 0.5, 1.5  # the race admitted 2.4 times the allowance: it shows in 1.5 s
    procs = [ctx.Process(target=_hammer_for, args=(str(path), start, seconds, out)) for _ in range(4)]
    for p in procs:
        p.start()
    admitted = sum(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert admitted <= 5 * seconds + 5, admitted


def test_a_new_key_with_a_revoked_keys_name_starts_afresh(tmp_path):
    """Hardening II, item 10: the counters and the used quota of a revoked key stayed with its name."""
    from pipelines.config import Paths, StateConfig
    from pipelines.state import Shared

    state = Shared(StateConfig(), Paths(tmp_path))
    state.keys.add("app")
    limit = Limit(rps=1, burst=1, daily_quota=10)
    assert state.limits.admit("s", "app", limit).refused is None and state.limits.charge("app", 10, limit) is None
    state.revoke("app")
    state.keys.add("app")
    assert "app" not in state.limits.usage()
    assert state.limits.admit("s", "app", limit).refused is None and state.limits.charge("app", 10, limit) is None


def test_a_keys_burst_follows_its_rate_unless_given(tmp_path):
    """Hardening II, item 15: `keys add --rps 5` kept the default burst of 100 (40 at once, no 429)."""
    keys = ApiKeys(tmp_path / "keys.json")
    defaults = RateLimitConfig(rps=50, burst=100, daily_quota=None)
    assert keys.lookup(keys.add("five", rps=5)).limit(defaults) == Limit(5, 5, None)
    assert keys.lookup(keys.add("half", rps=0.5)).limit(defaults) == Limit(0.5, 1, None)
    assert keys.lookup(keys.add("given", rps=5, burst=20)).limit(defaults) == Limit(5, 20, None)


def _load_under_lock(lock: str, start: float, out: multiprocessing.Queue, die: bool) -> None:
    while time.time() < start:
        time.sleep(0.001)
    with one_at_a_time(Path(lock)):
        began = time.time()
        if die:  # a worker killed while loading: the kernel releases its lock
            os._exit(1)
        time.sleep(0.3)  # a model loading
        out.put((began, time.time()))


def test_workers_load_new_models_one_at_a_time_and_a_dead_one_releases_the_lock(tmp_path):
    """The rolling switch: 4 worker processes that all see a new model at once load it one after another."""
    lock = tmp_path / ".amaas" / "reload.lock"
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()
    start = time.time() + 0.5  # the one that dies takes the lock first (0.2 s earlier)
    procs = [ctx.Process(target=_load_under_lock, args=(str(lock), start - 0.2 * (i == 0), out, i == 0))
             for i in range(4)]
    for p in procs:
        p.start()
    windows = sorted(out.get(timeout=60) for _ in procs[1:])
    for p in procs:
        p.join(timeout=30)
    assert procs[0].exitcode == 1 and [p.exitcode for p in procs[1:]] == [0, 0, 0]
    assert all(end <= later for (_, end), (later, _) in zip(windows, windows[1:], strict=False)), windows
    assert windows[-1][0] - windows[0][0] >= 0.55  # three loads of 0.3 s, one after another


def test_drain_and_reload_are_per_server(tmp_path):
    state = SharedState(tmp_path / "limits.db")
    limit = Limit(rps=None, burst=1, daily_quota=None)
    state.set_draining("a", True)
    assert state.admit("a", "k", limit).refused == "draining" and state.admit("a", None, None).refused == "draining"
    assert state.admit("b", "k", limit).refused is None and not state.draining("b")  # another server of the project
    state.set_draining("a", False)
    assert state.admit("a", None, None).refused is None
    assert state.reload_generation("a") == 0
    generation = state.request_reload("a")
    assert generation == 1 == state.reload_generation("a") and state.reload_generation("b") == 0
    state.followed("a", 11, 0)
    state.followed("a", 12, generation)
    assert state.followers("a", generation) == 1
    state.followed("a", 11, generation)
    assert state.followers("a", generation) == 2 and state.followers("b", generation) == 0


def test_usage_metrics_label_keys_by_name():
    text = usage_metrics({"app-1": Usage(requests=3, rows=7, limited=1, rows_today=7)})
    assert 'amaas_key_requests_total{key="app-1"} 3.0' in text
    assert 'amaas_key_rows_total{key="app-1"} 7.0' in text and 'amaas_key_rate_limited_total{key="app-1"} 1.0' in text


def test_keys_carry_scopes_and_limits_and_old_files_still_read(tmp_path):
    keys = ApiKeys(tmp_path / "keys.json")
    admin = keys.add("ops", scopes=("admin",), rps=5, burst=2, daily_quota=100)
    plain = keys.add("app")
    stored = json.loads((tmp_path / "keys.json").read_text())
    assert set(stored["app"]) == {"sha256", "created"}  # defaults are not written
    assert stored["ops"]["scopes"] == ["admin"] and stored["ops"]["daily_quota"] == 100
    ops, app = keys.lookup(admin), keys.lookup(plain)
    assert ops is not None and app is not None
    assert ops.scopes == ("admin",) and app.scopes == ("predict",)
    defaults = RateLimitConfig(rps=50, burst=100, daily_quota=None)
    assert ops.limit(defaults) == Limit(5, 2, 100) and app.limit(defaults) == Limit(50, 100, None)
    with pytest.raises(ValueError, match="scopes must be"):
        keys.add("bad", scopes=("root",))
    with pytest.raises(ValueError, match="rps must be a positive number"):
        keys.add("bad", rps=0)
    old = tmp_path / "old.json"  # a key file from before scopes and limits
    old.write_text(json.dumps({"legacy": {"sha256": "ab" * 32, "created": "2026-01-01T00:00:00+00:00"}}))
    assert ApiKeys(old).entries()["legacy"].scopes == ("predict",)
    old.write_text(json.dumps({"x": {"sha256": "ab", "created": "c", "burst": -1}}))
    with pytest.raises(KeyStoreError, match="burst must be"):
        ApiKeys(old).entries()


@pytest.fixture
def limited(tmp_path):
    """A gateway with a predict key limited to 2 requests at once and 4 rows a day, and an admin key."""
    params = write_params(tmp_path, **{"serve.rate_limit": {"rps": 0.001, "burst": 2, "daily_quota": 4}})
    keys = ApiKeys(tmp_path / "keys.json")
    predict, admin = keys.add("app"), keys.add("ops", scopes=("admin",))
    app = _App()
    gateway = Gateway(app, lambda: load_settings(params), files_state(tmp_path / "keys.json"), lambda: (0.0, False),
                      lambda: {"champion": "v1", "challenger": None}, app.predict)
    return gateway, predict, admin


def test_gateway_answers_429_with_headers_and_403_for_the_wrong_scope(limited):
    gw, predict, admin = limited
    body = json.dumps({"rows": [ROW, ROW, ROW]}).encode()
    status, headers, _ = _call(gw, "/predict", body, {"X-API-Key": predict})
    assert status == 200 and headers["x-ratelimit-limit"] == "2" and headers["x-ratelimit-remaining"] == "1"
    status, headers, answer = _call(gw, "/predict", body, {"X-API-Key": predict})  # 3 + 3 rows > 4 a day
    assert status == 429 and "1 of 4 rows left today" in answer["error"] and int(headers["retry-after"]) > 0
    status, headers, answer = _call(gw, "/predict", body, {"X-API-Key": predict})  # the bucket is empty
    assert status == 429 and "rate limit" in answer["error"] and headers["x-ratelimit-remaining"] == "0"
    assert int(headers["retry-after"]) >= 1
    assert _call(gw, "/predict", body, {"X-API-Key": admin})[0] == 403  # an admin-only key does not predict
    assert _call(gw, "/admin/keys", b"", {"X-API-Key": predict}, method="GET")[0] == 403
    assert _call(gw, "/admin/keys", b"", {}, method="GET")[0] == 401
    status, _, usage = _call(gw, "/admin/keys", b"", {"X-API-Key": admin}, method="GET")
    assert status == 200 and usage["app"] == {"scopes": ["predict"], "rps": 0.001, "burst": 2,
                                                   "daily_quota": 4, "requests": 3, "rows": 3, "limited": 2,
                                                   "rows_today": 3}
    assert _call(gw, "/admin/drain", b"", {"X-API-Key": admin}, method="GET")[0] == 405
    assert _call(gw, "/admin/reload", b"", {"X-API-Key": admin})[0] == 409  # no project registry to follow


def test_drain_turns_readiness_and_predict_away_until_undrained(limited):
    gw, predict, admin = limited
    assert _call(gw, "/admin/drain", b'{"drain": "yes"}', {"X-API-Key": admin})[0] == 422
    assert _call(gw, "/admin/drain", b"", {"X-API-Key": admin})[::2] == (200, {"draining": True})
    assert _call(gw, "/readyz", b"", {}, method="GET")[0] == 503
    status, headers, answer = _call(gw, "/predict", json.dumps({"row": ROW}).encode(), {"X-API-Key": predict})
    assert status == 503 and "draining" in answer["error"] and headers["retry-after"] == "5"
    assert _call(gw, "/admin/drain", b'{"drain": false}', {"X-API-Key": admin})[2] == {"draining": False}
    assert _call(gw, "/readyz", b"", {}, method="GET")[0] == 200
