"""Batch scoring: a large table in, one Parquet file of predictions out, in chunks.

`amaas score INPUT OUTPUT` scores a CSV or Parquet file with the champion (or `--version`). The input
is read in chunks of `scale.score_chunk_rows`, so memory stays bounded whatever its size. With a Dask
scheduler (`scale.dask_scheduler`, or `--workers N` for a LocalCluster here) the chunks are scored on
the workers and the results are merged in input order; without one they are scored in this process.
Every path gives the same numbers as `ModelBundle.predict_proba` on the whole table. The output is
written to a temp file and renamed, so a failed run leaves no partial file.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.bundle import ModelBundle
from pipelines.config import Paths, Settings
from pipelines.io import atomic_path
from pipelines.models.cluster import dask_cluster, describe
from pipelines.progress import progress
from pipelines.registry import Registry, RegistryError

log = logging.getLogger(__name__)


def read_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The rows of a Parquet or CSV file, `chunk_rows` at a time, in file order."""
    if not path.is_file():
        raise FileNotFoundError(f"input {path} not found")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
            yield batch.to_pandas()
    elif suffix == ".csv":
        yield from pd.read_csv(path, chunksize=chunk_rows)
    else:
        raise ValueError(f"input {path} must be a .parquet or .csv file")


def chunk_count(path: Path, chunk_rows: int) -> int | None:
    """How many chunks `read_chunks` yields: known from a Parquet file's footer, unknown for CSV (None)."""
    if path.suffix.lower() not in (".parquet", ".pq") or not path.is_file():
        return None
    return -(-pq.ParquetFile(path).metadata.num_rows // chunk_rows)


def score_chunk(bundle: ModelBundle, rows: pd.DataFrame, id_column: str | None) -> pd.DataFrame:
    """Predictions for one chunk: the id (when the input has it); the label and each class's probability
    (`proba_<class>`), or the value; the model version."""
    output = bundle.predict(rows)
    if bundle.classes is None:
        out = pd.DataFrame({"value": output})
    else:
        numeric = all(isinstance(c, int) for c in bundle.classes)
        out = pd.DataFrame({"label": pd.Series(bundle.labels(output), dtype="int64" if numeric else object)})
        if bundle.task == "binary":
            out["probability"] = output[:, 1]  # of the positive class, the last of `classes`
        for i, label in enumerate(bundle.classes):
            out[f"proba_{label}"] = output[:, i]
    if id_column is not None and id_column in rows.columns:
        out.insert(0, id_column, rows[id_column].to_numpy())
    out["model_version"] = bundle.version
    return out


def run(settings: Settings, paths: Paths, input_path: Path, output_path: Path, version: str | None = None,
        workers: int | None = None) -> dict[str, Any]:
    """Score `input_path` into `output_path`; return row count, chunks, model version and where it ran."""
    registry = Registry(paths.registry)
    version = version or registry.champion
    if version is None:
        raise RegistryError("no champion to score with yet: run `amaas run` first, or pass --version")
    bundle = registry.load(version)
    chunks = read_chunks(input_path, settings.scale.score_chunk_rows)
    args = (settings.data_schema.id_column,)
    address = "local" if workers else settings.scale.dask_scheduler
    with dask_cluster(address, workers or settings.scale.dask_workers) as client:
        where = describe(client)
        results = _on_dask(client, bundle, chunks, args) if client else (score_chunk(bundle, c, *args) for c in chunks)
        total = chunk_count(input_path, settings.scale.score_chunk_rows)
        rows, n = _write(output_path, progress(results, "score", total=total, unit="chunk"))
    log.info("scored %d rows in %d chunks with %s (%s) -> %s", rows, n, version, where, output_path)
    return {"rows": rows, "chunks": n, "model_version": version, "ran_on": where, "output": str(output_path)}


def _on_dask(client: Any, bundle: ModelBundle, chunks: Iterator[pd.DataFrame], args: tuple[Any, ...]
             ) -> Iterator[pd.DataFrame]:
    """Score chunks on the cluster, a bounded number in flight, yielding results in input order."""
    model = client.scatter(bundle, broadcast=True)  # sent to each worker once, not with every chunk
    in_flight: deque[Any] = deque()
    limit = 2 * max(len(client.scheduler_info()["workers"]), 1)
    for chunk in chunks:
        data = client.scatter(chunk)  # shipped as data, not inside the task graph
        in_flight.append(client.submit(score_chunk, model, data, *args, pure=False))
        if len(in_flight) >= limit:
            yield in_flight.popleft().result()
    while in_flight:
        yield in_flight.popleft().result()


def _write(output_path: Path, results: Iterator[pd.DataFrame]) -> tuple[int, int]:
    rows = chunks = 0
    with atomic_path(output_path) as tmp:
        writer = None
        try:
            for frame in results:
                table = pa.Table.from_pandas(frame, preserve_index=False)
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                rows, chunks = rows + len(frame), chunks + 1
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise ValueError("the input has no rows to score")
    return rows, chunks
