"""The response cache: a model's answer per row, kept in memory (an LRU of `serve.cache.size` entries).

A row's key is the model version plus the row as that model's fitted transform sees it (after its cleaning:
" RENT " and "rent", 1 and 1.0, a value above the clip bound and the bound itself are one entry), so a hit is
the answer the model gave that row before. Each server worker process has its own cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Protocol

import numpy as np
import pandas as pd

from pipelines.transform import FeatureTransform

Answer = dict[str, Any]


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
        self._entries: OrderedDict[tuple[str, bytes], Answer] = OrderedDict()
        self._lock = threading.Lock()
        self._cleared = 0  # clears so far: a lookup that began before one keeps none of its answers

    def answers(self, model: Scorer, rows: pd.DataFrame) -> list[Answer]:
        """`model`'s answer for each row: cached ones from memory, the others scored in one model call (and
        kept). The answers are shared with the cache: copy before changing one."""
        if not self.size or rows.empty:
            return model.answers(rows)
        keys = row_keys(model, rows)
        with self._lock:
            cleared = self._cleared
            found = [self._entries.get(key) for key in keys]
            for key, answer in zip(keys, found, strict=True):
                if answer is not None:
                    self._entries.move_to_end(key)
        missing = [i for i, answer in enumerate(found) if answer is None]
        scored = model.answers(rows.iloc[missing]) if missing else []
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
        return [answer for answer in found if answer is not None]

    def clear(self) -> None:
        """Forget every answer (a model switch): the hit and miss counts go on."""
        with self._lock:
            self._entries.clear()
            self._cleared += 1

    def stats(self) -> dict[str, int]:
        """size (the most entries), entries, hits, misses: what /metrics shows."""
        with self._lock:
            return {"size": self.size, "entries": len(self._entries), "hits": self.hits, "misses": self.misses}


def row_keys(model: Scorer, rows: pd.DataFrame) -> list[tuple[str, bytes]]:
    """(model version, the row's features after the model's own transform) for each row."""
    features = np.ascontiguousarray(model.transform.transform(rows).to_numpy(dtype="float64"))
    features[features == 0.0] = 0.0  # -0.0 and 0.0 are the same input to the model: one spelling
    return [(model.version, row.tobytes()) for row in features]
