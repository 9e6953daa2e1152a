"""A drop folder of CSV or Parquet files (a glob), read as one table, or file by file without a watermark."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd

from pipelines.io import file_digest
from pipelines.sources import SourceError, Watermark, Watermarks

READERS: dict[str, Callable[[Path], pd.DataFrame]] = {
    ".csv": pd.read_csv, ".parquet": pd.read_parquet, ".pq": pd.read_parquet}


class FilesSource:
    def __init__(self, folder: Path, pattern: str, watermarks: Watermarks, shown_as: str) -> None:
        self.folder, self.pattern, self.watermarks = folder, pattern, watermarks
        self.description = f"files({shown_as}/{pattern})"  # as params.yaml says: the same in every clone

    def read(self, low: Watermark | None, high: Watermark | None) -> tuple[pd.DataFrame, int]:
        frames, unreadable = [], 0
        for _, df in self._tables():
            unreadable += self.watermarks.unreadable(df)
            frames.append(self.watermarks.select(df, low, high))
        if not frames:
            return pd.DataFrame(), 0
        # the same key order as one file would give: a stable sort of the rows from every file
        return self.watermarks.select(pd.concat(frames, ignore_index=True), None, None), unreadable

    def files(self) -> list[tuple[str, str]]:
        """(name inside the drop folder, sha256) of every file the pattern matches, sorted by name."""
        return [(self._name(file), file_digest(file)) for file in self._matches()]

    def read_file(self, name: str) -> pd.DataFrame:
        """The rows of one file of the drop folder, in the file's order."""
        file = self.folder / name
        if not file.is_file():
            raise SourceError(f"{file} is no longer in the drop folder: put it back to rerun its batch")
        return _read(file)

    def _matches(self) -> list[Path]:
        if not self.folder.is_dir():
            raise SourceError(f"drop folder {self.folder} not found: create it or fix source.files.path")
        return sorted(p for p in self.folder.glob(self.pattern) if p.is_file())

    def _name(self, file: Path) -> str:
        return file.relative_to(self.folder).as_posix()

    def _tables(self) -> Iterator[tuple[Path, pd.DataFrame]]:
        columns = None
        for file in self._matches():
            df = _read(file)
            if columns is not None and set(df.columns) != set(columns):
                raise SourceError(f"{file} has columns {sorted(df.columns)}, the files before it "
                                  f"{sorted(columns)}: every file in the drop folder needs the same columns")
            columns = list(df.columns)
            yield file, df


def _read(file: Path) -> pd.DataFrame:
    reader = READERS.get(file.suffix.lower())
    if reader is None:
        raise SourceError(f"{file}: only {', '.join(READERS)} files can be read; fix source.files.pattern")
    try:
        return reader(file)
    except Exception as exc:  # a truncated or corrupt file: name it, keep it where it is
        raise SourceError(f"cannot read {file} ({exc.__class__.__name__}: {exc}); fix or remove the file, "
                          f"then collect again") from exc
