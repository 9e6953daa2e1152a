"""What the workers of one server share: per-key token buckets, daily row quotas and usage counts, and each
server's drain flag and reload requests, in one SQLite file (WAL mode) beside the key store.

Every check is one `BEGIN IMMEDIATE` transaction: a read-modify-write that no other worker can interleave, so
N workers together admit what one bucket allows, never N times that. SQLite rather than Redis because the
workers of one `amaas serve` share a local disk: no server to run, and a check costs tens of microseconds
(`python benchmarks/limits.py`). WAL lets readers (/metrics, `amaas keys list`) go on while a worker writes;
`synchronous=NORMAL` skips the fsync per check (a power cut may lose the last counts, never corrupt the file).
The file must be on a local disk: SQLite's locks are not reliable over NFS.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

STATE_FILE = "limits.db"  # beside the key store (.amaas/)
RELOAD_LOCK = "reload.lock"  # beside it too: held by the worker that is loading a new model (one_at_a_time)
SERVER_ENV = "AMAAS_SERVER_ID"  # set by `amaas serve` for all workers of one server start
BUSY_TIMEOUT_S = 0.2  # a check waits at most this long for another worker's transaction, then 503
POLL_S = 0.2  # how often a worker looks for a reload that another worker was asked for
DAY_S = 86_400  # UTC days: Unix time has no leap seconds, so a day starts at a multiple of this
DRAIN_RETRY_S = 5  # Retry-After of a request refused by a draining server (a balancer moves away meanwhile)
STALE_WORKER_S = DAY_S  # a worker that has not followed for this long is forgotten
log = logging.getLogger("amaas.limits")

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    name TEXT PRIMARY KEY,                      -- the key's name (never the key)
    tokens REAL NOT NULL, updated REAL NOT NULL,  -- the token bucket, as of `updated` (Unix time)
    day INTEGER NOT NULL, day_rows INTEGER NOT NULL,  -- rows admitted on UTC day `day` (the quota)
    requests INTEGER NOT NULL, rows INTEGER NOT NULL, limited INTEGER NOT NULL);  -- totals: usage, 429s
CREATE TABLE IF NOT EXISTS servers (id TEXT PRIMARY KEY, draining INTEGER NOT NULL, reload INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS workers (
    server TEXT NOT NULL, pid INTEGER NOT NULL, followed INTEGER NOT NULL, seen REAL NOT NULL,
    PRIMARY KEY (server, pid));
"""


class StateBusy(RuntimeError):
    """The shared state stayed locked (or unreachable) past its timeout: answer 503, retry."""


@dataclass(frozen=True)
class Limit:
    """A key's limits: rps (None: no rate limit), the bucket's size, and rows per UTC day (None: no quota)."""

    rps: float | None
    burst: int
    daily_quota: int | None


@dataclass(frozen=True)
class Decision:
    """The answer to one request: `refused` is None (go on), "rate" or "quota" (429), or "draining" (503)."""

    refused: str | None
    retry_after_s: int = 0
    limit: Limit | None = None
    remaining: int = 0  # whole tokens left in the bucket after this request
    reset_s: int = 0  # seconds until the bucket is full again

    def headers(self) -> list[tuple[bytes, bytes]]:
        """X-RateLimit-* for a rate-limited key (and Retry-After when refused)."""
        out = [] if self.limit is None or self.limit.rps is None else [
            (b"x-ratelimit-limit", str(self.limit.burst).encode()),
            (b"x-ratelimit-remaining", str(self.remaining).encode()),
            (b"x-ratelimit-reset", str(self.reset_s).encode())]
        return out + ([(b"retry-after", str(self.retry_after_s).encode())] if self.refused else [])


@dataclass(frozen=True)
class Usage:
    requests: int  # requests that reached the limiter (admitted or not)
    rows: int  # rows admitted for prediction
    limited: int  # requests answered 429
    rows_today: int  # rows admitted this UTC day (what the daily quota counts)


NO_USAGE = Usage(0, 0, 0, 0)  # a key that has sent nothing yet


def server_id() -> str:
    """Which server this worker belongs to: drain and reload apply to all workers of one server start."""
    return os.environ.get(SERVER_ENV) or f"ppid-{os.getppid()}"  # a bento run without `amaas serve`


def seconds_to_midnight(now: float) -> int:
    return max(1, math.ceil(DAY_S - now % DAY_S))


