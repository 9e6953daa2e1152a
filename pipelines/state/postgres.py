"""The fleet backend of the shared state on PostgreSQL: API keys, per-key usage and daily quotas, each server's
drain and reload flags, the fleet's canary routing, the registry's aliases and decisions, and the prediction log.

Every replica and the project host open the same database ($AMAAS_STATE_URL). The schema is migrated at the
first connection of a process (`MIGRATIONS`, under an advisory lock, so replicas that start together migrate
once). Times that limits and quotas depend on come from the database's clock, read in the same statement, never
from a worker's. A connection per thread, in autocommit; what must agree is one transaction. A database error is
StateBusy (the gateway answers 503, retry) or KeyStoreError (keys: 503 until it is back), never a 500.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb

from pipelines.io import redacted_url
from pipelines.state.keys import DEFAULT_SCOPES, KeyEntry, KeyStoreError, _digest, _entry_problem, new_key
from pipelines.state.limits import (
    DAY_S,
    DRAIN_RETRY_S,
    POLL_S,
    STALE_WORKER_S,
    Decision,
    Limit,
    StateBusy,
    Usage,
    refill_s,
)
from pipelines.state.predlog import GroupCommit, PredictionRecord

log = logging.getLogger("amaas.state")
CONNECT_TIMEOUT_S = 2
STATEMENT_TIMEOUT_MS = 2000  # a check that waits longer answers 503 (the gateway's promise: never a hang)
KEYS_REFRESH_S = 0.5  # how often a process re-reads the key table: a revocation holds everywhere within 1 s
_LOCK_ID = 0x616D616173  # the advisory lock that serializes migrations ("amaas")
# the database's clock, in Unix seconds. SQL is built from constants like this one only (bandit's B608 marks each
# place, `# nosec B608`): every value a caller or client gives is a bound parameter (%s, %(name)s)
_NOW = "extract(epoch from clock_timestamp())"

# Applied in order, once each (amaas_migrations records them). Never edit one that has shipped: add the next.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE api_keys (
        name TEXT PRIMARY KEY, sha256 TEXT NOT NULL UNIQUE, created TEXT NOT NULL,
        scopes JSONB, rps DOUBLE PRECISION, burst INTEGER, daily_quota BIGINT);
    CREATE TABLE key_usage (
        name TEXT PRIMARY KEY, tokens DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL,
        day BIGINT NOT NULL, day_rows BIGINT NOT NULL, requests BIGINT NOT NULL, rows BIGINT NOT NULL,
        limited BIGINT NOT NULL);
    CREATE TABLE servers (id TEXT PRIMARY KEY, draining BOOLEAN NOT NULL DEFAULT false,
                          reload BIGINT NOT NULL DEFAULT 0);
    CREATE TABLE workers (server TEXT NOT NULL, pid INTEGER NOT NULL, followed BIGINT NOT NULL,
                          seen DOUBLE PRECISION NOT NULL, PRIMARY KEY (server, pid));
    CREATE TABLE routing (one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one), canary_share DOUBLE PRECISION NOT NULL,
                          shadow BOOLEAN NOT NULL);
    CREATE TABLE registry_aliases (one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one), champion TEXT,
                                   challenger TEXT, champion_history JSONB NOT NULL);
    CREATE TABLE registry_versions (version TEXT PRIMARY KEY, metadata JSONB NOT NULL, bento TEXT,
                                    registered TIMESTAMPTZ NOT NULL DEFAULT now());
    CREATE TABLE registry_decisions (seq BIGSERIAL PRIMARY KEY, decision JSONB NOT NULL);
    CREATE TABLE prediction_log (
        seq BIGSERIAL PRIMARY KEY, at TIMESTAMPTZ NOT NULL, request_id TEXT, model_version TEXT, route TEXT,
        key_name TEXT, entry JSONB NOT NULL);
    CREATE INDEX prediction_log_at ON prediction_log (at);
    """,
)


def libpq_url(url: str) -> str:
    """SQLAlchemy's spelling (postgresql+psycopg://) as libpq takes it."""
    return "postgresql://" + url.split("://", 1)[1] if url.startswith("postgresql+") else url


