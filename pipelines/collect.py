"""collect: take the rows that are new since the last run from the configured source into data/raw/.

Incremental and idempotent. data/raw/manifest.json keeps every batch with its watermark interval
(low, high], row count and content hash; the newest `high` is the watermark. A run reads rows newer
than the watermark, so no row is read twice or skipped; a run with nothing new changes nothing.
`rerun` reads one recorded interval again and checks that the source gives the same batch (it also
restores a lost or damaged batch file). Batch files are written before the manifest names them,
each atomically, so a killed run leaves the previous state.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from pipelines.config import Paths, Settings
from pipelines.io import atomic_path, file_digest, read_json, text_if_mixed, write_json
from pipelines.sources import Source, SourceError, Watermarks, open_source

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def run(settings: Settings, paths: Paths, rerun: str | None = None) -> dict[str, Any]:
    """Collect the new rows as one batch per day (or per run); with `rerun`, re-read that batch's interval."""
    source = open_source(settings, paths)
    watermarks = source.watermarks
    manifest = load_manifest(paths, settings.watermark_column)
    if rerun is not None:
        return _rerun(source, watermarks, manifest, rerun, paths)

    low = watermarks.from_json(manifest["watermark"])
    rows, unreadable = source.read(low, None)
    if unreadable:
        log.warning("%d row(s) of %s have no readable %r and cannot be collected: fix them at the source",
                    unreadable, source.description, watermarks.column)
    new = []
    for name, part in _split(rows, watermarks, settings.source.split_by_day, manifest):
        high = watermarks.parse(part[watermarks.column]).max()
        entry = _write_batch(paths, name, part) | {"low": manifest["watermark"], "high": watermarks.to_json(high)}
        manifest["batches"].append(entry)
        manifest["watermark"] = entry["high"]
        new.append(entry)
        log.info("collected batch %s: %d rows, %s in (%s, %s]", name, len(part), watermarks.column,
                 entry["low"], entry["high"])
    if not new:
        log.info("no new rows in %s after %s=%s", source.description, watermarks.column, manifest["watermark"])
    manifest.update(source=source.description, rows_without_watermark=unreadable)
    write_json(paths.raw / MANIFEST, manifest)
    return {"new_batches": len(new), "new_rows": sum(b["rows"] for b in new), "batches": len(manifest["batches"]),
            "rows": sum(b["rows"] for b in manifest["batches"]), "watermark": manifest["watermark"],
            "rows_without_watermark": unreadable}


def load_manifest(paths: Paths, watermark_column: str) -> dict[str, Any]:
    """The collected batches so far (an empty manifest before the first run)."""
    file = paths.raw / MANIFEST
    empty = {"watermark_column": watermark_column, "watermark": None, "batches": []}
    if not file.is_file():
        return empty
    manifest = read_json(file)
    if "watermark" not in manifest:  # written before collect was incremental: it had no intervals to go on
        log.warning("%s predates incremental collect: collecting every batch again", file)
        return empty
    if manifest.get("watermark_column") != watermark_column:
        raise SourceError(f"{file} was collected with watermark column {manifest.get('watermark_column')!r}, "
                          f"params.yaml now says {watermark_column!r}: restore the setting, or move data/raw "
                          f"away to collect from scratch")
    return manifest


def _split(rows: pd.DataFrame, watermarks: Watermarks, by_day: bool, manifest: dict[str, Any]
           ) -> list[tuple[str, pd.DataFrame]]:
    """New rows as named batches: one per calendar day of a timestamp watermark, else one."""
    if rows.empty:
        return []
    taken = {b["batch"] for b in manifest["batches"]}
    if by_day and watermarks.is_time:
        days = watermarks.parse(rows[watermarks.column]).dt.strftime("%Y-%m-%d")
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


def _rerun(source: Source, watermarks: Watermarks, manifest: dict[str, Any], name: str, paths: Paths
           ) -> dict[str, Any]:
    entry = next((b for b in manifest["batches"] if b["batch"] == name), None)
    if entry is None:
        known = ", ".join(b["batch"] for b in manifest["batches"]) or "none yet"
        raise SourceError(f"no collected batch {name!r} to rerun; batches: {known}")
    rows, _ = source.read(watermarks.from_json(entry["low"]), watermarks.from_json(entry["high"]))
    file = paths.raw / entry["file"]
    with atomic_path(file) as tmp:  # replaces the file only with the very same bytes, else raises
        text_if_mixed(rows).to_parquet(tmp, index=False)
        digest = file_digest(tmp)
        if digest != entry["sha256"]:
            raise SourceError(f"the source now gives {len(rows)} rows (sha256 {digest[:12]}) for batch {name} "
                              f"({watermarks.column} in ({entry['low']}, {entry['high']}]), collected as "
                              f"{entry['rows']} rows (sha256 {entry['sha256'][:12]}): rows changed at the source; "
                              f"the collected batch is kept")
        restored = not file.is_file() or file_digest(file) != digest
    log.info("batch %s: the source gives the same %d rows%s", name, len(rows), " (file restored)" if restored else "")
    return {"batch": name, "rows": len(rows), "identical": True, "restored": restored}
