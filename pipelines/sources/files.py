"""A drop folder of CSV or Parquet files (a glob), read as one table, or file by file without a watermark."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.io import file_digest
from pipelines.sources import SourceError, Watermark, Watermarks

if TYPE_CHECKING:
    import pandas as pd

SUFFIXES = (".csv", ".parquet", ".pq")  # CSV, else Parquet


class FilesSource:
    def __init__(self, folder: Path, pattern: str, watermarks: Watermarks, shown_as: str) -> None:
        self.folder, self.pattern, self.watermarks = folder, pattern, watermarks
        self.description = f"files({shown_as}/{pattern})"  # as params.yaml says: the same in every clone

    def read(self, low: Watermark | None, high: Watermark | None) -> tuple[pd.DataFrame, int]:
        import pandas as pd

        frames, unreadable = [], 0
        for _, df in self._tables():
            unreadable += self.watermarks.unreadable(df)
            frames.append(self.watermarks.select(df, low, high))
        if not frames:
            return pd.DataFrame(), 0
        # the same key order as one file would give: a stable sort of the rows from every file
        return self.watermarks.select(pd.concat(frames, ignore_index=True), None, None), unreadable

    def state(self) -> str:
        """Every file's name and content (and how they are read): the same files give the same rows."""
        digest = hashlib.sha256(repr(self.watermarks).encode())
        for name, sha256 in self.files():
            digest.update(f"\0{name}\0{sha256}".encode())
        return digest.hexdigest()

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
    import pandas as pd

    suffix = file.suffix.lower()
    if suffix not in SUFFIXES:
        raise SourceError(f"{file}: only {', '.join(SUFFIXES)} files can be read; fix source.files.pattern")
    try:
        return pd.read_csv(file) if suffix == ".csv" else pd.read_parquet(file)
    except Exception as exc:  # a truncated or corrupt file: name it, keep it where it is
        raise SourceError(f"cannot read {file} ({exc.__class__.__name__}: {exc}); fix or remove the file, "
                          f"then collect again") from exc
