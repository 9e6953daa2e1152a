"""The fleet backend of the shared state against a real PostgreSQL and a real Redis (Debian's packages): several
processes' worth of objects on one database behave as one: keys, buckets, quotas, flags, registry, log."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from pipelines.config import Paths, StateConfig
from pipelines.registry import Registry, aliases_from_decisions, answer_approval, force_promote, rollback
from pipelines.state import Shared
from pipelines.state.limits import Limit, StateBusy
from pipelines.state.postgres import MIGRATIONS, Database, PgApiKeys, PgLimits, PgPredictionLog, PgRegistry, migrate
from pipelines.state.predlog import log_entry
from pipelines.state.redis_buckets import RedisBuckets


@pytest.fixture
def db_url(postgres_url):
    """A database of its own per test (created on the shared server)."""
    name = "t" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_url.rsplit("/", 1)[0] + "/" + name


def test_migrations_apply_once_even_when_replicas_start_together(db_url):
    def start(_):
        return Database(db_url).connection() is not None

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(start, range(4)))
    with psycopg.connect(db_url.replace("+psycopg", "")) as conn:
        assert conn.execute("SELECT count(*) FROM amaas_migrations").fetchone()[0] == len(MIGRATIONS)
        assert migrate(conn) == 0


def test_a_revoked_key_fails_on_every_replica_within_a_second(db_url):
    replicas = [PgApiKeys(Database(db_url)) for _ in range(3)]
    key = replicas[0].add("app", rps=5, burst=5)
    assert all(r.lookup(key).name == "app" for r in replicas)
    with pytest.raises(ValueError, match="exists"):
        replicas[1].add("app")
    replicas[2].revoke("app")
    deadline = time.monotonic() + 1.0
    while any(r.lookup(key) is not None for r in replicas):
        assert time.monotonic() < deadline, "a replica still takes a revoked key after 1 s"
        time.sleep(0.05)
    assert replicas[0].lookup("amaas_wrong") is None and replicas[0].lookup(None) is None


@pytest.mark.parametrize("with_redis", [False, True])
def test_replicas_together_admit_what_one_bucket_allows(db_url, redis_url, with_redis):
    limit = Limit(rps=5, burst=5, daily_quota=None)
    name = f"k{uuid.uuid4().hex[:8]}"  # Redis is shared by the tests: a bucket of its own
    replicas = [PgLimits(Database(db_url), RedisBuckets(redis_url) if with_redis else None) for _ in range(3)]
    admitted = []
    started = time.monotonic()

    def hammer(limits: PgLimits) -> None:
        while time.monotonic() - started < 2.0:
            admitted.append(limits.admit("s", name, limit).refused is None)

    threads = [threading.Thread(target=hammer, args=(r,)) for r in replicas for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    assert sum(admitted) <= 5 * elapsed + 5, (sum(admitted), elapsed)
    assert sum(admitted) >= 5 * 2.0  # the bucket refills: not everything is refused
    usage = replicas[0].usage()[name]
    assert usage.requests == len(admitted) and usage.limited == admitted.count(False)


def test_daily_quota_counts_rows_exactly_across_replicas(db_url):
    limit = Limit(rps=None, burst=10, daily_quota=100)
    replicas = [PgLimits(Database(db_url)) for _ in range(3)]
    with ThreadPoolExecutor(6) as pool:
        refused = list(pool.map(lambda i: replicas[i % 3].charge("q", 7, limit), range(30)))
    taken = sum(1 for r in refused if r is None)
    assert taken == 100 // 7  # 14 requests of 7 rows fit in 100, the others are refused
    assert all(r == 100 - 7 * taken for r in refused if r is not None)
    assert replicas[1].usage()["q"].rows_today == 7 * taken


def test_drain_reload_and_routing_flags_are_shared(db_url):
    a, b = PgLimits(Database(db_url)), PgLimits(Database(db_url))
    assert not a.draining("r1") and b.routing() is None
    b.set_draining("r1", True)
    time.sleep(0.25)  # a replica polls its flag (POLL_S), it does not ask per request
    assert a.draining("r1") and not a.draining("r2")
    assert a.admit("r1", "k", Limit(1, 1, None)).refused == "draining"
    generation = a.request_reload("r1")
    b.followed("r1", 11, generation)
    assert a.followers("r1", generation) == 1
    a.publish_routing(0.25, False)
    assert b.routing() == (0.25, False)


def _registry_of_two(db_url: str, tmp_path: Path) -> Registry:
    """A registry on the database holding versions v1 and v2 (bundles of metadata only), no champion yet."""
    registry = Registry(tmp_path / "registry", PgRegistry(Database(db_url)))
    for version in ("v1", "v2"):
        bundle = tmp_path / version
        bundle.mkdir()
        (bundle / "metadata.json").write_text(f'{{"version": "{version}"}}')
        registry.register(bundle)
    return registry


def test_promote_and_rollback_are_one_transaction_with_their_decision(db_url, tmp_path):
    registry = _registry_of_two(db_url, tmp_path)
    force_promote(registry, "v1", "first")
    force_promote(registry, "v2", "second")
    other_host = Registry(tmp_path / "elsewhere", PgRegistry(Database(db_url)))  # no files: all in the database
    assert other_host.champion == "v2" and other_host.aliases()["champion_history"] == ["v1"]
    assert rollback(registry, "back") == "v1"
    mirrored = json.loads((registry.root / "aliases.json").read_text())  # what DVC's deploy stage depends on
    assert mirrored["champion"] == "v1" and len(json.loads((registry.root / "decisions.json").read_text())) == 3
    decisions = other_host.decisions()
    assert [d["action"] for d in decisions] == ["force_promote", "force_promote", "rollback"]
    assert aliases_from_decisions(decisions)["champion"] == other_host.champion == "v1"
    assert PgRegistry(Database(db_url)).versions() == ["v1", "v2"]

    class Crash(RuntimeError):
        pass

    store = PgRegistry(Database(db_url))
    with pytest.raises(Crash), store.db.transaction() as conn:  # a crash after the alias, before the decision
        conn.execute("UPDATE registry_aliases SET champion = 'v2'")
        raise Crash
    assert other_host.champion == "v1" and len(other_host.decisions()) == 3


def test_an_approval_is_a_decision_with_user_and_note_in_the_database(db_url, tmp_path):
    registry = _registry_of_two(db_url, tmp_path)
    force_promote(registry, "v1", "first")
    registry.record({"action": "gate", "challenger": "v2", "champion_before": "v1", "champion_after": "v1",
                     "promoted": False, "awaiting_approval": True, "p_value": 0.1})
    answer_approval(registry, True, "ann", "signed off")
    other_host = Registry(tmp_path / "elsewhere", PgRegistry(Database(db_url)))
    assert other_host.champion == "v2"
    assert {k: other_host.decisions()[-1][k] for k in ("action", "by", "note", "p_value")} == {
        "action": "approve", "by": "ann", "note": "signed off", "p_value": 0.1}


def test_a_file_registry_moves_into_the_database_once(db_url, tmp_path):
    files = Registry(tmp_path / "registry")
    bundle = tmp_path / "v1"
    bundle.mkdir()
    (bundle / "metadata.json").write_text('{"version": "v1"}')
    files.register(bundle)
    force_promote(files, "v1", "files")
    moved = Registry(tmp_path / "registry", PgRegistry(Database(db_url)))
    assert moved.champion == "v1" and [d["action"] for d in moved.decisions()] == ["force_promote"]


def test_the_prediction_log_is_durable_before_sync_returns_and_read_by_monitoring(db_url, tmp_path):
    logs = [PgPredictionLog(Database(db_url)) for _ in range(2)]

    def entry(i: int) -> dict:
        return log_entry(time=f"2026-12-07T10:00:{i % 60:02d}.000+00:00", answer={"label": 1, "probability": 0.7},
                         model_version="v1", request_id=f"r{i}", key_name="app", route="champion", id=i,
                         features={"x": i, "c": "é"})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: logs[i % 2].append([entry(i), entry(1000 + i)]), range(200)))
    asyncio.run(logs[0].synced())
    state = Shared(StateConfig(url=db_url), Paths(tmp_path))
    records = state.predictions()
    assert len(records) == 400 and len({r.request_id for r in records}) == 400
    assert records[0].features["c"] == "é" and records[0].probability == 0.7
    with psycopg.connect(db_url.replace("+psycopg", "")) as conn:  # group commit: fewer transactions than writes
        assert conn.execute("SELECT count(*) FROM prediction_log").fetchone()[0] == 400


def test_an_unreachable_database_is_a_503_not_a_hang(tmp_path):
    dead = PgLimits(Database("postgresql://nobody@127.0.0.1:9/none"))
    started = time.monotonic()
    with pytest.raises(StateBusy):
        dead.admit("s", "k", Limit(1, 1, None))
    assert time.monotonic() - started < 3
