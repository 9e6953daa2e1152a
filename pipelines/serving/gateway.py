"""What the HTTP service needs beyond the model: request schema, API keys, canary routing, prediction log.

`bentos/service.py` wires these into BentoML; they live here so the CLI, tests and monitoring use the
same code (one request schema from params.yaml, one key store, one log format).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import uuid
import zlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from pipelines.config import SchemaConfig, ServeConfig
from pipelines.io import read_json, write_json

log = logging.getLogger(__name__)
MODELS_PATH = "/models"  # GET: the versions being served and the canary routing (open, like health)
DOCS_JSON = "/docs.json"
OPEN_PATHS = ("/readyz", "/livez", "/healthz", "/metrics", "/docs", "/docs.json", "/")
REQUEST_ID = "_request_id"  # added to each row by the gateway, carried through the adaptive batch
ROUTE = "_route"  # champion | challenger | shadow


def row_model(schema: SchemaConfig) -> type[BaseModel]:
    """The pydantic model of one input row, from the schema in params.yaml.

    Numeric features must lie in their ranges (nullable ones may be null); categories are free text (or a
    number or a boolean, spelled as text), cleaned and encoded by the fitted transform (an unseen one is
    the unknown category; null, where the column is nullable, is the missing category). The id is
    optional: sent, it is logged so delayed labels can be joined to the prediction.
    """
    fields: dict[str, Any] = {schema.id_column: (int | str | None, None)} if schema.id_column else {}
    for col, rule in schema.numeric.items():
        bounded = Field(ge=rule.min, le=rule.max, default=None if rule.nullable else ...)
        fields[col] = (float | None, bounded) if rule.nullable else (float, bounded)
    category = str | bool | int | float  # codes and flags are categories too: spelled as text by the transform
    for col, cat in schema.categorical.items():
        fields[col] = (category | None, None) if cat.nullable else (category, ...)
    return create_model("Row", __config__=ConfigDict(extra="forbid"), **fields)


def request_model(schema: SchemaConfig, max_rows: int) -> type[BaseModel]:
    """A request: {"rows": [row, ...]} or {"row": row}."""
    row = row_model(schema)
    return create_model("PredictRequest", __config__=ConfigDict(extra="forbid"),
                        rows=(list[row] | None, Field(default=None, min_length=1, max_length=max_rows)),  # type: ignore[valid-type]
                        row=(row | None, None))


def answer_model(schema: SchemaConfig) -> type[BaseModel]:
    """The pydantic model of one answer, for the task: the label and each class's probability (binary: and
    the positive class's), or the value; always the model version and the request id."""
    fields: dict[str, Any] = {}
    if schema.task == "regression":
        fields["value"] = (float, Field(description=f"the predicted {schema.target}"))
    else:
        fields["label"] = (int | str, Field(description=f"the predicted class of {schema.target}, spelled as in "
                                                        f"the data"))
        fields["probabilities"] = (dict[str, float], Field(description="the probability of each class"))
        if schema.task == "binary":
            fields["probability"] = (float, Field(description="the probability of the positive class"))
    fields |= {"model_version": (str, ...), "request_id": (str, ...)}
    return create_model("Answer", **fields)


def openapi_with_schemas(spec: dict[str, Any], request: type[BaseModel], answer: type[BaseModel]) -> dict[str, Any]:
    """BentoML's OpenAPI document with /predict's request and answer schemas as the gateway enforces them
    (BentoML sees rows as free-form dicts, since the gateway validates them)."""
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    template = "#/components/schemas/{model}"
    body = request.model_json_schema(ref_template=template)
    reply = {"type": "array", "items": answer.model_json_schema(ref_template=template)}
    for part in (body, reply["items"]):
        components.update(part.pop("$defs", {}))
    post = spec.get("paths", {}).get("/predict", {}).get("post")
    if post is not None:
        post["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
        post.setdefault("responses", {})["200"] = {"description": "one answer per row",
                                                   "content": {"application/json": {"schema": reply}}}
    return spec


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


def route(request_id: str, canary_share: float, shadow: bool) -> str:
    """Where a request goes: a stable function of its id, so a client retry lands on the same model."""
    if shadow:
        return "shadow"
    bucket = zlib.crc32(request_id.encode()) % 10_000
    return "challenger" if bucket < canary_share * 10_000 else "champion"


class PredictionLog:
    """Append-only JSON Lines, one file per day and process; fsync'ed before the answer leaves."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        data = "".join(json.dumps(r, separators=(",", ":"), default=str) + "\n" for r in records).encode()
        fd = os.open(self.folder / f"{day}-{os.getpid()}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)  # acknowledged means on disk: a crash after the answer loses nothing
        finally:
            os.close(fd)


def read_prediction_log(folder: Path) -> list[dict[str, Any]]:
    """Every logged prediction, oldest file first (a partial last line from a crash is skipped)."""
    records = []
    for file in sorted(folder.glob("*.jsonl")):
        for line in file.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping a partial line in %s", file)
    return records


Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class Gateway:
    """ASGI middleware in front of the model API: API keys (401), size limits (413), the request schema
    (422 with field errors), a request id and a route per request. Health, metrics and docs stay open."""

    def __init__(self, app: Any, schema: SchemaConfig, serve: ServeConfig, keys_file: Path,
                 routing: Callable[[], tuple[float, bool]], versions: Callable[[], dict[str, Any]]) -> None:
        self.app, self.serve = app, serve
        self.model = request_model(schema, serve.max_rows)
        self.answer = answer_model(schema)
        self.keys = ApiKeys(keys_file)
        self.routing = routing  # (canary share, shadow) now: follows the registry while serving
        self.versions = versions  # GET /models: what is being served now (deploy checks it)

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
            request = self.model.model_validate(payload)
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


def now_iso() -> str:
    """The wall-clock time of a prediction, for the log."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")