class SharedState:
    """The SQLite file shared by a server's workers (and read by `amaas keys list`); one connection per thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()

    @classmethod
    def beside(cls, keys_file: Path) -> SharedState:
        return cls(keys_file.with_name(STATE_FILE))

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists()
            conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)  # first use: wait for the others
            if new:
                os.chmod(self.path, 0o600)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(SCHEMA)
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction that holds the write lock from its first read: nothing interleaves with it."""
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StateBusy(f"the shared limits state {self.path} is busy or unreadable ({exc})") from exc

    def _single(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """The rows of one statement, which is a transaction of its own (SQLite autocommit)."""
        try:
            return self._connection().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StateBusy(f"the shared limits state {self.path} is busy or unreadable ({exc})") from exc

    def admit(self, server: str, name: str | None, limit: Limit | None, now: float | None = None) -> Decision:
        """Take one token from key `name`'s bucket, count the request, and say whether it may go on (None: a
        request without a key, where only the drain flag applies)."""
        if name is None or limit is None:
            return Decision("draining", DRAIN_RETRY_S) if self.draining(server) else Decision(None)
        with self._write() as conn:
            # the clock is read holding the write lock: a worker that read it earlier and waited for the lock
            # would write an older time over a newer one, and the refill between them would count twice
            now = time.time() if now is None else now
            if conn.execute("SELECT draining FROM servers WHERE id = ?", (server,)).fetchone() == (1,):
                return Decision("draining", DRAIN_RETRY_S)
            row = conn.execute("SELECT tokens, updated, day, day_rows FROM usage WHERE name = ?", (name,)).fetchone()
            tokens, updated, day, day_rows = row or (float(limit.burst), now, 0, 0)
            now = max(now, updated)  # a clock stepped back refills nothing, and never moves `updated` back
            today = int(now // DAY_S)
            tokens = float(limit.burst) if limit.rps is None else min(
                float(limit.burst), tokens + max(0.0, now - updated) * limit.rps)
            if limit.daily_quota is not None and day == today and day_rows >= limit.daily_quota:
                decision = Decision("quota", seconds_to_midnight(now), limit, int(tokens), 0)
            elif tokens >= 1:
                tokens -= 1
                decision = Decision(None, 0, limit, int(tokens), refill_s(limit, tokens))
            else:
                assert limit.rps is not None  # without a rate the bucket is always full
                decision = Decision("rate", max(1, math.ceil((1 - tokens) / limit.rps)), limit, 0,
                                    refill_s(limit, tokens))
            refused = decision.refused is not None
            conn.execute(
                "INSERT INTO usage VALUES (?, ?, ?, ?, ?, 1, 0, ?) ON CONFLICT(name) DO UPDATE SET tokens = "
                "excluded.tokens, updated = excluded.updated, requests = requests + 1, limited = limited + "
                "excluded.limited", (name, tokens, now, day, day_rows, int(refused)))
        return decision

    def charge(self, name: str, rows: int, limit: Limit, now: float | None = None) -> int | None:
        """Count `rows` admitted rows for key `name`; None if its daily quota allows them, else the rows it has
        left today (then nothing is counted but a 429)."""
        now = time.time() if now is None else now
        today = int(now // DAY_S)
        if limit.daily_quota is None:  # nothing to check: one statement (atomic alone), not a four-step transaction
            self._single("UPDATE usage SET day_rows = (CASE WHEN day = ? THEN day_rows ELSE 0 END) + ?, day = ?, "
                         "rows = rows + ? WHERE name = ?", (today, rows, today, rows, name))
            return None
        with self._write() as conn:
            day, day_rows = conn.execute("SELECT day, day_rows FROM usage WHERE name = ?", (name,)).fetchone() or (
                today, 0)
            used = day_rows if day == today else 0
            if used + rows > limit.daily_quota:
                conn.execute("UPDATE usage SET limited = limited + 1 WHERE name = ?", (name,))
                return limit.daily_quota - used
            conn.execute("UPDATE usage SET day = ?, day_rows = ?, rows = rows + ? WHERE name = ?",
                         (today, used + rows, rows, name))
        return None

    def refund(self, name: str, rows: int, now: float | None = None) -> None:
        """Take back `rows` that `charge` counted today for key `name` (a request it then could not answer)."""
        today = int((time.time() if now is None else now) // DAY_S)
        self._single("UPDATE usage SET day_rows = MAX(0, day_rows - ?), rows = MAX(0, rows - ?) WHERE name = ? AND "
                     "day = ?", (rows, rows, name, today))

    def forget(self, name: str) -> None:
        """Drop key `name`'s bucket, quota and counts: a new key given a revoked key's name starts afresh."""
        self._single("DELETE FROM usage WHERE name = ?", (name,))

    def usage(self, now: float | None = None) -> dict[str, Usage]:
        """Every key's counts, summed over all workers (they all write here)."""
        today = int((time.time() if now is None else now) // DAY_S)
        return {name: Usage(requests, rows, limited, day_rows if day == today else 0)
                for name, requests, rows, limited, day, day_rows in self._single(
                    "SELECT name, requests, rows, limited, day, day_rows FROM usage ORDER BY name")}

    def draining(self, server: str) -> bool:
        return self._single("SELECT draining FROM servers WHERE id = ?", (server,)) == [(1,)]

    def set_draining(self, server: str, draining: bool) -> None:
        with self._write() as conn:
            conn.execute("INSERT INTO servers VALUES (?, ?, 0) ON CONFLICT(id) DO UPDATE SET draining = "
                         "excluded.draining", (server, int(draining)))

    def reload_generation(self, server: str) -> int:
        """How many reloads server `server` has been asked for."""
        found = self._single("SELECT reload FROM servers WHERE id = ?", (server,))
        return int(found[0][0]) if found else 0

    def request_reload(self, server: str) -> int:
        """Ask every worker of `server` to follow the registry now; the generation they will report."""
        with self._write() as conn:
            conn.execute("INSERT INTO servers VALUES (?, 0, 1) ON CONFLICT(id) DO UPDATE SET reload = reload + 1",
                         (server,))
            return int(conn.execute("SELECT reload FROM servers WHERE id = ?", (server,)).fetchone()[0])

    def followed(self, server: str, pid: int, generation: int, now: float | None = None) -> None:
        """Worker `pid` of `server` has followed the registry as reload `generation` asked."""
        now = time.time() if now is None else now
        with self._write() as conn:
            conn.execute("INSERT INTO workers VALUES (?, ?, ?, ?) ON CONFLICT(server, pid) DO UPDATE SET followed "
                         "= excluded.followed, seen = excluded.seen", (server, pid, generation, now))
            conn.execute("DELETE FROM workers WHERE seen < ?", (now - STALE_WORKER_S,))

    def followers(self, server: str, generation: int) -> int:
        """How many workers of `server` have followed reload `generation` (or a later one)."""
        return int(self._single("SELECT COUNT(*) FROM workers WHERE server = ? AND followed >= ?",
                              (server, generation))[0][0])


def refill_s(limit: Limit, tokens: float) -> int:
    return 0 if limit.rps is None else math.ceil((limit.burst - tokens) / limit.rps)


@contextlib.contextmanager
def one_at_a_time(lock_file: Path) -> Iterator[None]:
    """Hold the project's reload lock (flock, exclusive) for a worker's loading of new models: the workers of a
    server switch one after another (a rolling switch), so that the others serve at full speed meanwhile instead of
    all loading at once on the same cores. The kernel releases the lock of a worker that dies."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def keep_following(follow: Callable[[], None], interval_s: float, state: SharedState, server: str) -> NoReturn:
    """Call `follow` every `interval_s`, and within POLL_S when /admin/reload (answered by any worker of this
    server) asks; record each reload generation followed, so that /admin/reload can wait for every worker."""
    followed, due = -1, 0.0
    while True:
        try:
            asked = state.reload_generation(server)
            if asked != followed or time.monotonic() >= due:
                followed, due = asked, time.monotonic() + interval_s  # a failure retries at the next interval
                follow()
                state.followed(server, os.getpid(), asked)
        except Exception:  # a half-finished registry write or a bad bundle must not stop serving
            log.exception("could not follow the registry; still serving the current models")
        time.sleep(POLL_S)


class _KeyUsage(Collector):
    def __init__(self, usage: dict[str, Usage]) -> None:
        self.usage = usage

    def collect(self) -> Iterator[CounterMetricFamily]:
        for metric, what, field in (
                ("amaas_key_requests", "Requests per API key (by its name), all workers", "requests"),
                ("amaas_key_rows", "Rows admitted for prediction per API key, all workers", "rows"),
                ("amaas_key_rate_limited", "Requests answered 429 (rate or daily quota) per API key", "limited")):
            family = CounterMetricFamily(metric, what, labels=["key"])
            for name, counts in self.usage.items():
                family.add_metric([name], float(getattr(counts, field)))
            yield family


def usage_metrics(usage: dict[str, Usage]) -> str:
    """Prometheus text of per-key usage: amaas_key_{requests,rows,rate_limited}_total{key="<name>"}."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_KeyUsage(usage))
    return generate_latest(registry).decode()
