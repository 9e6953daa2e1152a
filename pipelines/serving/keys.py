"""The API key store: keys kept as SHA-256 digests by name, shared by `amaas keys` and the gateway."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.io import read_json, write_json


class ApiKeys:
    """API keys stored as SHA-256 digests (keys are 256-bit random, so a fast hash is enough), by name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: float | None = None
        self._digests: dict[str, str] = {}

    def add(self, name: str) -> str:
        """Create a key called `name`; return it (shown once, never stored)."""
        entries = self._read()
        if name in entries:
            raise ValueError(f"an API key named {name!r} exists: revoke it first or pick another name")
        key = "amaas_" + secrets.token_urlsafe(32)
        entries[name] = {"sha256": _digest(key), "created": datetime.now(UTC).isoformat(timespec="seconds")}
        write_json(self.path, entries)
        os.chmod(self.path, 0o600)
        return key

    def revoke(self, name: str) -> None:
        entries = self._read()
        if entries.pop(name, None) is None:
            raise ValueError(f"no API key named {name!r}; keys: {', '.join(entries) or 'none'}")
        write_json(self.path, entries)

    def names(self) -> dict[str, str]:
        return {name: e["created"] for name, e in self._read().items()}

    def valid(self, key: str | None) -> bool:
        """Whether `key` is a current key; the file is re-read when it changes, so revocation is immediate."""
        if not key:
            return False
        mtime = self.path.stat().st_mtime if self.path.is_file() else None
        if mtime != self._mtime:
            self._digests, self._mtime = {e["sha256"]: n for n, e in self._read().items()}, mtime
        given = _digest(key)
        return any(hmac.compare_digest(given, d) for d in self._digests)

    def _read(self) -> dict[str, Any]:
        return read_json(self.path) if self.path.is_file() else {}


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
