"""Atomic file writes: a temp file (or folder) beside the target, then a rename.

A run killed mid-write leaves either the old artifact or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:  # annotations only: the no-op paths (collect with nothing new, the CLI) never load pandas
    import pandas as pd
    import pyarrow as pa


def _clear_leftovers(target: Path) -> None:
    """Remove what a run killed mid-write (SIGKILL skips `finally`) left beside `target`.

    A temp file or folder is deleted; a previous version parked as `.name.old` by atomic_dir is put
    back if the kill came between its two renames. Writers of one project are serialized by
    pipelines.lock, so nothing else is writing these names now.
    """
    old = target.with_name(f".{target.name}.old")
    if old.exists() and not target.exists():
        os.replace(old, target)
    # tempfile names are the prefix, 8 random characters, the suffix: no other target's temp matches
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.????????.tmp"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; rename it onto `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `target`; swap it in for `target` if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = target.with_name(f".{target.name}.old")
    try:
        yield tmp
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON: a NaN or an infinity raises here rather than reaching a parser that refuses it."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def redacted_url(url: str) -> str:
    """`scheme://host[:port]` of a URL: what a message or a log line may show of it (a path, a query, a user or a
    password may hold a token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}" if parts.scheme else \
        "<a URL without a scheme>"


class DamagedFile(ValueError):
    """A file the pipeline wrote cannot be read back (truncated, edited by hand): the message names it."""


def read_json(path: Path, fix: str = "restore it (`dvc checkout`, a backup) or rerun the stage that writes it"
              ) -> Any:
    """The JSON in `path`; a truncated or invalid file raises DamagedFile naming the file and `fix`."""
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DamagedFile(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}; "
                          f"truncated or edited?): {fix}") from exc


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_parquet_chunks(path: Path, frames: Iterable[pd.DataFrame | pa.Table], schema: pa.Schema | None = None
                         ) -> None:
    """One Parquet file (atomically) from frames (or Arrow tables) of the same columns, one row group each: memory
    holds one.

    The column types are `schema`'s where given (that of the whole table: a text column missing in one frame is
    still text), else the first frame's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        writer: pq.ParquetWriter | None = None
        try:
            for frame in frames:
                table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, schema=schema,
                                                                                      preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table.cast(writer.schema))
        finally:
            if writer is not None:
                writer.close()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def text_if_mixed(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns as text (nulls kept), so Parquet can store a column that mixes numbers and strings.

    Raw data keeps what arrived, e.g. "lots" in a numeric column; validation casts it later.
    """
    out = df.copy()
    for col in out.select_dtypes(include="object").columns:
        out[col] = out[col].map(lambda v: None if v is None or v != v else str(v))
    return out


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, algorithm).hexdigest()


def tree_sha256(root: Path) -> str:
    """Content hash of every file under `root` (names and bytes, sorted)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(file_digest(path).encode())
    return digest.hexdigest()