class Database:
    """One PostgreSQL database, a connection per thread (autocommit), the schema migrated on first use.

    `durable` False commits without waiting for the WAL's flush (synchronous_commit off): for the usage counters,
    as the one-host SQLite file keeps them (synchronous=NORMAL): a crash of the database may lose its last fraction
    of a second of counts, never corrupt them. Keys, the registry and the prediction log are always durable."""

    def __init__(self, url: str, durable: bool = True) -> None:
        self.url = libpq_url(url)
        self.durable = durable
        self._local = threading.local()
        self._migrated = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Database({redacted_url(self.url)})"

    def connection(self) -> psycopg.Connection[Any]:
        """This thread's connection, opened (and the schema migrated) if it has none or lost it."""
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            self._local.conn = None
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                   options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"
                                           + ("" if self.durable else " -c synchronous_commit=off"),
                                   application_name="amaas")
            if not self._migrated:
                with self._lock:
                    if not self._migrated:
                        migrate(conn)
                        self._migrated = True
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        conn = self.connection()
        with conn.transaction():
            yield conn

    def rows(self, sql: str, args: Any = ()) -> list[tuple[Any, ...]]:
        """The rows of one statement (a transaction of its own)."""
        return self.connection().execute(sql, args).fetchall()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Apply the migrations this database has not had, under an advisory lock; the number applied."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        conn.execute("CREATE TABLE IF NOT EXISTS amaas_migrations (version INTEGER PRIMARY KEY, "
                     "applied TIMESTAMPTZ NOT NULL DEFAULT now())")
        done = {row[0] for row in conn.execute("SELECT version FROM amaas_migrations").fetchall()}
        applied = 0
        for version, sql in enumerate(MIGRATIONS, start=1):
            if version not in done:
                conn.execute(sql)
                conn.execute("INSERT INTO amaas_migrations (version) VALUES (%s)", (version,))
                applied += 1
    if applied:
        log.info("state database: %d migration(s) applied", applied)
    return applied


@contextlib.contextmanager
def _busy(what: str, error: type[Exception] = StateBusy) -> Iterator[None]:
    """Database errors as `error` (503 at the gateway), with what was being done."""
    try:
        yield
    except psycopg.Error as exc:
        raise error(f"the shared state database is unavailable or busy while {what} ({str(exc).strip()[:200]})"
                    ) from exc


