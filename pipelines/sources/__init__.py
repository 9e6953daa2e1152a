"""Data sources behind one interface: rows whose watermark lies in an interval, in a stable order.

A source answers `read(low, high)` with every row whose watermark w has low < w <= high (None:
unbounded), sorted by (watermark, id), or by (watermark, row content) for a table without an id,
so reading the same interval twice gives the same rows. Collect keeps the watermark; sources keep
no state. A files source with no watermark at all hands over each new file as it is (`files()`).

A time column is read by `parse_time`: timestamps as timestamps; numbers (a year, an epoch) as
ordinal numbers unless schema.time_unit names their epoch unit. Numbers are never read as
nanoseconds since 1970 by default.

`state()` tells collect, without reading, that nothing can have changed since its last read: collect then
returns at once (pandas is imported only by what reads or parses rows, so `dvc repro` with nothing new is fast).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias

from pipelines.config import Paths, Settings, TimeUnit

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

SOURCE_URL_ENV = "AMAAS_SOURCE_URL"
Watermark: TypeAlias = "pd.Timestamp | int | float"


class SourceError(RuntimeError):
    """The configured source cannot be read; the message names the source and the fix."""


def parse_time(values: pd.Series, unit: TimeUnit | None) -> pd.Series:
    """A time column as timestamps, or as ordinal numbers; unreadable values become NaT/NaN.

    With `unit` (schema.time_unit) numbers are epochs in that unit. Without it, a numeric column (or
    text that is all numbers) stays numeric: a year or a sequence number is compared as a number.
    Text that is mostly numbers is numbers too; other text is parsed as timestamps, and a number mixed
    into timestamp text is unreadable, never nanoseconds.
    """
    import pandas as pd
    from pandas.api import types

    if types.is_datetime64_any_dtype(values):
        return values
    numbers = pd.to_numeric(values, errors="coerce")
    if unit is not None:
        return pd.to_datetime(numbers, unit=unit, errors="coerce")
    if types.is_numeric_dtype(values) and not types.is_bool_dtype(values):
        return numbers
    present = int(values.notna().sum())
    if present and int(numbers.notna().sum()) * 2 > present:  # mostly numbers: a year with a typo in it
        return numbers
    return pd.to_datetime(values.where(numbers.isna()), errors="coerce")


def row_hash(frame: pd.DataFrame) -> np.ndarray:
    """A stable int64 hash of each row's values, whatever types a reader gave them.

    Each value is hashed in one canonical spelling: a number (or text that is a number: "2001", 2001
    and 2001.0 are the same) as its float, a timestamp in nanoseconds, anything else as its text;
    missing values hash alike in every column type.
    """
    import pandas as pd

    columns = {str(c): _canonical(frame[c]) for c in frame.columns}
    hashed = pd.util.hash_pandas_object(pd.DataFrame(columns, index=frame.index), index=False)
    return hashed.to_numpy().view("int64")


def _canonical(col: pd.Series) -> pd.Series:
    import pandas as pd
    from pandas.api import types

    if types.is_datetime64_any_dtype(col):
        stamps = col.dt.tz_convert("UTC").dt.tz_localize(None) if col.dt.tz is not None else col
        return stamps.astype("datetime64[ns]").astype("int64").astype(str).where(col.notna(), None)  # type: ignore[call-overload]
    numbers = col.astype("float64") if types.is_numeric_dtype(col) or types.is_bool_dtype(col) else \
        pd.to_numeric(col, errors="coerce").astype("float64")
    text = numbers.astype(str).where(numbers.notna(), col.astype(str))
    # None, not NaN, for a missing value, so it hashes alike in every column type; pandas-stubs' where() has
    # no None for `other` (pandas takes any scalar)
    return text.where(col.notna(), None).astype(object)  # type: ignore[call-overload]


@dataclass(frozen=True)
class Watermarks:
    """The watermark column, the id column that breaks ties, and how the watermark is read.

    `column` None: no watermark (files source only; each new file is a batch). `is_time`: the watermark
    is the time column, read by parse_time with `unit`; otherwise it is a number (an increasing id).
    """

    column: str | None
    id_column: str | None
    is_time: bool
    unit: TimeUnit | None = None

    def parse(self, values: pd.Series) -> pd.Series:
        """Watermark values as timestamps or numbers; unreadable ones become NaT/NaN."""
        import pandas as pd

        if self.is_time:
            return parse_time(values, self.unit)
        return pd.to_numeric(values, errors="coerce")

    @staticmethod
    def to_json(value: Watermark) -> str | int | float:
        import numpy as np
        import pandas as pd

        if isinstance(value, (pd.Timestamp, np.datetime64)):
            return pd.Timestamp(value).isoformat()
        number = float(value)
        return int(number) if number.is_integer() else number

    @staticmethod
    def from_json(value: str | int | float | None) -> Watermark | None:
        if value is None or isinstance(value, (int, float)):
            return value
        import pandas as pd

        return pd.Timestamp(value)

    def to_source(self, value: Watermark) -> object:
        """A watermark as the source column holds it: an epoch number where schema.time_unit is set."""
        import pandas as pd

        if isinstance(value, pd.Timestamp):
            if self.unit is not None:
                return (value - pd.Timestamp(0, tz=value.tz)) // pd.Timedelta(1, unit=self.unit)
            return value.to_pydatetime()
        return int(value) if float(value).is_integer() else float(value)

    def select(self, df: pd.DataFrame, low: Watermark | None, high: Watermark | None) -> pd.DataFrame:
        """The rows of `df` with low < watermark <= high, sorted by (watermark, id or row content)."""
        if self.column is None or self.column not in df.columns:
            raise SourceError(f"the source has no watermark column {self.column!r}: set source.watermark_column "
                              f"in params.yaml to a column it has")
        values = self.parse(df[self.column])
        self._comparable(values, low if low is not None else high)
        keep = values.notna()
        if low is not None:
            keep &= values > low
        if high is not None:
            keep &= values <= high
        return self.ordered(df[keep.to_numpy()], values[keep.to_numpy()])

    def ordered(self, df: pd.DataFrame, values: pd.Series | None = None) -> pd.DataFrame:
        """`df` sorted by (watermark, id), or (watermark, row content) without an id: a stable order."""
        import pandas as pd
        from pandas.api import types

        key = pd.DataFrame(index=df.index)
        if self.column is not None:
            key["w"] = self.parse(df[self.column]) if values is None else values
        if self.id_column is not None and self.id_column in df.columns:
            ident = df[self.id_column]
            key["i"] = ident if types.is_numeric_dtype(ident) else ident.astype(str)
        else:
            key["i"] = row_hash(df)
        return df.loc[key.sort_values(list(key.columns), kind="mergesort").index].reset_index(drop=True)

    def _comparable(self, values: pd.Series, bound: Watermark | None) -> None:
        """A watermark recorded as a timestamp must not be compared with numbers, or the other way round."""
        if bound is None or not values.notna().any():
            return
        import pandas as pd
        from pandas.api import types

        stamp, column_is_time = isinstance(bound, pd.Timestamp), types.is_datetime64_any_dtype(values)
        if stamp != column_is_time:
            raise SourceError(
                f"the collected watermark {self.to_json(bound)!r} is a {'timestamp' if stamp else 'number'}, but "
                f"column {self.column!r} now reads as {'timestamps' if column_is_time else 'numbers'}: "
                f"restore schema.time_unit (null: numbers are ordinal; s/ms/us/ns/D: epoch timestamps), "
                f"or move data/raw away to collect from scratch")

    def unreadable(self, df: pd.DataFrame) -> int:
        """Rows whose watermark is missing or unreadable: no interval holds them, so collect cannot take them."""
        if self.column is None:
            return 0
        return int(self.parse(df[self.column]).isna().sum()) if self.column in df.columns else len(df)


class Source(Protocol):
    description: str
    watermarks: Watermarks

    def read(self, low: Watermark | None, high: Watermark | None) -> tuple[pd.DataFrame, int]:
        """Rows with low < watermark <= high, sorted by (watermark, id); and how many rows of the whole
        source have no readable watermark (no interval can hold them: collect reports them)."""
        ...

    def state(self) -> str | None:
        """A digest of everything `read` depends on, computed without reading rows (and without pandas); None
        where only a read can tell. Equal to the state recorded at the last read: nothing new can have arrived."""
        ...


def open_source(settings: Settings, paths: Paths) -> Source:
    """The source params.yaml names, ready to read."""
    schema, column = settings.data_schema, settings.watermark_column
    is_time = column is not None and column == schema.time_column
    kind, wm = settings.source.kind, Watermarks(column, schema.id_column, is_time,
                                                 schema.time_unit if is_time else None)
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
