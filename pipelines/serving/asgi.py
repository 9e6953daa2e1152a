"""ASGI plumbing the gateway shares with its callers: the message callables, and a downstream response read whole
before it is rewritten."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


async def buffered(app: Any, scope: dict[str, Any], receive: Receive) -> tuple[dict[str, Any], bytes]:
    """`app`'s answer to the request, read whole: its http.response.start message and its body."""
    started: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def collect(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.update(message)
        else:
            chunks.append(message.get("body", b""))

    await app(scope, receive, collect)
    return started, b"".join(chunks)
