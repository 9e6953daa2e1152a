"""Data sources behind one interface: each yields named batches of raw rows."""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd

from pipelines.config import Settings
from pipelines.sources import simulator


def iter_batches(settings: Settings) -> Iterator[tuple[str, pd.DataFrame]]:
    """Yield (batch name, rows) for every batch the configured source holds."""
    if settings.source.kind == "simulator":
        cfg = settings.source.simulator
        for index in range(cfg.n_batches):
            name = simulator.batch_date(cfg, index).strftime("%Y-%m-%d")
            yield name, simulator.generate_batch(cfg, settings.seed, index)
    else:  # pragma: no cover - the Literal type in config rejects other kinds
        raise ValueError(f"unknown source kind {settings.source.kind!r}")
