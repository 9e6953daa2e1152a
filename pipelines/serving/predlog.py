"""The prediction log: one typed record per answered row, appended as JSON Lines by the service and read
back by monitoring (`report.current: prediction_log`) and the tests."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_ANSWER = ("label", "probabilities", "probability", "value")  # written when set, in this order
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)  # one, not one per line as json.dumps(...) makes


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
    model_version: str | None = None
    request_id: str | None = None
    key_name: str | None = None  # the name of the API key that sent the request (never the key); older lines: None
    route: str | None = None  # champion | challenger | shadow
    id: int | str | None = None
    features: dict[str, Any] = field(default_factory=dict)
    shadow_model_version: str | None = None
    shadow: dict[str, Any] | None = None  # the challenger's answer, not sent to the client
    output: list[float] | float | None = None  # older lines only: the class probabilities as a list, or the value

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the record: answer fields and `output` only when set, shadow fields only for
        shadow traffic."""
        out: dict[str, Any] = {"time": self.time}
        for name in _ANSWER:
            if (value := getattr(self, name)) is not None:
                out[name] = value
        out["model_version"], out["request_id"] = self.model_version, self.request_id
        if self.key_name is not None:
            out["key_name"] = self.key_name
        out["route"], out["id"], out["features"] = self.route, self.id, self.features
        if self.shadow is not None:
            out["shadow_model_version"], out["shadow"] = self.shadow_model_version, self.shadow
        if self.output is not None:
            out["output"] = self.output
        return out

    def to_json(self) -> str:
        return _ENCODER.encode(self.to_dict())

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


class PredictionLog:
    """Append-only JSON Lines, one file per day and process, readable by owner and group only (0640: rows
    are customer data). Group commit: `append` returns once an fsync that began after its write has returned,
    and one fsync covers every batch written before it began, so concurrent callers share fsyncs instead of
    queueing one each. Safe for any number of threads; processes never share a file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._synced = threading.Condition(self._lock)  # notified when an fsync ends
        self._file: tuple[str, int, int] | None = None  # (day, pid, fd) of the open file
        self._written = 0  # appends written so far (the ticket of the newest)
        self._durable = 0  # appends an fsync covered
        self._syncing = False  # an fsync is running (outside the lock)

    def append(self, records: list[PredictionRecord]) -> None:
        """Write `records` and return once they are on disk (acknowledged means logged: a crash after the
        answer loses nothing)."""
        if not records:
            return
        data = "".join(r.to_json() + "\n" for r in records).encode()
        with self._lock:
            fd = self._open()
            _write_all(fd, data)
            self._written += 1
            ticket = self._written
            while self._durable < ticket:
                if self._syncing:  # a running fsync may have begun before this write: wait for its end
                    self._synced.wait()
                    continue
                self._syncing, covered = True, self._written
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
        for line in file.read_text().splitlines():
            try:
                records.append(PredictionRecord.from_json(line))
            except json.JSONDecodeError:
                log.warning("skipping a partial line in %s", file)
    return records


def now_iso() -> str:
    """The wall-clock time of a prediction, for the log."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")
