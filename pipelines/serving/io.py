"""How /predict's body becomes the service's rows and its answer becomes the response body, in BentoML's terms
(its IO descriptors: `@bentoml.api(input_spec=..., output_spec=...)`).

Every /predict request reaches BentoML through the gateway (pipelines/serving/gateway.py), which has parsed the
client's body, refused what the request schema refuses, and forwards a body of its own making: JSON
`{"rows": [...]}` of plain objects and finite numbers. BentoML's default descriptors would parse and validate that
body again with pydantic, and encode the answer with a pydantic dump followed by the standard library's encoder:
on 100-row requests they took a fifth of a worker's event loop (py-spy). These take the gateway's rows as it
checked them (handed on in the ASGI scope; parsed from the body with orjson where they are missing) and write the
answer with orjson; the JSON schema they show in /docs is the same as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from _bentoml_sdk.io_models import IODescriptor, IORootModel

from pipelines.serving.asgi import ROWS_KEY

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

_ANSWER = orjson.OPT_SERIALIZE_NUMPY  # numpy scalars as numbers; NaN (never in an answer) would be null


class PredictRequest(IODescriptor):
    """The gateway's forwarded body: `rows`, one object per row (the schema's columns, defaults filled in, plus
    the gateway's route, request id and key name)."""

    rows: list[dict[str, Any]]

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> PredictRequest:
        rows = request.scope.get(ROWS_KEY)  # the gateway's, as it checked them
        if rows is None:
            rows = orjson.loads(await request.body())["rows"]
        if not (isinstance(rows, list) and all(isinstance(row, dict) for row in rows)):  # the gateway's own body
            raise TypeError("/predict reached the service without the gateway's rows")
        return cls.model_construct(rows=rows)


class PredictAnswer(IORootModel[list[dict[str, Any]]]):
    """The answers of one request's rows, in order, as JSON."""

    media_type = "application/json"  # said once: else BentoML derives it from the JSON schema on every response

    @classmethod
    async def to_http_response(cls, obj: Any, serde: Any) -> Response:
        from starlette.responses import Response

        return Response(answers_body(obj), media_type=cls.media_type)


def answers_body(answers: list[dict[str, Any]]) -> bytes:
    """The JSON body of /predict's answers (the model's, or the response cache's)."""
    return orjson.dumps(answers, option=_ANSWER)