class PgApiKeys:
    """The API keys (SHA-256 digests, scopes, limits) in the state database: what ApiKeys keeps in a file."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._digests: dict[str, KeyEntry] = {}
        self._read_at = -math.inf

    def add(self, name: str, scopes: tuple[str, ...] = DEFAULT_SCOPES, rps: float | None = None,
            burst: int | None = None, daily_quota: int | None = None) -> str:
        key, entry = new_key(name, scopes, rps, burst, daily_quota)
        with _busy("adding a key", KeyStoreError):
            inserted = self.db.rows(
                "INSERT INTO api_keys VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING name",
                (name, entry["sha256"], entry["created"], Jsonb(entry["scopes"]) if "scopes" in entry else None,
                 entry.get("rps"), entry.get("burst"), entry.get("daily_quota")))
        if not inserted:
            raise ValueError(f"an API key named {name!r} exists: revoke it first or pick another name")
        return key

    def revoke(self, name: str) -> None:
        with _busy("revoking a key", KeyStoreError):
            if not self.db.rows("DELETE FROM api_keys WHERE name = %s RETURNING name", (name,)):
                raise ValueError(f"no API key named {name!r}; keys: {', '.join(self.names()) or 'none'}")
        self._read_at = -math.inf

    def names(self) -> dict[str, str]:
        return {name: entry.created for name, entry in self.entries().items()}

    def entries(self) -> dict[str, KeyEntry]:
        return {entry.name: entry for entry in self._read().values()}

    def valid(self, key: str | None) -> bool:
        return self.lookup(key) is not None

    def lookup(self, key: str | None) -> KeyEntry | None:
        """The entry of `key` if it is a current key (the table is re-read at most every KEYS_REFRESH_S)."""
        if not key:
            return None
        if time.monotonic() - self._read_at >= KEYS_REFRESH_S:
            self._digests = self._read()
            self._read_at = time.monotonic()
        return self._digests.get(_digest(key))  # a dict lookup of a digest: no timing left to compare

    def _read(self) -> dict[str, KeyEntry]:
        with _busy("reading the keys", KeyStoreError):
            found = self.db.rows("SELECT name, sha256, created, scopes, rps, burst, daily_quota FROM api_keys "
                                 "ORDER BY name")
        out = {}
        for name, sha256, created, scopes, rps, burst, quota in found:
            e = {"scopes": scopes, "rps": rps, "burst": burst, "daily_quota": quota}
            if problem := _entry_problem(e):
                raise KeyStoreError(f"key {name!r} in the state database: {problem}: revoke it and add it again")
            out[sha256] = KeyEntry(name, created, tuple(scopes or DEFAULT_SCOPES), rps, burst, quota)
        return out


class PgLimits:
    """SharedState's interface on the state database (and Redis for the buckets, when given): N replicas together
    admit what one bucket allows, and count each key's rows against its daily quota exactly."""

    def __init__(self, db: Database, buckets: Any = None) -> None:
        self.db = db
        self.buckets = buckets  # RedisBuckets, or None: the buckets live in the database too
        self._draining: dict[str, tuple[float, bool]] = {}  # server -> (read at, draining): polled, not per request

    def admit(self, server: str, name: str | None, limit: Limit | None, now: float | None = None) -> Decision:
        """Take one token from key `name`'s bucket and count the request (None: no key; only draining applies).
        The daily quota is checked exactly when the rows are charged (`charge`)."""
        if self.draining(server):
            return Decision("draining", DRAIN_RETRY_S)
        if name is None or limit is None:
            return Decision(None)
        if self.buckets is not None:
            tokens, admitted = self.buckets.take(name, limit)
        else:
            tokens, admitted = self._take(name, limit)
        if admitted:
            return Decision(None, 0, limit, int(tokens), refill_s(limit, tokens))
        assert limit.rps is not None  # without a rate the bucket is always full
        return Decision("rate", max(1, math.ceil((1 - tokens) / limit.rps)), limit, 0, refill_s(limit, tokens))

    def _take(self, name: str, limit: Limit) -> tuple[float, bool]:
        """The bucket in the database: one locked row, the database's clock."""
        with _busy("checking a rate limit"), self.db.transaction() as conn:
            conn.execute("INSERT INTO key_usage VALUES (%s, %s, " + _NOW + ", 0, 0, 0, 0, 0) ON CONFLICT (name) "  # nosec B608
                         "DO NOTHING", (name, float(limit.burst)))
            found = conn.execute(
                "SELECT tokens, updated, " + _NOW + " FROM key_usage WHERE name = %s FOR UPDATE", (name,)).fetchone()  # nosec B608
            assert found is not None  # inserted above
            tokens, updated, now = found
            tokens = float(limit.burst) if limit.rps is None else min(
                float(limit.burst), tokens + max(0.0, float(now) - updated) * limit.rps)
            admitted = tokens >= 1
            tokens -= 1.0 if admitted else 0.0
            conn.execute("UPDATE key_usage SET tokens = %s, updated = %s, requests = requests + 1, "
                         "limited = limited + %s WHERE name = %s", (tokens, now, int(not admitted), name))
        return tokens, admitted

    def charge(self, name: str, rows: int, limit: Limit, now: float | None = None) -> int | None:
        """Count `rows` admitted rows of key `name` (its UTC day by the database's clock); None if its daily quota
        allows them, else the rows it has left today (then nothing is counted but a 429). The check and the count
        are one UPDATE of the key's row: replicas that charge at once queue on its lock, none overshoots."""
        today = f"floor({_NOW} / {DAY_S})::bigint"
        used = f"(CASE WHEN u.day = {today} THEN u.day_rows ELSE 0 END)"
        args = {"name": name, "rows": rows, "quota": limit.daily_quota, "burst": float(limit.burst)}
        fits = "(%(quota)s::bigint IS NULL OR %(rows)s <= %(quota)s)"  # a key's first rows
        with _busy("counting rows against a quota"):
            # one statement, one round trip: a new key's row is inserted with its rows if they fit (else with
            # none: day_rows 0 says refused), an existing one is updated only if they fit (else no row returned)
            charged = self.db.rows(
                f"INSERT INTO key_usage AS u VALUES (%(name)s, %(burst)s, {_NOW}, {today}, CASE WHEN {fits} THEN "  # nosec B608
                f"%(rows)s ELSE 0 END, 0, CASE WHEN {fits} THEN %(rows)s ELSE 0 END, 0) ON CONFLICT (name) DO UPDATE "
                f"SET day = {today}, day_rows = {used} + %(rows)s, rows = u.rows + %(rows)s WHERE %(quota)s::bigint "
                f"IS NULL OR {used} + %(rows)s <= %(quota)s RETURNING day_rows", args)
            if charged and charged[0][0] > 0:
                return None
            found = self.db.rows(f"UPDATE key_usage AS u SET limited = u.limited + 1 WHERE name = %(name)s "  # nosec B608
                                 f"RETURNING {used}", args)[0]
        assert limit.daily_quota is not None and found is not None  # without a quota the update above counts
        return max(0, limit.daily_quota - int(found[0]))

    def refund(self, name: str, rows: int, now: float | None = None) -> None:
        """Take back `rows` that `charge` counted today for key `name` (a request it then could not answer)."""
        with _busy("refunding rows"):
            self.db.rows(f"UPDATE key_usage SET day_rows = GREATEST(0, day_rows - %s), rows = GREATEST(0, rows - %s) "  # nosec B608
                         f"WHERE name = %s AND day = floor({_NOW} / {DAY_S})::bigint RETURNING name",
                         (rows, rows, name))

    def forget(self, name: str) -> None:
        """Drop key `name`'s bucket, quota and counts: a new key given a revoked key's name starts afresh."""
        with _busy("forgetting a key's usage"):
            self.db.rows("DELETE FROM key_usage WHERE name = %s RETURNING name", (name,))
        if self.buckets is not None:
            self.buckets.forget(name)

    def usage(self, now: float | None = None) -> dict[str, Usage]:
        """Every key's counts over the whole fleet."""
        with _busy("reading usage"):
            found = self.db.rows(f"SELECT name, requests, rows, limited, CASE WHEN day = floor({_NOW} / {DAY_S}) "  # nosec B608
                                 f"THEN day_rows ELSE 0 END FROM key_usage ORDER BY name")
        usage = {name: Usage(int(r), int(rows), int(lim), int(today)) for name, r, rows, lim, today in found}
        if self.buckets is not None:
            for name, (requests, limited) in self.buckets.counts().items():
                before = usage.get(name, Usage(0, 0, 0, 0))
                usage[name] = Usage(before.requests + requests, before.rows, before.limited + limited,
                                    before.rows_today)
        return dict(sorted(usage.items()))

    def draining(self, server: str) -> bool:
        """Whether `server` drains, as read at most POLL_S ago (a request does not wait for the database)."""
        at, draining = self._draining.get(server, (-math.inf, False))
        if time.monotonic() - at >= POLL_S:
            with _busy("reading the drain flag"):
                draining = self.db.rows("SELECT draining FROM servers WHERE id = %s", (server,)) == [(True,)]
            self._draining[server] = (time.monotonic(), draining)
        return draining

    def set_draining(self, server: str, draining: bool) -> None:
        with _busy("setting the drain flag"):
            self.db.rows("INSERT INTO servers (id, draining) VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET draining "
                         "= excluded.draining RETURNING id", (server, draining))
        self._draining[server] = (time.monotonic(), draining)

    def reload_generation(self, server: str) -> int:
        with _busy("reading reload requests"):
            found = self.db.rows("SELECT reload FROM servers WHERE id = %s", (server,))
        return int(found[0][0]) if found else 0

    def request_reload(self, server: str) -> int:
        with _busy("asking for a reload"):
            return int(self.db.rows("INSERT INTO servers (id, reload) VALUES (%s, 1) ON CONFLICT (id) DO UPDATE SET "
                                    "reload = servers.reload + 1 RETURNING reload", (server,))[0][0])

    def followed(self, server: str, pid: int, generation: int, now: float | None = None) -> None:
        with _busy("recording a reload"), self.db.transaction() as conn:
            conn.execute(f"INSERT INTO workers VALUES (%s, %s, %s, {_NOW}) ON CONFLICT (server, pid) DO UPDATE SET "  # nosec B608
                         f"followed = excluded.followed, seen = excluded.seen", (server, pid, generation))
            conn.execute(f"DELETE FROM workers WHERE seen < {_NOW} - %s", (STALE_WORKER_S,))  # nosec B608

    def followers(self, server: str, generation: int) -> int:
        with _busy("counting reloaded workers"):
            return int(self.db.rows("SELECT COUNT(*) FROM workers WHERE server = %s AND followed >= %s",
                                    (server, generation))[0][0])

    # the fleet's canary routing: one row, written by the project host, read by every replica
    def routing(self) -> tuple[float, bool] | None:
        """(canary share, shadow) as published, or None when nothing was."""
        with _busy("reading the canary routing"):
            found = self.db.rows("SELECT canary_share, shadow FROM routing")
        return (float(found[0][0]), bool(found[0][1])) if found else None

    def publish_routing(self, canary_share: float, shadow: bool) -> None:
        with _busy("publishing the canary routing"):
            self.db.rows("INSERT INTO routing VALUES (true, %s, %s) ON CONFLICT (one) DO UPDATE SET canary_share = "
                         "excluded.canary_share, shadow = excluded.shadow RETURNING one", (canary_share, shadow))


