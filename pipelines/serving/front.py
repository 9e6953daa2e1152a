"""The blue-green front: an ASGI app (run by uvicorn on serve.port) that forwards every request to the active
backend named in a small state file.

Whoever switches (pipelines/serving/bluegreen.py) replaces the file atomically; the front looks at it (one
stat) on every request, so a request that starts after the switch goes to the new backend, and one in flight
finishes where it started (`inflight` counts them per backend, so the old one is stopped only once they are
done). Method, path, query, headers, status and body pass through unchanged, streamed both ways; only the
hop-by-hop headers of each connection are the front's own. Auth, limits and validation stay in the backend's
gateway. A backend that does not accept within the connect timeout is a 502, one that does not answer within
the read timeout a 504, and no active backend at all a 503, each with `Retry-After`: the front never hangs.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger(__name__)
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
# RFC 9110 7.6.1: these describe one connection, not the message, so each hop sets its own
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade"})
RETRY_AFTER_S = 1


def read_state(path: Path) -> dict[str, Any] | None:
    """The state file (written atomically with pipelines.io.write_json), or None when there is none."""
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return state


class Front:
    """Forwards each request to `active.url` of the state file as it is when the request starts."""

    def __init__(self, state_file: Path, connect_timeout_s: float, read_timeout_s: float) -> None:
        self.state_file = state_file
        self.timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        self.inflight: Counter[str] = Counter()  # requests being forwarded, per backend URL
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._seen: tuple[int, int, int] | None = None
        self._active: str | None = None

    def active(self) -> str | None:
        """The active backend's URL, re-read when the state file changed (atomic rename: a new inode)."""
        try:
            st = os.stat(self.state_file)
        except FileNotFoundError:
            self._seen, self._active = None, None
            return None
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            try:
                state = read_state(self.state_file) or {}
            except (OSError, ValueError):  # written atomically, so only a hand edit gets here: keep the last one
                log.exception("cannot read %s; still forwarding to %s", self.state_file, self._active)
                return self._active
            self._seen, self._active = seen, (state.get("active") or {}).get("url")
        return self._active

    async def release(self, url: str) -> None:
        """Close the connections to a backend that is no longer active (after its requests finished)."""
        client = self._clients.pop(url, None)
        if client is not None:
            await client.aclose()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # the service speaks plain HTTP only
            await send({"type": "websocket.close", "code": 1008})
            return
        url = self.active()  # from here to the count there is no await: a switch cannot fall in between
        if url is None:
            await _reply(send, 503, "no backend is serving yet: retry")
            return
        body = _Body(receive)
        self.inflight[url] += 1
        try:
            try:
                await self._forward(url, scope, body, send)
            except httpx.ConnectError:
                retry = self.active()
                if body.started or retry is None or retry == url:
                    raise
                # the backend stopped listening because the switch happened just now: the request never
                # reached it, so it goes to the new one
                self.inflight[retry] += 1
                try:
                    await self._forward(retry, scope, body, send)
                finally:
                    self.inflight[retry] -= 1
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            log.warning("backend %s did not accept the connection: %s", url, exc)
            await _reply(send, 502, "the model server is not reachable: retry")
        except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout):
            log.warning("backend %s did not answer within %.0f s", url, self.timeout.read)
            await _reply(send, 504, "the model server did not answer in time: retry")
        except _Started as exc:  # mostly a client that went away mid-answer; uvicorn closes the connection
            log.warning("forwarding from %s broke off mid-answer: %s", url, exc.__cause__)
        except httpx.HTTPError as exc:
            log.warning("backend %s broke off: %s", url, exc)
            await _reply(send, 502, "the model server broke off the answer: retry")
        finally:
            self.inflight[url] -= 1

    async def _forward(self, url: str, scope: dict[str, Any], body: _Body, send: Send) -> None:
        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = httpx.AsyncClient(timeout=self.timeout, limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=64))
        target = url + (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k not in HOP_BY_HOP]
        has_body = any(k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])
        # a request built by hand, not client.build_request: the client's default headers stay out
        request = httpx.Request(scope["method"], target, headers=headers,
                                content=body.chunks() if has_body else None)
        response = await client.send(request, stream=True)
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]})
            try:
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except Exception as exc:  # the status line is out: the client sees a cut connection
                raise _Started from exc
        finally:
            await response.aclose()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for url in list(self._clients):
                    await self.release(url)
                await send({"type": "lifespan.shutdown.complete"})
                return


class _Started(Exception):
    """Forwarding failed after the answer began: nothing can be sent instead."""


class _Body:
    """The request body, streamed from the client to the backend; `started` once the first part was read
    (after that, the request cannot be sent elsewhere)."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.started = False

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise httpx.ReadError("the client went away")
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return


async def _reply(send: Send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode())]})
    await send({"type": "http.response.body", "body": body})
