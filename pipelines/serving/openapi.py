"""The OpenAPI document the gateway serves at /docs.json: every route and every status the server answers, with
/predict's request schema exactly as the gateway enforces it (OpenAPI 3.1, whose schemas are the JSON Schema
pydantic writes, so nothing is translated)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter

OPENAPI = "3.1.0"
TEMPLATE = "#/components/schemas/{model}"
ERROR = {"type": "object", "required": ["error"], "description": "what went wrong, in words a client can act on",
         "properties": {"error": {"type": "string"},
                        "detail": {"type": "array", "items": {"type": "object"},
                                   "description": "422: each invalid field (loc, msg, type, input clipped)"},
                        "request_id": {"type": "string"}}}
MODELS = {"type": "object", "description": "the versions answering now and the canary routing",
          "properties": {"champion": {"type": ["string", "null"]}, "challenger": {"type": ["string", "null"]},
                         "canary_share": {"type": "number", "minimum": 0, "maximum": 1},
                         "shadow": {"type": "boolean"}}}
KEYS = "bearer", "apiKey"  # Authorization: Bearer <key>, or X-API-Key: <key>


def document(info: dict[str, Any], request: TypeAdapter[Any], answer: type[BaseModel], auth: bool,
             routes: dict[str, tuple[str, ...]], limits: dict[str, int], explained: type[BaseModel] | None = None
             ) -> dict[str, Any]:
    """The whole document. `info` is BentoML's (its title and the bento's version); `auth` whether /predict takes
    API keys (serve.auth); `routes` each path the gateway answers and its methods (a path it does not describe is
    an error: the document must not fall behind the server); `limits` serve.max_body_bytes and serve.max_rows;
    `explained` the answer of POST /explain (None: not served)."""
    components: dict[str, Any] = {"Error": ERROR}
    body = request.json_schema(ref_template=TEMPLATE)
    answers: dict[str, Any] = {"type": "array", "items": answer.model_json_schema(ref_template=TEMPLATE)}
    explanations: dict[str, Any] = {"type": "array", "items": (explained or answer).model_json_schema(
        ref_template=TEMPLATE)}
    for reply in (answers, explanations):
        components.update(reply["items"].pop("$defs", {}))
        name = reply["items"].get("title", "Answer")
        components[name] = reply["items"]
        reply["items"] = {"$ref": TEMPLATE.format(model=name)}
    components.update(body.pop("$defs", {}))
    operations = _operations(body, answers, auth, limits)
    if explained is not None:  # /predict's operation, answered with the explanations
        predict = operations["/predict"]["post"]
        operations["/explain"] = {"post": {
            **predict, "summary": "Explain rows", "description": "For each row: the answer of /predict with its "
            "explanation (the base value and each input column's contribution, in the answer's space: base + "
            "contributions = the answer). Same body, keys (predict scope), limits and statuses as /predict.",
            "responses": {**predict["responses"], "200": _json("one explained answer per row", explanations)}}}
    missing = {path: methods for path, methods in routes.items()
               if {m.lower() for m in methods} != set(operations.get(path, {}))}
    if missing:
        raise RuntimeError(f"the OpenAPI document does not describe these routes as served: {missing}")
    return {"openapi": OPENAPI, "info": info, "paths": {path: operations[path] for path in routes},
            "components": {"schemas": components, "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "an API key: `amaas keys add NAME`"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}}}


def _operations(body: dict[str, Any], answers: dict[str, Any], auth: bool, limits: dict[str, int]
                ) -> dict[str, dict[str, Any]]:
    keyed: list[dict[str, list[str]]] = [{name: []} for name in KEYS]
    common = {"405": _error("another method: the Allow header names this route's", allow=True),
              "431": _error("request headers over 16 KiB")}
    keys = {"401": _error("no API key, or an unknown or revoked one"),
            "403": _error("the API key has no scope for this route")}
    store = _error("the API key store or the shared state is unreadable or busy; retry (Retry-After)")
    predict: dict[str, Any] = {
        "summary": "Score rows", "description": f"One answer per row, in order. At most {limits['max_rows']} rows "
        f"and {limits['max_body_bytes']} bytes per request. Send exactly one of `rows` (a list) or `row` (one row).",
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {
            "200": _json("one answer per row", answers),
            "400": _error("Content-Length is not a number"),
            **(keys if auth else {}),
            "413": _error(f"body over serve.max_body_bytes={limits['max_body_bytes']}, or more than "
                          f"serve.max_rows={limits['max_rows']} rows: split the request"),
            "422": _error("the body is not JSON, or a field is invalid (each one in `detail`)"),
            "429": _error("the key's rate limit or daily quota (Retry-After, X-RateLimit-*)"),
            "503": _error("draining, overloaded or the shared state is busy: retry (Retry-After), "
                          "on another replica if there is one"),
            "504": _error("no answer in time, or the prediction log could not be written: not retried"),
            **common}}
    if auth:
        predict["security"] = keyed
    admin = {"security": keyed, "tags": ["Admin"]}
    drain = {"type": "object", "additionalProperties": False, "properties": {"drain": {"type": "boolean"}}}
    html = {"200": {"description": "the Swagger UI", "content": {"text/html": {"schema": {"type": "string"}}}},
            **common}
    plain = {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
    open_ = {"tags": ["Infrastructure"]}
    return {
        "/predict": {"post": predict},
        "/models": {"get": {**open_, "summary": "What is being served",
                            "responses": {"200": _json("the versions and routing", MODELS), **common}}},
        "/docs.json": {"get": {**open_, "summary": "This document",
                               "responses": {"200": _json("OpenAPI 3.1", {"type": "object"}), **common}}},
        "/docs": {"get": {**open_, "summary": "The Swagger UI", "responses": html}},
        "/": {"get": {**open_, "summary": "The Swagger UI", "responses": html}},
        "/readyz": {"get": {**open_, "summary": "Ready for traffic (a balancer's health check)", "responses": {
            "200": plain, "503": {"description": "draining, or the shared state is busy",
                                  "content": {"application/json": {"schema": {"type": "object"}}}},
            "500": {"description": "not ready yet (BentoML's answer while the model loads)"}, **common}}},
        "/livez": {"get": {**open_, "summary": "Alive", "responses": {"200": plain, **common}}},
        "/healthz": {"get": {**open_, "summary": "Alive (deprecated: /livez)", "responses": {"200": plain,
                                                                                              **common}}},
        "/metrics": {"get": {**open_, "summary": "Prometheus metrics, per-key usage included", "responses": {
            "200": {"description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}, **common}}},
        "/admin/reload": {"post": {**admin, "summary": "Every worker follows the registry now", "responses": {
            "200": _json("every worker follows", {"type": "object", "properties": {
                "followed": {"type": "integer"}, "workers": {"type": "integer"}, "models": MODELS}}),
            **keys, "409": _error("a bento run on its own model: nothing to reload"), "503": store,
            "504": _json("some workers did not follow in time", {"type": "object"}), **common}}},
        "/admin/drain": {"post": {**admin, "summary": "Take no new requests (or again: {\"drain\": false})",
                                  "requestBody": {"required": False,
                                                  "content": {"application/json": {"schema": drain}}},
                                  "responses": {"200": _json("the server's state", {
                                      "type": "object", "required": ["draining"],
                                      "properties": {"draining": {"type": "boolean"}}}),
                                      **keys, "422": _error('send no body, {"drain": true} or {"drain": false}'),
                                      "503": store, **common}}},
        "/admin/keys": {"get": {**admin, "summary": "Each key's scopes, limits and usage (all workers)",
                                "responses": {"200": _json("by key name", {"type": "object"}), **keys,
                                              "503": store, **common}}},
    }


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str, allow: bool = False) -> dict[str, Any]:
    reply = _json(description, {"$ref": TEMPLATE.format(model="Error")})
    if allow:
        reply["headers"] = {"Allow": {"schema": {"type": "string"}, "required": True}}
    return reply
