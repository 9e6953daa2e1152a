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


class KeyStoreError(ValueError):
    """The key file exists but cannot be read as a key store: no key can be checked until it is repaired."""


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
        return self.name_of(key) is not None

    def name_of(self, key: str | None) -> str | None:
        """The name of `key` if it is a current key, else None (KeyStoreError: the file is corrupt)."""
        if not key:
            return None
        mtime = self.path.stat().st_mtime if self.path.is_file() else None
        if mtime != self._mtime:
            self._digests = {e["sha256"]: n for n, e in self._read().items()}
            self._mtime = mtime
        given = _digest(key)
        return next((name for d, name in self._digests.items() if hmac.compare_digest(given, d)), None)

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        try:
            entries = read_json(self.path)
            if not isinstance(entries, dict) or not all(
                    isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("created"), str)
                    for e in entries.values()):
                raise ValueError("not an object of {name: {sha256, created}}")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise KeyStoreError(
                f"the API key file {self.path} is corrupt ({str(exc)[:200]}): move it aside (keys in it cannot be "
                f"recovered, they are stored hashed), then create keys again with `amaas keys add NAME` and give "
                f"them to the clients") from exc
        return entries


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
