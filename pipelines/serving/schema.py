"""The request and answer schemas of /predict, from the data schema in params.yaml, and the OpenAPI
document that shows them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from pipelines.config import SchemaConfig


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
    fields: dict[str, Any] = {"rows": (list[row] | None, Field(default=None, min_length=1, max_length=max_rows)),  # type: ignore[valid-type]
                              "row": (row | None, None)}
    return create_model("PredictRequest", __config__=ConfigDict(extra="forbid"), **fields)


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
    reply: dict[str, Any] = {"type": "array", "items": answer.model_json_schema(ref_template=template)}
    for part in (body, reply["items"]):
        components.update(part.pop("$defs", {}))
    post = spec.get("paths", {}).get("/predict", {}).get("post")
    if post is not None:
        post["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
        post.setdefault("responses", {})["200"] = {"description": "one answer per row",
                                                   "content": {"application/json": {"schema": reply}}}
    return spec
