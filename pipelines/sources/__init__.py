"""Data sources behind one interface: rows whose watermark lies in an interval, in a stable order.

A source answers `read(low, high)` with every row whose watermark w has low < w <= high (None:
unbounded), sorted by (watermark, id), so reading the same interval twice gives the same rows.
Collect keeps the watermark; sources keep no state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import pandas as pd

from pipelines.config import Paths, Settings

SOURCE_URL_ENV = "AMAAS_SOURCE_URL"
Watermark = pd.Timestamp | int


class SourceError(RuntimeError):
    """The configured source cannot be read; the message names the source and the fix."""


@dataclass(frozen=True)
class Watermarks:
    """The watermark column, the id column that breaks ties, and whether the watermark is a timestamp."""

    column: str
    id_column: str
    is_time: bool

    def parse(self, values: pd.Series) -> pd.Series:
        """Watermark values as timestamps or numbers; unreadable ones become NaT/NaN."""
        if self.is_time:
            return pd.to_datetime(values, errors="coerce")
        return pd.to_numeric(values, errors="coerce")

    def to_json(self, value: Watermark) -> str | int:
        return pd.Timestamp(value).isoformat() if self.is_time else int(value)

    def from_json(self, value: str | int | None) -> Watermark | None:
        if value is None:
            return None
        return pd.Timestamp(value) if self.is_time else int(value)

    def select(self, df: pd.DataFrame, low: Watermark | None, high: Watermark | None) -> pd.DataFrame:
        """The rows of `df` with low < watermark <= high, sorted by (watermark, id)."""
        if self.column not in df.columns:
            raise SourceError(f"the source has no watermark column {self.column!r}: set source.watermark_column "
                              f"in params.yaml to a column it has")
        values = self.parse(df[self.column])
        keep = values.notna()
        if low is not None:
            keep &= values > low
        if high is not None:
            keep &= values <= high
        key = pd.DataFrame({"w": values, "i": pd.to_numeric(df[self.id_column], errors="coerce")
                            if self.id_column in df.columns else 0})[keep.to_numpy()]
        return df.loc[key.sort_values(["w", "i"], kind="mergesort").index].reset_index(drop=True)

    def unreadable(self, df: pd.DataFrame) -> int:
        """Rows whose watermark is missing or unreadable: no interval holds them, so collect cannot take them."""
        return int(self.parse(df[self.column]).isna().sum()) if self.column in df.columns else len(df)


class Source(Protocol):
    description: str
    watermarks: Watermarks

    def read(self, low: Watermark | None, high: Watermark | None) -> tuple[pd.DataFrame, int]:
        """Rows with low < watermark <= high, sorted by (watermark, id); and how many rows of the whole
        source have no readable watermark (no interval can hold them: collect reports them)."""
        ...


def open_source(settings: Settings, paths: Paths) -> Source:
    """The source params.yaml names, ready to read."""
    kind, wm = settings.source.kind, Watermarks(settings.watermark_column, settings.data_schema.id_column,
                                                 settings.watermark_column == settings.data_schema.time_column)
    if kind == "sql":
        from pipelines.sources.sql import SqlSource

        cfg = settings.source.sql
        assert cfg is not None  # config checks that the section of the chosen kind exists
        return SqlSource(os.environ.get(SOURCE_URL_ENV) or cfg.url, cfg.table, cfg.db_schema, wm, paths.root)
    if kind == "files":
        from pipelines.sources.files import FilesSource

        files = settings.source.files
        assert files is not None
        return FilesSource(paths.resolve(files.path), files.pattern, wm, files.path)
    from pipelines.sources.simulator import SimulatorSource

    return SimulatorSource(settings.source.simulator, settings.seed, wm)
