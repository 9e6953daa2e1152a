"""The prediction log: one typed record per answered row, appended as JSON Lines by the service and read
back by monitoring (`report.current: prediction_log`) and the tests."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)
_ANSWER = ("label", "probabilities", "probability", "value", "unseen", "out_of_reference")  # written when set
# orjson: a third of the standard encoder's time per line (measured on 100-row requests); NaN is written as null,
# UTF-8 as is; numpy scalars as numbers; anything else as its text
_LINE = orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY
# Where one entry ends and the next begins in the JSON of a list of entries: every entry starts with its time (see
# log_entry), no entry holds a list of objects, and inside a JSON string a quote is always escaped
_BETWEEN, _NEWLINE = b'},{"time":', b'}\n{"time":'


@dataclass(frozen=True, kw_only=True)
class PredictionRecord:
    """One logged prediction: when, the answer (classification: the label, each class's probability and,
    binary, the positive class's; regression: the value), which model gave it to which request over which
    route, the row's id (to join delayed labels) and features, and for shadow traffic the challenger's
    answer. On disk it is one JSON object per line with exactly these keys."""

    time: str | None = None  # ISO 8601, UTC
    label: int | str | None = None
    probabilities: dict[str, float] | None = None
    probability: float | None = None
    value: float | None = None
    unseen: list[str] | None = None  # columns whose category the model never saw (answered as the unknown one)
    out_of_reference: list[str] | None = None  # numeric columns outside their reference range
    model_version: str | None = None
    request_id: str | None = None
    key_name: str | None = None  # the name of the API key that sent the request (never the key); older lines: None
    route: str | None = None  # champion | challenger | shadow
    id: int | str | None = None
    row_time: Any = None  # the row's own time column as the client sent it (not a feature); older lines: None
    features: dict[str, Any] = field(default_factory=dict)
    shadow_model_version: str | None = None
    shadow: dict[str, Any] | None = None  # the challenger's answer, not sent to the client
    output: list[float] | float | None = None  # older lines only: the class probabilities as a list, or the value
    explained: bool = False  # answered on /explain (with an explanation, which is not logged)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the record (see `log_entry`)."""
        return log_entry(time=self.time, answer={name: getattr(self, name) for name in _ANSWER},
                         model_version=self.model_version, request_id=self.request_id, key_name=self.key_name,
                         route=self.route, id=self.id, row_time=self.row_time, features=self.features,
                         shadow_model_version=self.shadow_model_version, shadow=self.shadow, output=self.output,
                         explained=self.explained)

    def to_line(self) -> bytes:
        """The record as one line of the log: strict JSON, UTF-8, ending in a newline."""
        return to_line(self.to_dict())

    def to_json(self) -> str:
        return self.to_line()[:-1].decode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PredictionRecord:
        """A record from its JSON object, older shapes included: the id under "key", the answer fields
        under "output" (a dict of them, or the canonical output). Unknown keys are ignored."""
        output = data.get("output")
        if isinstance(output, dict):
            data, output = {**data, **output}, None
        known = {f.name for f in dataclasses.fields(cls)} - {"output", "id"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   id=data.get("id") if data.get("id") is not None else data.get("key"), output=output)

    @classmethod
    def from_json(cls, line: str) -> PredictionRecord:
        return cls.from_dict(json.loads(line))


def log_entry(*, time: str | None, answer: dict[str, Any], model_version: str | None, request_id: str | None,
              key_name: str | None, route: str | None, id: int | str | None, features: dict[str, Any],
              row_time: Any = None, shadow_model_version: str | None = None, shadow: dict[str, Any] | None = None,
              output: list[float] | float | None = None, explained: bool = False) -> dict[str, Any]:
    """The JSON object of one logged prediction, with the keys of PredictionRecord in its order: answer fields
    (of `answer`) and `output` only when set, `key_name` and `row_time` when known, the shadow fields for shadow
    traffic only, `explained` for an answer of /explain only.
    The service builds these directly (a record object per row cost half the log's time on 100-row requests)."""
    out: dict[str, Any] = {"time": time}
    for name in _ANSWER:
        if (value := answer.get(name)) is not None:
            out[name] = value
    out["model_version"], out["request_id"] = model_version, request_id
    if key_name is not None:
        out["key_name"] = key_name
    out["route"], out["id"] = route, id
    if row_time is not None:
        out["row_time"] = row_time
    out["features"] = features
    if shadow is not None:
        out["shadow_model_version"], out["shadow"] = shadow_model_version, shadow
    if output is not None:
        out["output"] = output
    if explained:
        out["explained"] = True
    return out


def to_line(entry: dict[str, Any]) -> bytes:
    """A log entry as one line of the log: strict JSON, UTF-8, ending in a newline."""
    return orjson.dumps(entry, default=str, option=_LINE)


def to_lines(entries: list[dict[str, Any]]) -> bytes:
    """Log entries as lines of the log, the same bytes as `to_line` of each: one orjson call for the whole list, cut
    between entries (a tenth of the time of a call per entry on 100 rows, measured: 75 against 770-1,080 us)."""
    if len(entries) < 2 or any(next(iter(entry), None) != "time" for entry in entries):
        return b"".join(map(to_line, entries))
    data = orjson.dumps(entries, default=str, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]
    if data.count(_BETWEEN) != len(entries) - 1:  # a cut inside an entry (a list of objects in it): one call each
        return b"".join(map(to_line, entries))
    return data.replace(_BETWEEN, _NEWLINE) + b"\n"


class GroupCommit:
    """What every prediction log shares: writes return tickets, `sync(ticket)` returns once they are durable, and
    `synced` waits for that on the log's own thread, off the event loop (one thread: each sync there covers every
    caller that came before it). Subclasses set `_written` and `_durable` and implement `write` and `sync`."""

    _written = 0  # writes so far (the ticket of the newest)
    _durable = 0  # writes known to be durable
    _syncer: ThreadPoolExecutor | None = None  # the thread `synced` waits on
    # the event loop whose answers wait, its (ticket, future) waiters and the task that syncs for them
    _waiting: tuple[asyncio.AbstractEventLoop, list[tuple[int, asyncio.Future[None]]], asyncio.Task[None]] | None = None

    def write(self, records: Iterable[PredictionRecord | dict[str, Any]]) -> int:
        raise NotImplementedError

    def sync(self, ticket: int) -> None:
        raise NotImplementedError

    def append(self, records: Iterable[PredictionRecord | dict[str, Any]]) -> None:
        """Write `records` and return once they are durable (acknowledged means logged)."""
        self.sync(self.write(records))

    async def synced(self) -> None:
        """Return once everything written before this call is durable, without blocking the event loop.

        The answers waiting on one event loop share one trip to the log's thread per sync (a future each, resolved
        together), rather than a trip each: a thread hop per request cost the 1-row closed loop a tenth of its
        server CPU."""
        ticket = self._written
        if self._durable >= ticket:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        if self._waiting is None or self._waiting[0] is not loop or self._waiting[2].done():
            waiters: list[tuple[int, asyncio.Future[None]]] = [(ticket, waiter)]
            self._waiting = (loop, waiters, loop.create_task(self._sync_waiters(waiters)))
        else:
            self._waiting[1].append((ticket, waiter))
        await waiter

    async def _sync_waiters(self, waiters: list[tuple[int, asyncio.Future[None]]]) -> None:
        """Sync on the log's thread until no answer waits: each sync covers every waiter that came before it began
        (later ones wait for the next: their rows may have been written after it began)."""
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(1, thread_name_prefix="predlog-sync")
        loop = asyncio.get_running_loop()
        while waiters:
            ticket = max(t for t, _ in waiters)
            error: BaseException | None = None
            try:
                await loop.run_in_executor(self._syncer, self.sync, ticket)
            except Exception as exc:  # StateBusy from a fleet's log: every answer it covers gets it
                error = exc
            covered = [w for w in waiters if w[0] <= ticket]
            waiters[:] = [w for w in waiters if w[0] > ticket]
            for _, waiter in covered:
                if not waiter.done():  # a request that was cancelled meanwhile
                    if error is None:
                        waiter.set_result(None)
                    else:
                        waiter.set_exception(error)


class PredictionLog(GroupCommit):
    """Append-only JSON Lines, one file per day and process, readable by owner and group only (0640: rows
    are customer data). Safe for any number of threads; processes never share a file.

    Group commit: `sync(ticket)` returns once an fsync that began after write `ticket` has returned, and one fsync
    covers every write before it began, so concurrent callers share fsyncs instead of queueing one each. The
    server writes a batch's records without waiting (`write`, in the batch) and its gateway holds each answer
    until they are durable (`synced`, on the event loop): the next batch is scored while the fsync runs, and
    still no answered row is missing from the log after a crash."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._synced = threading.Condition(self._lock)  # notified when an fsync ends
        self._file: tuple[str, int, int] | None = None  # (day, pid, fd) of the open file
        self._syncing = False  # an fsync is running (outside the lock)

    def write(self, records: Iterable[PredictionRecord | dict[str, Any]]) -> int:
        """Write `records` (records, or entries of `log_entry`), not yet durable (see sync); the ticket that
        covers them."""
        data = to_lines([r.to_dict() if isinstance(r, PredictionRecord) else r for r in records])
        with self._lock:
            if data:
                _write_all(self._open(), data)
                self._written += 1
            return self._written

    def sync(self, ticket: int) -> None:
        """Return once every write up to `ticket` is on disk."""
        with self._lock:
            while self._durable < ticket:
                if self._syncing:  # a running fsync may have begun before this write: wait for its end
                    self._synced.wait()
                    continue
                assert self._file is not None  # a write opened it, and only a newer day's file replaces it
                self._syncing, covered, fd = True, self._written, self._file[2]
                self._lock.release()  # the others write (and wait) while this fsync runs
                try:
                    os.fsync(fd)
                finally:
                    self._lock.acquire()
                    self._syncing = False
                    self._synced.notify_all()
                self._durable = max(self._durable, covered)

    def _open(self) -> int:
        """The fd of today's file of this process (under the lock), opened again if the file was moved or
        deleted, and 0640 even if someone widened it; the previous day's file is synced and closed."""
        day, pid = datetime.now(UTC).strftime("%Y-%m-%d"), os.getpid()
        path = self.folder / f"{day}-{pid}.jsonl"
        if not (self._file and self._file[:2] == (day, pid) and _same_file(path, self._file[2])):
            if self._file and self._file[1] == pid:  # a forked child leaves its parent's file alone
                while self._syncing:  # what went to the old file is made durable before it is closed
                    self._synced.wait()
                os.fsync(self._file[2])
                os.close(self._file[2])
                self._durable = self._written
            self._file = (day, pid, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640))
        fd = self._file[2]
        if os.fstat(fd).st_mode & 0o037:  # an older, wider file (or a lax umask the other way round)
            os.fchmod(fd, 0o640)
        return fd


def _same_file(path: Path, fd: int) -> bool:
    try:
        found, opened = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (found.st_dev, found.st_ino) == (opened.st_dev, opened.st_ino)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_prediction_log(folder: Path) -> list[PredictionRecord]:
    """Every logged prediction, oldest file first (a partial last line from a crash is skipped)."""
    records = []
    for file in sorted(folder.glob("*.jsonl")):
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(PredictionRecord.from_json(line))
            except json.JSONDecodeError:
                log.warning("skipping a partial line in %s", file)
    return records


def now_iso() -> str:
    """The wall-clock time of a prediction, for the log."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")