class PgRegistry:
    """The registry's aliases, versions' metadata and decision log in the state database; a change of champion
    and its decision are one transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def aliases(self) -> dict[str, Any] | None:
        """The aliases, or None when this database has none yet."""
        found = self.db.rows("SELECT champion, challenger, champion_history FROM registry_aliases")
        if not found:
            return None
        champion, challenger, history = found[0]
        return {"champion": champion, "challenger": challenger, "champion_history": list(history)}

    def decisions(self) -> list[dict[str, Any]]:
        return [row[0] for row in self.db.rows("SELECT decision FROM registry_decisions ORDER BY seq")]

    def change(self, aliases: dict[str, Any] | None = None, decision: dict[str, Any] | None = None) -> None:
        """Set the aliases and append the decision, all or nothing."""
        with self.db.transaction() as conn:
            if aliases is not None:
                conn.execute("INSERT INTO registry_aliases VALUES (true, %(champion)s, %(challenger)s, %(history)s) "
                             "ON CONFLICT (one) DO UPDATE SET champion = excluded.champion, challenger = "
                             "excluded.challenger, champion_history = excluded.champion_history",
                             {"champion": aliases["champion"], "challenger": aliases["challenger"],
                              "history": Jsonb(aliases["champion_history"])})
            if decision is not None:
                conn.execute("INSERT INTO registry_decisions (decision) VALUES (%s)", (Jsonb(decision),))

    def seed(self, aliases: dict[str, Any], decisions: list[dict[str, Any]]) -> bool:
        """Copy a project's file registry here once (a project moving to the fleet); False if this one has aliases."""
        with self.db.transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID + 1,))
            if conn.execute("SELECT 1 FROM registry_aliases").fetchone():
                return False
            conn.execute("INSERT INTO registry_aliases VALUES (true, %s, %s, %s)",
                         (aliases["champion"], aliases["challenger"], Jsonb(aliases["champion_history"])))
            for decision in decisions:
                conn.execute("INSERT INTO registry_decisions (decision) VALUES (%s)", (Jsonb(decision),))
        return True

    def put_version(self, version: str, metadata: dict[str, Any], bento: str | None = None) -> None:
        self.db.rows("INSERT INTO registry_versions (version, metadata, bento) VALUES (%s, %s, %s) ON CONFLICT "
                     "(version) DO UPDATE SET metadata = excluded.metadata, bento = COALESCE(excluded.bento, "
                     "registry_versions.bento) RETURNING version", (version, Jsonb(metadata), bento))

    def version(self, version: str) -> dict[str, Any] | None:
        """{"metadata": ..., "bento": tag or None} of a registered version, or None."""
        found = self.db.rows("SELECT metadata, bento FROM registry_versions WHERE version = %s", (version,))
        return {"metadata": found[0][0], "bento": found[0][1]} if found else None

    def versions(self) -> list[str]:
        return [row[0] for row in self.db.rows("SELECT version FROM registry_versions ORDER BY version")]


