"""The response cache: a model's answer per row, kept in memory (an LRU of `serve.cache.size` entries).

A row's key is the model version plus the row spelled as that model's fitted transform reads it: numbers as
floats, categories as its cleaning spells them (" RENT " and "rent", 1 and 1.0 are one entry), missing values as
None. Rows with one key are one input to the model, so a hit is the answer the model gave that row before. (The
key stops short of clipping and imputing, which would take a pandas transform per lookup: as long as scoring
one row.) Each server worker process has its own cache.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from typing import Any, Protocol

import numpy as np
import pandas as pd

from pipelines.transform import FeatureTransform, normalize_value

Answer = dict[str, Any]
Rows = list[dict[str, Any]]
Key = tuple[str, tuple[float | str | None, ...]]
NOTICES = ("unseen", "out_of_reference")  # answer fields that name the columns a model had not seen so (bundle.answers)


class Scorer(Protocol):
    """What the cache needs of a model: pipelines.bundle.ModelBundle."""

    transform: FeatureTransform

    @property
    def version(self) -> str: ...

    def answers(self, rows: pd.DataFrame) -> list[Answer]: ...


class ResponseCache:
    """A thread-safe LRU of answers; `size` 0 keeps nothing (every row goes to the model, nothing counted)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Key, Answer] = OrderedDict()
        self._lock = threading.Lock()
        self._cleared = 0  # clears so far: a lookup that began before one keeps none of its answers
        # rows answered per column with an unseen category / a number outside the reference range (cached or not)
        self.notices: dict[str, Counter[str]] = {kind: Counter() for kind in NOTICES}

    def answers(self, model: Scorer, rows: Rows) -> list[Answer]:
        """`model`'s answer for each row: cached ones from memory, the others scored in one model call (and
        kept). The answers are shared with the cache: copy before changing one."""
        if not self.size:
            return self._noticed(model.answers(features(model, rows)))
        keys = row_keys(model, rows)
        with self._lock:
            cleared = self._cleared
            found = [self._entries.get(key) for key in keys]
            for key, answer in zip(keys, found, strict=True):
                if answer is not None:
                    self._entries.move_to_end(key)
        missing = [i for i, answer in enumerate(found) if answer is None]
        scored = model.answers(features(model, [rows[i] for i in missing])) if missing else []
        with self._lock:
            self.hits += len(keys) - len(missing)
            self.misses += len(missing)
            for i, answer in zip(missing, scored, strict=True):
                found[i] = answer
                if cleared == self._cleared:  # not from a model that was switched away meanwhile
                    self._entries[keys[i]] = answer
                    self._entries.move_to_end(keys[i])
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return self._noticed([answer for answer in found if answer is not None])

    def cached(self, model: Scorer, rows: Rows) -> list[Answer] | None:
        """`model`'s cached answer for each row, or None if any is missing; counts nothing (see count_hits)."""
        if not self.size:
            return None
        keys = row_keys(model, rows)
        with self._lock:
            found = [self._entries.get(key) for key in keys]
            if any(answer is None for answer in found):
                return None
            for key in keys:
                self._entries.move_to_end(key)
        return self._noticed([answer for answer in found if answer is not None])

    def _noticed(self, answers: list[Answer]) -> list[Answer]:
        """`answers`, their unseen categories and out-of-reference numbers counted per column."""
        with self._lock:
            for answer in answers:
                for kind in NOTICES:
                    self.notices[kind].update(answer.get(kind, ()))
        return answers

    def count_hits(self, rows: int) -> None:
        """Rows answered from `cached` lookups."""
        with self._lock:
            self.hits += rows

    def clear(self) -> None:
        """Forget every answer (a model switch): the hit and miss counts go on."""
        with self._lock:
            self._entries.clear()
            self._cleared += 1

    def stats(self) -> dict[str, Any]:
        """size (the most entries), entries, hits, misses, and per notice (unseen, out_of_reference) the rows
        answered per column: what /metrics shows."""
        with self._lock:
            return {"size": self.size, "entries": len(self._entries), "hits": self.hits, "misses": self.misses,
                    **{kind: dict(counts) for kind, counts in self.notices.items()}}


def row_keys(model: Scorer, rows: Rows) -> list[Key]:
    """(model version, the row as the model's transform reads it) for each row."""
    transform = model.transform
    spell = normalize_value if transform.normalize else str
    return [(model.version, (*(_number(row.get(c)) for c in transform.numeric),
                             *(None if row.get(c) is None else spell(row[c]) for c in transform.categorical)))
            for row in rows]


def _number(value: Any) -> float | str | None:
    """A numeric field as the transform reads it: a float (-0.0 is 0.0), None for missing; text (which the
    gateway's schema does not let through) as itself."""
    if value is None:
        return None
    try:
        number = float(value) + 0.0
    except (TypeError, ValueError):
        return str(value)
    return None if number != number else number  # NaN is missing


def features(model: Scorer, rows: Rows) -> pd.DataFrame:
    """The model's input columns of the gateway's rows (KeyError if they lack one), built column by column (half the
    time of a frame of whole rows cut down to the columns), numbers as float arrays: the gateway's schema let only
    numbers and null through, so pandas need not infer each value's type (lists: 309 us for one row, 445 us for 100;
    float arrays: 146 and 191 us), and a column of nulls is still a number column."""
    transform = model.transform
    columns: dict[str, Any] = {c: np.array([row[c] for row in rows], dtype="float64") for c in transform.numeric}
    columns |= {c: [row[c] for row in rows] for c in transform.categorical}
    return pd.DataFrame(columns, copy=False)
