"""Delayed labels: served predictions as rows, and the labels that arrive later joined to them.

The prediction log holds what a model answered; the label of the row arrives days later in collected
(validated) data. Monitoring (the report stage) and the A/B test (pipelines/abtest.py) both read logged
predictions as rows with `logged_frame`, join the labels with `join_labels` and score the rows' canonical
output (`model_output`) against them, so both judge a model the same way.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from pipelines.bundle import ModelBundle
from pipelines.config import Paths, SchemaConfig
from pipelines.state.predlog import PredictionRecord

log = logging.getLogger(__name__)
PREDICTION = "prediction"  # what monitoring watches per row: bundle.monitored(output)
ACTUAL = "actual"  # the label encoded as the model sees it (class index, or the value)
# columns of a logged row beside its features, named so that no feature column can take their place
TIME, KEY_NAME, ROUTE, VERSION = "_time", "_key_name", "_route", "_model_version"


def proba_columns(k: int) -> list[str]:
    return [f"proba_{i}" for i in range(k)]


def logged_frame(records: list[PredictionRecord], schema: SchemaConfig, classes: list[Any] | None
                 ) -> pd.DataFrame:
    """One row per logged prediction: the row key, TIME, KEY_NAME (the API key's name), ROUTE, VERSION (the
    model that answered), the monitored prediction and class probabilities (`logged_output`), the features."""
    return pd.DataFrame.from_records(
        [{schema.key_column: r.id, TIME: r.time, KEY_NAME: r.key_name, ROUTE: r.route, VERSION: r.model_version,
          **logged_output(r, schema.task, classes), **r.features} for r in records])


def logged_output(record: PredictionRecord, task: str, classes: list[Any] | None) -> dict[str, Any]:
    """The monitored prediction (and class probabilities) of one logged prediction, as far as it holds them
    (the fields, or an older line's canonical output: the class probabilities as a list, or the value)."""
    canonical, probabilities = record.output, record.probabilities
    probs: list[float] | None = None
    if isinstance(canonical, list) and task != "regression":
        probs = [float(p) for p in canonical]
    elif isinstance(probabilities, dict) and classes and all(str(c) in probabilities for c in classes):
        probs = [float(probabilities[str(c)]) for c in classes]
    if task == "regression":
        value = canonical if isinstance(canonical, (int, float)) else record.value
        return {} if value is None else {PREDICTION: float(value)}
    if task == "binary":
        p = probs[1] if probs is not None else record.probability
        return {} if p is None else {PREDICTION: float(p), "proba_0": 1.0 - float(p), "proba_1": float(p)}
    out: dict[str, Any] = {}
    if probs is not None:
        out |= dict(zip(proba_columns(len(probs)), probs, strict=True))
    label = record.label
    if label is None and probs is not None and classes:
        label = classes[int(np.argmax(probs))]
    return out | ({} if label is None else {PREDICTION: str(label)})


def join_labels(current: pd.DataFrame, paths: Paths, schema: SchemaConfig, model: ModelBundle | None
                ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Current rows whose label has arrived in the validated data (joined by the key column), with the
    label encoded as the model sees it in ACTUAL; rows whose label the model does not know are dropped."""
    key, target = schema.key_column, schema.target
    info: dict[str, Any] = {"unknown_label_rows": 0}
    if model is None or PREDICTION not in current or key not in current:
        return current.head(0), info
    labels = pd.read_parquet(paths.validated_rows, columns=[key, target])
    labels = labels.dropna(subset=[target]).drop_duplicates(key)
    keyed = current.drop(columns=[target], errors="ignore").dropna(subset=[key])
    try:
        keyed = keyed.astype({key: labels[key].dtype})
    except (TypeError, ValueError):  # ids logged as text against numeric ids: compare the spelling
        keyed, labels = keyed.astype({key: str}), labels.astype({key: str})
    merged = keyed.merge(labels, on=key, how="inner")
    encoded, known = _encode_labels(merged[target], model)
    if not known.all():
        unknown = sorted(map(str, merged.loc[~known, target].unique()))
        log.warning("dropping %d labelled row(s) whose label the model does not know: %s",
                    int((~known).sum()), ", ".join(unknown[:10]))
        info |= {"unknown_label_rows": int((~known).sum()), "unknown_labels": unknown[:10]}
    labeled = merged.loc[known].drop(columns=[target]).reset_index(drop=True)
    labeled[ACTUAL] = encoded[known]
    return labeled, info


def _encode_labels(labels: pd.Series, model: ModelBundle) -> tuple[np.ndarray, np.ndarray]:
    """Encoded labels and a mask of those the model knows (the others encode as 0 and are masked out)."""
    regression = model.task == "regression"
    try:
        encoded = model.transform.encode_target(labels.to_numpy())
        return encoded, np.ones(len(labels), dtype=bool)
    except ValueError:
        pass
    codes: dict[Any, Any] = {}
    for value in labels.unique():
        try:
            codes[value] = model.transform.encode_target(np.asarray([value], dtype=object))[0]
        except ValueError:
            codes[value] = None
    mapped = labels.map(codes)
    known = mapped.notna().to_numpy()
    return mapped.fillna(0).to_numpy(dtype="float64" if regression else "int64"), known


def model_output(frame: pd.DataFrame, task: str, k: int) -> np.ndarray | None:
    """The canonical model output of scored rows: (n, k) class probabilities, or (n,) values."""
    if frame.empty or PREDICTION not in frame:
        return None
    if task == "regression":
        return frame[PREDICTION].to_numpy(dtype="float64")
    columns = proba_columns(k)
    if k and all(c in frame for c in columns):
        return frame[columns].to_numpy(dtype="float64")
    if task == "binary":  # older test predictions: the prediction is P(positive class)
        p = frame[PREDICTION].to_numpy(dtype="float64")
        return np.column_stack([1 - p, p])
    return None
