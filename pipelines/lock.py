"""One pipeline at a time per project: an exclusive lock on <root>/.amaas.lock.

A second `amaas run` (or stage, or Airflow task) on the same project waits for the first and says
whom it waits for; after `pipeline.lock_timeout_s` it stops with a message naming the holder. The
kernel drops the lock when its process dies, even by SIGKILL, so a killed run never blocks the next.
Re-entrant within a process: `amaas run` holds it across its stages.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)
LOCK_FILE = ".amaas.lock"
_held: dict[Path, int] = {}  # lock file -> nesting depth in this process


class PipelineLocked(RuntimeError):
    """Another pipeline run holds the project for longer than we may wait."""


@contextlib.contextmanager
def project_lock(root: Path, timeout_s: float, poll_s: float = 0.5) -> Iterator[None]:
    path = (root / LOCK_FILE).resolve()
    if _held.get(path):
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, timeout_s, poll_s)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv[:3]),
                                 "since": datetime.now(UTC).isoformat(timespec="seconds")}).encode())
        _held[path] = 1
        try:
            yield
        finally:
            _held.pop(path, None)
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path, timeout_s: float, poll_s: float) -> None:
    deadline, told = time.monotonic() + timeout_s, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = _holder(path)
            if time.monotonic() >= deadline:
                raise PipelineLocked(f"another pipeline run holds {path} ({holder}) and did not finish within "
                                     f"pipeline.lock_timeout_s={timeout_s:g}s: wait for it, or stop it if it "
                                     f"hangs") from None
            if not told:
                log.warning("waiting for another pipeline run on this project to finish (%s)", holder)
                told = True
            time.sleep(poll_s)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info['pid']}, `{info['command']}`, since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
