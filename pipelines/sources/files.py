"""A drop folder of CSV or Parquet files (a glob), read as one table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipelines.sources import SourceError, Watermark, Watermarks

READERS = {".csv": pd.read_csv, ".parquet": pd.read_parquet, ".pq": pd.read_parquet}


class FilesSource:
    def __init__(self, folder: Path, pattern: str, watermarks: Watermarks, shown_as: str) -> None:
        self.folder, self.pattern, self.watermarks = folder, pattern, watermarks
        self.description = f"files({shown_as}/{pattern})"  # as params.yaml says: the same in every clone

    def read(self, low: Watermark | None, high: Watermark | None) -> tuple[pd.DataFrame, int]:
        if not self.folder.is_dir():
            raise SourceError(f"drop folder {self.folder} not found: create it or fix source.files.path")
        frames, unreadable, columns = [], 0, None
        for file in sorted(p for p in self.folder.glob(self.pattern) if p.is_file()):
            df = _read(file)
            if columns is not None and set(df.columns) != set(columns):
                raise SourceError(f"{file} has columns {sorted(df.columns)}, the files before it "
                                  f"{sorted(columns)}: every file in the drop folder needs the same columns")
            columns = list(df.columns)
            unreadable += self.watermarks.unreadable(df)
            frames.append(self.watermarks.select(df, low, high))
        if not frames:
            return pd.DataFrame(), 0
        # the same key order as one file would give: a stable sort of the rows from every file
        return self.watermarks.select(pd.concat(frames, ignore_index=True), None, None), unreadable


def _read(file: Path) -> pd.DataFrame:
    reader = READERS.get(file.suffix.lower())
    if reader is None:
        raise SourceError(f"{file}: only {', '.join(READERS)} files can be read; fix source.files.pattern")
    try:
        return reader(file)
    except Exception as exc:  # a truncated or corrupt file: name it, keep it where it is
        raise SourceError(f"cannot read {file} ({exc.__class__.__name__}: {exc}); fix or remove the file, "
                          f"then collect again") from exc
