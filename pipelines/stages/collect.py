"""collect: take the rows that are new since the last run from the configured source into data/raw/.

Incremental and idempotent. data/raw/manifest.json keeps every batch with its watermark interval
(low, high], row count and content hash; the newest `high` is the watermark. A run reads rows newer
than the watermark, so no row is read twice or skipped; a run with nothing new changes nothing.
A files source without a watermark (no time column, no id) takes each new file as one batch; the
manifest records each file's name and sha256, so a file is never collected twice.

`rerun` reads one recorded batch again (its interval, or its file): the same rows restore a lost or
damaged batch file; rows repaired or changed at the source replace the batch, and the manifest entry
records what it replaced. Batch files are written before the manifest names them, each atomically,
so a killed run leaves the previous state.

A source that can read whole days one at a time (the simulator's `read_days`) is read so, with batches per
day: each day's batch file is written before the next day is read, so memory holds one day, not the table.

The manifest also keeps the source's `state()` at the last read: while it is the same, nothing new can have
arrived, and collect returns without reading (or importing pandas): a `dvc repro` with nothing new is fast.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pipelines.config import Paths, Settings
from pipelines.contracts import Option, Out, stage
from pipelines.io import atomic_path, file_digest, read_json, text_if_mixed, write_json
from pipelines.sources import Source, SourceError, Watermarks, open_source, row_hash

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


@stage(
    params=("seed", "source", "schema"),
    outs=(Out("raw", persist=True),),
    options=(Option("--rerun", metavar="BATCH", help="read that batch's interval (or file) again: the same rows "
                    "restore a lost or damaged file; rows repaired or changed at the source replace the batch "
                    "(recorded in data/raw/manifest.json)"),),
    always_changed=True,  # asks the source for rows newer than the watermark on every repro; with none, data/raw
    # stays byte-identical and the stages after it are skipped
    description="Append the rows newer than the watermark to data/raw (one batch file per day or per file)",
)
def run(settings: Settings, paths: Paths, rerun: str | None = None) -> dict[str, Any]:
    """Collect the new rows as one batch per day (or per run, or per new file); with `rerun`, re-read that batch."""
    source = open_source(settings, paths)
    watermarks = source.watermarks
    manifest = load_manifest(paths, watermarks.column, watermarks.unit)
    if rerun is not None:
        return _rerun(source, watermarks, manifest, rerun, paths)
    if watermarks.column is None:
        return _collect_files(source, manifest, paths)

    state = source.state()  # before the read: a change while it reads is seen by the next run
    if state is not None and manifest.get("source_state") == state and manifest.get("source") == source.description:
        log.info("no new rows: %s is as it was at the last collect", source.description)
        return _summary(manifest, []) | {"rows_without_watermark": manifest["rows_without_watermark"]}
    low = watermarks.from_json(manifest["watermark"])
    by_day = settings.source.split_by_day
    read_days = getattr(source, "read_days", None)  # a source that can hand over whole days one at a time
    if by_day and watermarks.is_time and read_days is not None:
        reads, unreadable = read_days(low), 0  # it reads its own rows: none lack a watermark
    else:
        collected = sum(b["rows"] for b in manifest["batches"])
        everything, unreadable = source.read(low, None)
        reads = iter([everything])
        below = getattr(source, "at_or_below_watermark", None)
        if below is not None and below > collected:  # rows inserted at or below the watermark after it passed them
            manifest["rows_skipped_below_watermark"] = below - collected
            log.warning("%d row(s) of %s have %s at or below the watermark %s but were not collected (inserted "
                        "late): they are skipped; `amaas collect --rerun BATCH` takes the batch whose interval holds "
                        "them", below - collected, source.description, watermarks.column, manifest["watermark"])
    new = []
    for rows in reads:  # batch files are written as each read comes in: memory holds one read at a time
        for name, part in _split(rows, watermarks, by_day, manifest):
            high = watermarks.parse(part[watermarks.column]).max()
            entry = _write_batch(paths, name, part) | {"low": manifest["watermark"], "high": watermarks.to_json(high)}
            manifest["batches"].append(entry)
            manifest["watermark"] = entry["high"]
            new.append(entry)
            log.info("collected batch %s: %d rows, %s in (%s, %s]", name, len(part), watermarks.column,
                     entry["low"], entry["high"])
    if not new:
        log.info("no new rows in %s after %s=%s", source.description, watermarks.column, manifest["watermark"])
    if unreadable:
        log.warning(unreadable_advice(unreadable, source.description, watermarks.column, manifest["watermark"]))
    manifest.update(source=source.description, source_state=state, rows_without_watermark=unreadable)
    write_json(paths.raw_manifest, manifest)
    return _summary(manifest, new) | {"rows_without_watermark": unreadable}


def unreadable_advice(count: int, source: str, column: str, watermark: Any) -> str:
    """What to do about rows no interval holds: what works, not just "fix them"."""
    return (f"{count} row(s) of {source} have no readable {column!r} and cannot be collected. To collect such a row "
            f"once repaired, either give it a {column} after the current watermark {watermark} (the next collect "
            f"takes it as new), or give it its true {column} and run `amaas collect --rerun BATCH` for the batch "
            f"whose interval (low, high] in data/raw/manifest.json holds that value: a row repaired to a value at or "
            f"below the watermark is not collected otherwise")


def _summary(manifest: dict[str, Any], new: list[dict[str, Any]]) -> dict[str, Any]:
    return {"new_batches": len(new), "new_rows": sum(b["rows"] for b in new), "batches": len(manifest["batches"]),
            "rows": sum(b["rows"] for b in manifest["batches"]), "watermark": manifest["watermark"]}


def load_manifest(paths: Paths, watermark_column: str | None, unit: str | None = None) -> dict[str, Any]:
    """The collected batches so far (an empty manifest before the first run)."""
    file = paths.raw_manifest
    empty: dict[str, Any] = {"watermark_column": watermark_column, "time_unit": unit, "watermark": None, "batches": []}
    if not file.is_file():
        return empty
    manifest: dict[str, Any] = read_json(file)
    if "watermark" not in manifest:  # written before collect was incremental: it had no intervals to go on
        log.warning("%s predates incremental collect: collecting every batch again", file)
        return empty
    if manifest.get("watermark_column") != watermark_column:
        raise SourceError(f"{file} was collected with watermark column {manifest.get('watermark_column')!r}, "
                          f"params.yaml now says {watermark_column!r}: restore the setting, or move data/raw "
                          f"away to collect from scratch")
    if manifest.setdefault("time_unit", unit) != unit:  # manifests before time_unit: as configured now
        raise SourceError(f"{file} was collected with schema.time_unit {manifest['time_unit']!r}, params.yaml now "
                          f"says {unit!r}, which reads {watermark_column!r} differently: restore the setting, "
                          f"or move data/raw away to collect from scratch")
    return manifest


def _split(rows: pd.DataFrame, watermarks: Watermarks, by_day: bool, manifest: dict[str, Any]
           ) -> list[tuple[str, pd.DataFrame]]:
    """New rows as named batches: one per calendar day of a timestamp watermark, else one (numbers: ordinal)."""
    from pandas.api import types

    if rows.empty:
        return []
    taken = {b["batch"] for b in manifest["batches"]}
    values = watermarks.parse(rows[watermarks.column]) if watermarks.is_time else None
    if by_day and values is not None and types.is_datetime64_any_dtype(values):
        days = values.dt.strftime("%Y-%m-%d")
        parts = [(day, rows[(days == day).to_numpy()].reset_index(drop=True)) for day in days.unique()]
    else:
        parts = [(f"{len(taken) + 1:06d}", rows)]
    named = []
    for name, part in parts:  # a day collected in two runs gives batches 2026-01-03 and 2026-01-03.2
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}.{n}"
        taken.add(unique)
        named.append((unique, part))
    return named


def _write_batch(paths: Paths, name: str, rows: pd.DataFrame) -> dict[str, Any]:
    file = paths.raw / f"batch_{name}.parquet"
    with atomic_path(file) as tmp:
        text_if_mixed(rows).to_parquet(tmp, index=False)
    return {"batch": name, "file": file.name, "rows": len(rows), "sha256": file_digest(file)}


def _collect_files(source: Any, manifest: dict[str, Any], paths: Paths) -> dict[str, Any]:
    """No watermark: each file not collected before is one batch; a collected file that changed is reported."""
    seen = {b["source_file"]: b for b in manifest["batches"] if "source_file" in b}
    new, changed = [], []
    for name, digest in source.files():
        entry = seen.get(name)
        if entry is not None:
            if entry["source_sha256"] != digest:
                changed.append(name)
                log.warning("%s changed since it was collected as batch %s (sha256 %s, now %s): its rows are not "
                            "collected again; run `amaas collect --rerun %s` to replace the batch with the file's "
                            "current rows, or save new rows under a new file name", name, entry["batch"],
                            entry["source_sha256"][:12], digest[:12], entry["batch"])
            continue
        rows = source.read_file(name)
        batch = f"{len(manifest['batches']) + 1:06d}"
        entry = _write_batch(paths, batch, rows) | {"source_file": name, "source_sha256": digest}
        manifest["batches"].append(entry)
        new.append(entry)
        log.info("collected batch %s: %d rows from %s", batch, len(rows), name)
    if not new:
        log.info("no new files in %s", source.description)
    manifest.update(source=source.description, rows_without_watermark=0)
    write_json(paths.raw_manifest, manifest)
    return _summary(manifest, new) | {"rows_without_watermark": 0, "changed_files": changed}


def _rerun(source: Source, watermarks: Watermarks, manifest: dict[str, Any], name: str, paths: Paths
           ) -> dict[str, Any]:
    """Read one batch again; the same rows restore its file, changed rows replace it (recorded in the manifest)."""
    entry = next((b for b in manifest["batches"] if b["batch"] == name), None)
    if entry is None:
        known = ", ".join(b["batch"] for b in manifest["batches"]) or "none yet"
        raise SourceError(f"no collected batch {name!r} to rerun; batches: {known}")
    if "source_file" in entry:
        files: Any = source  # a files source without a watermark: the batch is one file
        rows, digest_now = files.read_file(entry["source_file"]), dict(files.files()).get(entry["source_file"])
        where = f"file {entry['source_file']}"
    else:
        rows, _ = source.read(watermarks.from_json(entry["low"]), watermarks.from_json(entry["high"]))
        where = f"{watermarks.column} in ({entry['low']}, {entry['high']}]"
    file = paths.raw / entry["file"]
    previous = _read_quietly(file)
    with atomic_path(file) as tmp:
        text_if_mixed(rows).to_parquet(tmp, index=False)
        digest = file_digest(tmp)
        if digest == entry["sha256"]:
            restored = previous is None or file_digest(file) != digest
            log.info("batch %s: the source gives the same %d rows%s", name, len(rows),
                     " (file restored)" if restored else "")
            return {"batch": name, "rows": len(rows), "identical": True, "restored": restored}
        added, removed = _row_changes(previous, rows)
    # the new file is in place; the manifest now names its content (a kill in between: rerun again)
    record = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "previous_sha256": entry["sha256"],
              "previous_rows": entry["rows"], "rows_added": added, "rows_removed": removed}
    entry.update(rows=len(rows), sha256=digest, reruns=[*entry.get("reruns", []), record])
    if "source_file" in entry and digest_now is not None:
        entry["source_sha256"] = digest_now
    write_json(paths.raw_manifest, manifest)
    log.warning("batch %s replaced with the source's current rows (%s): %d rows, was %d; %s added, %s removed; "
                "validate again", name, where, len(rows), record["previous_rows"],
                "?" if added is None else added, "?" if removed is None else removed)
    return {"batch": name, "rows": len(rows), "identical": False, "restored": False, "previous_rows":
            record["previous_rows"], "rows_added": added, "rows_removed": removed}


def _read_quietly(file: Any) -> pd.DataFrame | None:
    """The collected batch as it is on disk, or None where it is lost or damaged."""
    import pandas as pd

    try:
        return pd.read_parquet(file) if file.is_file() else None
    except Exception:  # a damaged file is what a rerun repairs
        return None


def _row_changes(before: pd.DataFrame | None, after: pd.DataFrame) -> tuple[int | None, int | None]:
    """Rows in `after` but not `before` and the other way round, by content (a changed row counts in both)."""
    if before is None:
        return None, None
    if list(before.columns) != list(after.columns):
        return len(after), len(before)
    old, new = Counter(row_hash(text_if_mixed(before))), Counter(row_hash(text_if_mixed(after)))
    return sum((new - old).values()), sum((old - new).values())
