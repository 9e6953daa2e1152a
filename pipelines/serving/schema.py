"""The request and answer schemas of /predict, from the data schema in params.yaml (the OpenAPI document that
shows them: openapi.py)."""

from __future__ import annotations

from typing import Annotated, Any, NotRequired

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, JsonValue, TypeAdapter, create_model
from typing_extensions import TypedDict  # pydantic needs this one on Python 3.11

from pipelines.config import SchemaConfig

# What a client may send as text is logged as sent: its length is bounded, so one key cannot fill the disk through
# the prediction log. A category may be longer than every allowed value (padding, case: the transform cleans them),
# but not by much: CATEGORY_SLACK characters more than the longest allowed value, and at least MIN_CATEGORY_CHARS.
MIN_CATEGORY_CHARS = 64
CATEGORY_SLACK = 32
MAX_ID_CHARS = 128  # an id or a time as text
MAX_EXACT_INT = 2 ** 53 - 1


def row_schema(schema: SchemaConfig) -> type:
    """One input row as a TypedDict, from the schema in params.yaml: pydantic validates rows into plain dicts
    (no model object per row, no dump of it: half the cost of a 100-row request's validation, measured).

    Numeric features must lie within their hard bounds (`min`/`max`: impossible values; the reference range
    is not checked here: a value outside it is answered, and counted); nullable ones may be null or left out.
    Categories are free text of bounded length (or a number or a boolean, spelled as text), cleaned and encoded by
    the fitted
    transform (an unseen one is the unknown category, and the answer says so; null, where the column is
    nullable, is the missing category). The id and time columns are optional, so a row is sent as the table
    has it: the id is logged so delayed labels can be joined to the prediction; neither is a feature. Fields
    left out are not in the validated dict: `with_defaults` fills them in.
    """
    text = Annotated[str, Field(max_length=MAX_ID_CHARS)]
    # an integer id is exact in a double (larger ones: as text): a JSON parser may read a larger one as a float
    integer = Annotated[int, Field(ge=-MAX_EXACT_INT, le=MAX_EXACT_INT), BeforeValidator(_whole)]
    fields: dict[str, Any] = {schema.id_column: NotRequired[integer | text | None]} if schema.id_column else {}
    if schema.time_column:  # a timestamp as text, or epoch/ordinal numbers: taken as sent, never a feature
        fields[schema.time_column] = NotRequired[int | float | text | None]
    for col, rule in schema.numeric.items():
        number: Any = Annotated[float | None if rule.nullable else float,  # "nan" and "inf" spelled as text too
                                Field(ge=rule.min, le=rule.max, allow_inf_nan=False)]
        fields[col] = NotRequired[number] if rule.nullable else number
    for col, cat in schema.categorical.items():
        longest = max((len(str(v)) for v in cat.values), default=0)
        spelled = Annotated[str, Field(max_length=max(MIN_CATEGORY_CHARS, longest + CATEGORY_SLACK))]
        category = spelled | bool | int | float  # codes and flags are categories too: spelled as text by the transform
        fields[col] = NotRequired[category | None] if cat.nullable else category
    row = TypedDict("Row", fields)  # type: ignore[misc]  # fields made at runtime
    # strict: a number is a JSON number ("30" and true are refused, as the published JSON Schema says)
    row.__pydantic_config__ = ConfigDict(extra="forbid", strict=True)  # type: ignore[attr-defined]
    return row


def _whole(value: Any) -> Any:
    """A float with no fraction as the integer it is (JSON Schema's "integer" takes 3.0); anything else as sent, for
    the strict check (which refuses true and "3")."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def request_schema(schema: SchemaConfig, max_rows: int) -> TypeAdapter[Any]:
    """A request: {"rows": [row, ...]} or {"row": row} (validated into dicts, see row_schema)."""
    row = row_schema(schema)
    # functional syntax: a class body's annotations would be strings (postponed) naming this function's locals
    request = TypedDict("PredictRequest", {  # type: ignore[name-match]  # noqa: UP013
        "rows": NotRequired[Annotated[list[row] | None, Field(min_length=1, max_length=max_rows)]],  # type: ignore[valid-type]
        "row": NotRequired[row | None]})  # type: ignore[valid-type]
    # exactly one of the two (the gateway checks it after validation; the document says so)
    one_of: list[JsonValue] = [{"required": [name], "properties": {name: {"type": kind}}}
                               for name, kind in (("rows", "array"), ("row", "object"))]
    request.__pydantic_config__ = ConfigDict(  # type: ignore[attr-defined]
        extra="forbid", strict=True, json_schema_extra={"oneOf": one_of})
    return TypeAdapter(request)


def with_defaults(schema: SchemaConfig) -> dict[str, None]:
    """What a row that leaves out every optional field stands for: each input column (and the id) as None."""
    return dict.fromkeys([*([schema.id_column] if schema.id_column else []), *schema.numeric, *schema.categorical])


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
    fields |= {"unseen": (list[str] | None, Field(default=None, description="only when there are some: the "
                                                  "categorical columns whose value the model never saw (answered "
                                                  "as the unknown category)")),
               "out_of_reference": (list[str] | None, Field(default=None, description="only when there are some: "
                                                            "the numeric columns outside the range the model "
                                                            "trained on (answered; reported as drift)"))}
    fields |= {"model_version": (str, ...), "request_id": (str, ...)}
    return create_model("Answer", **fields)


def explained_answer_model(schema: SchemaConfig) -> type[BaseModel]:
    """The pydantic model of one answer of /explain: the answer of /predict with its explanation."""
    by_class = schema.task != "regression"
    number: Any = dict[str, float] if by_class else float
    per_column: Any = dict[str, dict[str, float]] if by_class else dict[str, float]
    fields: dict[str, Any] = {
        "method": (str, Field(description="how the contributions were computed, per model (see the README)")),
        "output": (str, Field(description="the space of base and contributions: probability (of each class) or "
                                          "value")),
        "base": (number, Field(description="the answer with no column's information" + (", per class" if by_class
                                                                                          else ""))),
        "contributions": (per_column, Field(description=("per class, " if by_class else "") + "per input column: "
                                            "how much it moves the answer; base + their sum = the answer"))}
    explanation = create_model("Explanation", **fields)
    return create_model("ExplainedAnswer", __base__=answer_model(schema),
                        explanation=(explanation, Field(description="why: the base value and each input column's "
                                                                    "contribution")))