class PgPredictionLog(GroupCommit):
    """The prediction log as rows of the state database, with PredictionLog's promise: `write` queues a batch's
    entries and returns a ticket, `sync(ticket)`/`synced()` return once a committed transaction holds them. One
    writer thread commits whatever has queued meanwhile in one COPY (group commit), so the log costs a commit per
    batch of answers, not per row; a failed commit is retried, and the answers wait (`sync` gives up after
    SYNC_TIMEOUT_S with StateBusy: the gateway answers 503, never an answer that is not logged)."""

    SYNC_TIMEOUT_S = 10.0

    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pending: list[dict[str, Any]] = []
        self._writer: threading.Thread | None = None

    def write(self, records: Iterable[PredictionRecord | dict[str, Any]]) -> int:
        entries = [r.to_dict() if isinstance(r, PredictionRecord) else r for r in records]
        with self._lock:
            if entries:
                self._pending.extend(entries)
                self._written += 1
                if self._writer is None or not self._writer.is_alive():
                    self._writer = threading.Thread(target=self._write_loop, daemon=True, name="predlog-pg")
                    self._writer.start()
                self._changed.notify_all()
            return self._written

    def sync(self, ticket: int) -> None:
        deadline = time.monotonic() + self.SYNC_TIMEOUT_S
        with self._lock:
            while self._durable < ticket:
                if not self._changed.wait(timeout=max(0.0, deadline - time.monotonic())) and \
                        time.monotonic() >= deadline:
                    raise StateBusy(f"the prediction log could not be written to the state database within "
                                    f"{self.SYNC_TIMEOUT_S:.0f} s (see the server log)")

    def _write_loop(self) -> None:
        delay = 0.05
        while True:
            with self._lock:
                while not self._pending:
                    self._changed.wait()
                batch, covered = self._pending, self._written
                self._pending = []
            try:
                self._insert(batch)
            except psycopg.Error:
                log.exception("prediction log: %d entries not written yet; retrying in %.1f s", len(batch), delay)
                with self._lock:
                    self._pending = batch + self._pending
                time.sleep(delay)
                delay = min(2.0, delay * 2)
                continue
            delay = 0.05
            with self._lock:
                self._durable = max(self._durable, covered)
                self._changed.notify_all()

    def _insert(self, entries: list[dict[str, Any]]) -> None:
        with self.db.transaction() as conn, conn.cursor().copy(
                "COPY prediction_log (at, request_id, model_version, route, key_name, entry) FROM STDIN") as copy:
            for e in entries:
                copy.write_row((e.get("time"), e.get("request_id"), e.get("model_version"), e.get("route"),
                                e.get("key_name"), orjson.dumps(e, default=str).decode()))

    def read(self, since: datetime | None = None) -> list[PredictionRecord]:
        """Every logged prediction of the fleet (since `since`, when given), oldest first."""
        sql = "SELECT entry FROM prediction_log" + (" WHERE at >= %s" if since else "") + " ORDER BY at, seq"  # nosec B608
        with _busy("reading the prediction log"):
            found = self.db.rows(sql, (since,) if since else ())
        return [PredictionRecord.from_dict(row[0] if isinstance(row[0], dict) else json.loads(row[0]))
                for row in found]
