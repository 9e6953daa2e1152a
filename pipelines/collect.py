"""collect: pull every batch from the configured source into data/raw/ with a manifest."""

from __future__ import annotations

import logging
from typing import Any

from pipelines.config import Paths, Settings
from pipelines.io import atomic_dir, file_digest, write_json
from pipelines.sources import iter_batches

log = logging.getLogger(__name__)


def run(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Write one Parquet file per batch plus manifest.json (name, rows, content hash)."""
    manifest = []
    with atomic_dir(paths.raw) as out:
        for name, df in iter_batches(settings):
            file = out / f"batch_{name}.parquet"
            df.to_parquet(file, index=False)
            manifest.append({"batch": name, "file": file.name, "rows": len(df), "sha256": file_digest(file)})
            log.info("collected batch %s: %d rows", name, len(df))
        write_json(out / "manifest.json", {"source": settings.source.kind, "batches": manifest})
    rows = sum(b["rows"] for b in manifest)
    return {"batches": len(manifest), "rows": rows, "raw_dir": str(paths.raw)}
