"""The API key store: keys kept as SHA-256 digests by name, with their scopes and limits, shared by `amaas keys`
and the gateway.

An entry is `{sha256, created}` plus only what differs from the defaults: `scopes` (default ["predict"]), `rps`,
`burst`, `daily_quota` (default: serve.rate_limit). Files written before scopes and limits existed read as
predict keys with the default limits.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.config import RateLimitConfig
from pipelines.io import read_json, write_json
from pipelines.state.limits import Limit

SCOPES = ("predict", "admin")  # predict: POST /predict; admin: /admin/reload, /admin/drain, /admin/keys
DEFAULT_SCOPES = ("predict",)


class KeyStoreError(ValueError):
    """The key file exists but cannot be read as a key store: no key can be checked until it is repaired."""


@dataclass(frozen=True)
class KeyEntry:
    """A current key: its name, scopes and own limits (None: serve.rate_limit's)."""

    name: str
    created: str
    scopes: tuple[str, ...] = DEFAULT_SCOPES
    rps: float | None = None
    burst: int | None = None
    daily_quota: int | None = None

    def limit(self, defaults: RateLimitConfig) -> Limit:
        """This key's limits: its own where set, else the defaults."""
        return Limit(self.rps if self.rps is not None else defaults.rps,
                     self.burst if self.burst is not None else defaults.burst,
                     self.daily_quota if self.daily_quota is not None else defaults.daily_quota)


class ApiKeys:
    """API keys stored as SHA-256 digests (keys are 256-bit random, so a fast hash is enough), by name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: float | None = None
        self._digests: dict[str, KeyEntry] = {}

    def add(self, name: str, scopes: tuple[str, ...] = DEFAULT_SCOPES, rps: float | None = None,
            burst: int | None = None, daily_quota: int | None = None) -> str:
        """Create a key called `name` with `scopes` and its own limits (None: serve.rate_limit's); return it
        (shown once, never stored)."""
        entries = self._read()
        if name in entries:
            raise ValueError(f"an API key named {name!r} exists: revoke it first or pick another name")
        key, entries[name] = new_key(name, scopes, rps, burst, daily_quota)
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

    def entries(self) -> dict[str, KeyEntry]:
        """Every key's name, creation time, scopes and own limits."""
        return {name: _entry(name, e) for name, e in self._read().items()}

    def valid(self, key: str | None) -> bool:
        """Whether `key` is a current key; the file is re-read when it changes, so revocation is immediate."""
        return self.lookup(key) is not None

    def lookup(self, key: str | None) -> KeyEntry | None:
        """The entry of `key` if it is a current key, else None (KeyStoreError: the file is corrupt)."""
        if not key:
            return None
        try:  # one stat per request, not two (is_file, then stat): it runs on the event loop
            mtime: float | None = os.stat(self.path).st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime != self._mtime:
            self._digests = {e["sha256"]: _entry(n, e) for n, e in self._read().items()}
            self._mtime = mtime
        given = _digest(key)
        return next((entry for d, entry in self._digests.items() if hmac.compare_digest(given, d)), None)

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        try:
            entries = read_json(self.path)
            if not isinstance(entries, dict) or not all(
                    isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("created"), str)
                    for e in entries.values()):
                raise ValueError("not an object of {name: {sha256, created}}")
            for name, e in entries.items():
                if problem := _entry_problem(e):
                    raise ValueError(f"key {name!r}: {problem}")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise KeyStoreError(
                f"the API key file {self.path} is corrupt ({str(exc)[:200]}): move it aside (keys in it cannot be "
                f"recovered, they are stored hashed), then create keys again with `amaas keys add NAME` and give "
                f"them to the clients") from exc
        return entries


def new_key(name: str, scopes: tuple[str, ...] = DEFAULT_SCOPES, rps: float | None = None, burst: int | None = None,
            daily_quota: int | None = None) -> tuple[str, dict[str, Any]]:
    """A new random key and its stored entry ({sha256, created} and the limits that differ from the defaults);
    ValueError naming the fix when a scope or limit is wrong. A key given a rate and no burst may send one
    second's worth at once (burst = ceil(rps)), not the default burst of keys without a rate of their own."""
    if rps is not None and burst is None and isinstance(rps, (int, float)) and 0 < rps < float("inf"):
        burst = max(1, math.ceil(rps))
    own = {"scopes": sorted(set(scopes)) if set(scopes) != set(DEFAULT_SCOPES) else None, "rps": rps,
           "burst": burst, "daily_quota": daily_quota}
    problem = _entry_problem(own)
    if problem:
        raise ValueError(f"API key {name!r}: {problem}")
    key = "amaas_" + secrets.token_urlsafe(32)
    return key, {"sha256": _digest(key), "created": datetime.now(UTC).isoformat(timespec="seconds"),
                 **{k: v for k, v in own.items() if v is not None}}


def _entry(name: str, e: dict[str, Any]) -> KeyEntry:
    return KeyEntry(name, e["created"], tuple(e.get("scopes") or DEFAULT_SCOPES), e.get("rps"), e.get("burst"),
                    e.get("daily_quota"))


def _entry_problem(e: dict[str, Any]) -> str | None:
    """What is wrong with an entry's scopes and limits, or None."""
    scopes = e.get("scopes")
    if scopes is not None and (not isinstance(scopes, list) or not scopes or not set(scopes) <= set(SCOPES)):
        return f"scopes must be a non-empty list of {', '.join(SCOPES)}, not {scopes!r}"
    rps = e.get("rps")
    if rps is not None and (isinstance(rps, bool) or not isinstance(rps, (int, float)) or not 0 < rps < float("inf")):
        return f"rps must be a positive number, not {rps!r}"
    for field in ("burst", "daily_quota"):
        value = e.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            return f"{field} must be a whole number of at least 1, not {value!r}"
    return None


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
