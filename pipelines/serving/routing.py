"""Canary and shadow routing: which model answers a request."""

from __future__ import annotations

import zlib


def route(request_id: str, canary_share: float, shadow: bool) -> str:
    """Where a request goes (champion | challenger | shadow): a stable function of its id, so a client
    retry lands on the same model."""
    if shadow:
        return "shadow"
    bucket = zlib.crc32(request_id.encode()) % 10_000
    return "challenger" if bucket < canary_share * 10_000 else "champion"
