"""The ASGI gateway in front of BentoML's model API: API keys, size limits, the request schema, a request id
and a route per request, GET /models and the documented /docs.json."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pipelines.config import ServeConfig, Settings
from pipelines.serving.keys import ApiKeys
from pipelines.serving.routing import route
from pipelines.serving.schema import answer_model, openapi_with_schemas, request_model

MODELS_PATH = "/models"  # GET: the versions being served and the canary routing (open, like health)
DOCS_JSON = "/docs.json"
OPEN_PATHS = ("/readyz", "/livez", "/healthz", "/metrics", "/docs", "/docs.json", "/")
REQUEST_ID = "_request_id"  # added to each row by the gateway, carried through the adaptive batch
ROUTE = "_route"  # champion | challenger | shadow

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class Gateway:
    """ASGI middleware in front of the model API: API keys (401), size limits (413), the request schema
    (422 with field errors), a request id and a route per request. Health, metrics and docs stay open."""

    def __init__(self, app: Any, settings: Callable[[], Settings], keys_file: Path,
                 routing: Callable[[], tuple[float, bool]], versions: Callable[[], dict[str, Any]]) -> None:
        self.app = app
        self.settings = settings  # called on first use, not here: BentoML builds the gateway at import
        self.keys = ApiKeys(keys_file)
        self.routing = routing  # (canary share, shadow) now: follows the registry while serving
        self.versions = versions  # GET /models: what is being served now (deploy checks it)

    @cached_property
    def serve(self) -> ServeConfig:
        return self.settings().serve

    @cached_property
    def model(self) -> type[BaseModel]:
        """The request schema of /predict, from params.yaml."""
        return request_model(self.settings().data_schema, self.serve.max_rows)

    @cached_property
    def answer(self) -> type[BaseModel]:
        return answer_model(self.settings().data_schema)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/") or "/"
        if path == "/docs":  # the Swagger UI lives at /; /docs is where people look for it
            scope = {**scope, "path": "/", "raw_path": b"/"}
            path = "/"
        if path == MODELS_PATH and scope["method"] == "GET":
            return await _reply(send, 200, self.versions())
        if path == DOCS_JSON and scope["method"] == "GET":
            return await self._documented(scope, receive, send)
        if path in OPEN_PATHS or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if self.serve.auth and not self.keys.valid(_key(headers)):
            return await _reply(send, 401, {"error": "missing or invalid API key: send 'Authorization: Bearer "
                                                     "<key>' (create one with `amaas keys add NAME`)"})
        if path != "/predict":
            return await self.app(scope, receive, send)
        body = await _read_body(receive, self.serve.max_body_bytes, headers)
        if body is None:
            return await _reply(send, 413, {"error": f"request body over serve.max_body_bytes="
                                                     f"{self.serve.max_body_bytes} bytes"})
        try:
            payload = json.loads(body or b"null")
        except json.JSONDecodeError as exc:
            return await _reply(send, 422, {"error": "body is not JSON", "detail": [{"msg": str(exc)}]})
        if isinstance(payload, dict) and isinstance(payload.get("rows"), list) and len(
                payload["rows"]) > self.serve.max_rows:
            return await _reply(send, 413, {"error": f"{len(payload['rows'])} rows, more than serve.max_rows="
                                                     f"{self.serve.max_rows}: split the request"})
        try:
            request: Any = self.model.model_validate(payload)  # its fields (rows, row) made at runtime
        except ValidationError as exc:
            return await _reply(send, 422, {"error": f"{exc.error_count()} invalid field(s)",
                                            "detail": exc.errors(include_url=False, include_context=False)})
        if (request.rows is None) == (request.row is None):
            return await _reply(send, 422, {"error": "send either 'rows' (a list) or 'row' (one row)",
                                            "detail": [{"loc": ["rows"], "msg": "exactly one of rows, row"}]})
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        where = route(request_id, *self.routing())
        rows = [{**r.model_dump(), REQUEST_ID: request_id, ROUTE: where} for r in (request.rows or [request.row])]
        forwarded = json.dumps({"rows": rows}).encode()
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
                 + [(b"content-length", str(len(forwarded)).encode())]}
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": forwarded, "more_body": False}

        async def tag(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        await self.app(scope, replay, tag)

    async def _documented(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """BentoML's /docs.json with the schemas of /predict filled in."""
        started: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def collect(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                started.update(message)
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, collect)
        if started.get("status") != 200:
            return await _reply(send, int(started.get("status", 500)), {"error": "no OpenAPI document"})
        await _reply(send, 200, openapi_with_schemas(json.loads(b"".join(chunks)), self.model, self.answer))


def _key(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key")


async def _read_body(receive: Receive, limit: int, headers: dict[str, str]) -> bytes | None:
    """The whole body, or None as soon as it is over `limit` bytes (checked on Content-Length first)."""
    if int(headers.get("content-length") or 0) > limit:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _reply(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body, default=str).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
