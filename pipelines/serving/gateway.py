"""The ASGI gateway in front of BentoML's model API: API keys, size limits, the request schema, a request id
and a route per request, GET /models and the documented /docs.json."""

from __future__ import annotations

import functools
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pipelines.config import ServeConfig, Settings
from pipelines.serving.keys import ApiKeys, KeyStoreError
from pipelines.serving.routing import route
from pipelines.serving.schema import answer_model, openapi_with_schemas, request_model

MODELS_PATH = "/models"  # GET: the versions being served and the canary routing (open, like health)
DOCS_JSON = "/docs.json"
OPEN_PATHS = ("/readyz", "/livez", "/healthz", "/metrics", "/docs", "/docs.json", "/")
REQUEST_ID = "_request_id"  # added to each row by the gateway, carried through the adaptive batch
ROUTE = "_route"  # champion | challenger | shadow
KEY_NAME = "_key_name"  # the name of the API key that sent the row (never the key), for the prediction log
STATIC_DIR = "/static_content"  # BentoML's Swagger UI files
KNOWN_PATHS = frozenset({*OPEN_PATHS, MODELS_PATH, "/predict"})
MAX_HEADER_BYTES = 16 * 1024  # all names and values together; more is 431
MAX_REQUEST_ID = 128
REQUEST_ID_PATTERN = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID}}}")
MAX_DEPTH = 16  # JSON nesting: a request is {"rows": [{...}]}, 3 deep
MAX_ERRORS = 20  # field errors listed in a 422 (the count says how many there were)
MAX_ECHO = 100  # characters of an input value echoed in a 422
RETRY_AFTER_S = "1"
log = logging.getLogger("amaas.gateway")

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
        self._broken_at: float | None = -1.0  # the key file's mtime when its corruption was last logged

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
        started = False

        async def watched(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._handle(scope, receive, watched)
        except Exception:  # nothing escapes the gateway: one line, and a 500 if no answer has started
            log.error("unexpected error on %s %s", scope.get("method"), _clip(scope.get("path")), exc_info=True)
            if not started:
                await _reply(send, 500, {"error": "internal error; the server log has the details"})

    async def _handle(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            return await _reply(send, 431, {"error": f"request headers over {MAX_HEADER_BYTES} bytes"})
        path = scope["path"].rstrip("/") or "/"
        if not known_path(path):  # no route of ours: answered here, so no per-path state grows anywhere
            return await _reply(send, 404, {"error": "not found: POST /predict; GET /models, /docs, /readyz, "
                                                     "/livez, /metrics"})
        if path == "/docs":  # the Swagger UI lives at /; /docs is where people look for it
            scope = {**scope, "path": "/", "raw_path": b"/"}
            path = "/"
        if path == MODELS_PATH and scope["method"] == "GET":
            return await _reply(send, 200, self.versions())
        if path == DOCS_JSON and scope["method"] == "GET":
            return await self._documented(scope, receive, send)
        if path in OPEN_PATHS or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        # latin-1 maps every byte: a header that is not UTF-8 is a wrong key or a bad id, never an error
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key_name = None
        if self.serve.auth:
            try:
                key_name = self.keys.name_of(_key(headers))
            except KeyStoreError as exc:
                self._report_broken_keys(exc)
                return await _reply(send, 503, {"error": "the server's API key store is unreadable; the operator "
                                                         "must repair it (see the server log)"})
            if key_name is None:
                return await _reply(send, 401, {"error": "missing or invalid API key: send 'Authorization: "
                                                         "Bearer <key>' (create one with `amaas keys add NAME`)"})
        if path != "/predict":
            return await self.app(scope, receive, send)
        if not (headers.get("content-length") or "0").isdigit():
            return await _reply(send, 400, {"error": "Content-Length is not a number"})
        body = await _read_body(receive, self.serve.max_body_bytes, headers)
        if body is None:
            return await _reply(send, 413, {"error": f"request body over serve.max_body_bytes="
                                                     f"{self.serve.max_body_bytes} bytes"})
        try:
            payload = _parse(body)
        except ValueError as exc:
            return await _reply(send, 422, {"error": "body is not valid JSON", "detail": [{"msg": _clip(str(exc))}]})
        if isinstance(payload, dict) and isinstance(payload.get("rows"), list) and len(
                payload["rows"]) > self.serve.max_rows:
            return await _reply(send, 413, {"error": f"{len(payload['rows'])} rows, more than serve.max_rows="
                                                     f"{self.serve.max_rows}: split the request"})
        try:
            request: Any = self.model.model_validate(payload)  # its fields (rows, row) made at runtime
        except ValidationError as exc:
            return await _reply(send, 422, {"error": f"{exc.error_count()} invalid field(s)",
                                            "detail": _field_errors(exc)})
        if (request.rows is None) == (request.row is None):
            return await _reply(send, 422, {"error": "send either 'rows' (a list) or 'row' (one row)",
                                            "detail": [{"loc": ["rows"], "msg": "exactly one of rows, row"}]})
        request_id = self._request_id(headers.get("x-request-id"))
        where = route(request_id, *self.routing())
        rows = [{**r.model_dump(), REQUEST_ID: request_id, ROUTE: where, KEY_NAME: key_name}
                for r in (request.rows or [request.row])]
        forwarded = json.dumps({"rows": rows}, allow_nan=False).encode()
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
                 + [(b"content-length", str(len(forwarded)).encode())]}
        sent, shed = False, False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": forwarded, "more_body": False}

        async def tag(message: dict[str, Any]) -> None:
            nonlocal shed
            if message["type"] == "http.response.start":
                if message["status"] == 503:  # BentoML shed it: its body says "unexpected error"; ours, retry
                    shed = True
                    return
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            elif shed:
                if not message.get("more_body"):
                    log.warning("shed request %s: overloaded (it would wait over serve.max_latency_ms)", request_id)
                    await _reply(send, 503, {"error": "overloaded, retry", "request_id": request_id},
                                 [(b"retry-after", RETRY_AFTER_S.encode()), (b"x-request-id", request_id.encode())])
                return
            await send(message)

        await self.app(scope, replay, tag)

    def _request_id(self, given: str | None) -> str:
        """The client's X-Request-ID if it is a safe one, else a new id (the bad one logged, clipped, once)."""
        if given and REQUEST_ID_PATTERN.fullmatch(given):
            return given
        made = uuid.uuid4().hex
        if given:
            log.warning("request %s: X-Request-ID %s is not 1-%d characters of [A-Za-z0-9._:-]; replaced",
                        made, ascii(_clip(given, 40)), MAX_REQUEST_ID)
        return made

    def _report_broken_keys(self, exc: KeyStoreError) -> None:
        """One log line per change of the key file, not one per request."""
        stamp = self.keys.path.stat().st_mtime if self.keys.path.exists() else None
        if stamp != self._broken_at:
            self._broken_at = stamp
            log.error("%s; every keyed request gets 503 until then", exc)

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


def known_path(path: str) -> bool:
    """Whether `path` is a route of the service (or one of BentoML's Swagger UI files): other paths get 404
    before anything keeps per-path state for them (BentoML's metrics label requests by path)."""
    path = path.rstrip("/") or "/"
    if path in KNOWN_PATHS:
        return True
    if not path.startswith(STATIC_DIR + "/") or ".." in path:
        return False
    return (_static_root() / path[len(STATIC_DIR) + 1:]).is_file()  # a fixed set of files: bounded labels


@functools.cache
def _static_root() -> Path:
    import bentoml._internal.server.http_app as http_app  # where BentoML keeps its static_content folder

    return Path(http_app.__file__).resolve().parent / "static_content"


def bound_metric_labels() -> None:
    """Make BentoML's request metrics (the outermost middleware, labelled by path) see known paths only: an
    unknown path is answered 404 before them, so unauthenticated probes cannot grow /metrics."""
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware as Metrics

    metered: Any = Metrics.__call__
    if getattr(metered, "_amaas_bounded", False):
        return

    async def known_only(self: Any, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not known_path(scope["path"]):
            return await _reply(send, 404, {"error": "not found"})
        await metered(self, scope, receive, send)

    known_only._amaas_bounded = True  # type: ignore[attr-defined]
    setattr(Metrics, "__call__", known_only)  # noqa: B010 (a method replaced on the class)


class QuietShedding(logging.Filter):
    """Drops BentoML's ERROR traceback for a shed request (ServiceUnavailable): the gateway logs one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        from bentoml.exceptions import ServiceUnavailable

        return not (record.exc_info and isinstance(record.exc_info[1], ServiceUnavailable))


def quiet_shedding() -> None:
    for name in ("bentoml._internal.server.http_app", "bentoml.serve"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, QuietShedding) for f in logger.filters):
            logger.addFilter(QuietShedding())


def _parse(body: bytes) -> Any:
    """The JSON of `body`, strictly: UTF-8, no NaN or Infinity, at most MAX_DEPTH levels (ValueError if not)."""
    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number (send null, or a finite number)")

    try:
        payload = json.loads(body.decode("utf-8") if body else "null", parse_constant=constant)
    except UnicodeDecodeError as exc:
        raise ValueError(f"body is not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    stack = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return payload


def _field_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """At most MAX_ERRORS field errors, each with its input clipped to MAX_ECHO characters."""
    out = []
    for error in exc.errors(include_url=False, include_context=False)[:MAX_ERRORS]:
        value = error.get("input")
        short = value if value is None or isinstance(value, (bool, int, float)) else _clip(
            value if isinstance(value, str) else json.dumps(value, default=str))
        out.append({"loc": list(error["loc"]), "msg": _clip(error["msg"]), "type": error["type"], "input": short})
    return out


def _clip(value: Any, limit: int = MAX_ECHO) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


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


async def _reply(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
                 ) -> None:
    data = json.dumps(body, default=str, allow_nan=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})
