"""ASGI plumbing the middlewares in front of the model API share: a request body handed on again, and a
downstream response read whole before it is rewritten."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
# in the scope of a /predict request the gateway forwards: its rows, parsed and checked (defaults, route, request id
# and key name added), so that the apps behind it need not parse the forwarded body again
ROWS_KEY = "amaas.rows"


def replayed(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives `body` (already read, or rewritten) as the whole request, then defers to `receive`
    (for the disconnect message)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


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
