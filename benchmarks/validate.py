"""Validate 1M rows: the Great Expectations path amaas runs versus plain vectorized pandas checks of the same rules.

Usage: python benchmarks/validate.py [--rows 1000000] [--batches 4] [--params params.yaml]
Both paths find the same failing rows for every rule (checked before the figures are printed).
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd

from pipelines.config import Paths, Settings, load_settings
from pipelines.sources.simulator import generate_batch
from pipelines.stages import validate
from pipelines.transform import allowed_categories, label_key


def pandas_checks(batches: list[tuple[str, pd.DataFrame]], settings: Settings) -> dict[int, list[str]]:
    """The generated suite's row rules as vectorized masks, batch by batch (what GE returns: failing rows by rule)."""
    schema = settings.data_schema
    reasons: dict[int, list[str]] = defaultdict(list)
    for _, df in batches:
        rows = df[validate.ROW].to_numpy()
        rules: list[tuple[str, pd.Series]] = [
            (f"expect_column_values_to_not_be_null({c})", df[c].isna())
            for c in (schema.id_column, schema.time_column, schema.target) if c is not None
        ]
        if schema.classes is not None:
            labels = [label_key(c) for c in schema.classes]
            rules.append((f"expect_column_values_to_be_in_set({schema.target})",
                          df[schema.target].notna() & ~df[schema.target].isin(labels)))
        for col, rule in schema.numeric.items():
            values = df[col]
            rules.append((f"expect_column_values_to_be_between({col})", (values < rule.min) | (values > rule.max)))
            if not rule.nullable:
                rules.append((f"expect_column_values_to_not_be_null({col})", values.isna()))
        for col, cat in schema.categorical.items():
            allowed = allowed_categories(cat.values, settings.clean.normalize_categories)
            rules.append((f"expect_column_values_to_be_in_set({col})", df[col].notna() & ~df[col].isin(allowed)))
            if not cat.nullable:
                rules.append((f"expect_column_values_to_not_be_null({col})", df[col].isna()))
        for name, mask in rules:
            for row in rows[mask.to_numpy()]:
                reasons[int(row)].append(name)
    return reasons


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = load_settings(args.params)
    cfg = settings.source.simulator.model_copy(update={"rows_per_batch": args.rows // args.batches})
    collected = [(str(i), generate_batch(cfg, settings.seed, i)) for i in range(args.batches)]
    raw = validate.concat_batches(collected)
    raw.insert(0, validate.ROW, range(len(raw)))
    typed, _ = validate.coerce_types(raw, settings.data_schema, settings.clean.normalize_categories)
    batches = validate.frames_for_ge(typed, collected, settings.data_schema)  # what `amaas validate` gives GE
    suite = validate.build_suite(settings.model_copy(update={"validate_": settings.validation.model_copy(
        update={"expectations_file": None})}), Paths(Path.cwd()))
    print(f"rows: {len(raw):,} in {args.batches} batches, {len(suite)} expectations, "
          f"{len(settings.data_schema.columns)} columns")

    start = time.perf_counter()
    found = pandas_checks(batches, settings)
    pandas_s = time.perf_counter() - start

    start = time.perf_counter()
    result = validate.run_expectations(batches, suite, docs_dir=None)
    ge_s = time.perf_counter() - start

    import tempfile

    with tempfile.TemporaryDirectory() as docs:
        start = time.perf_counter()
        validate.run_expectations(batches, suite, docs_dir=Path(docs))
        docs_s = time.perf_counter() - start

    # GE's reasons name the value too ("rule(col): 'value'"); the rules are what both paths must agree on
    ge_rows = {r: sorted(name.partition("): ")[0] + (")" if "): " in name else "") for name in n)
               for r, n in result.row_failures.items()}
    assert ge_rows == {r: sorted(n) for r, n in found.items()}, "GE and pandas disagree on failing rows"
    n = len(raw)
    print(f"{'path':<28} {'seconds':>8} {'rows/s':>12} {'x pandas':>9}")
    print(f"{'pandas (vectorized masks)':<28} {pandas_s:>8.2f} {n / pandas_s:>12,.0f} {1:>9.1f}")
    print(f"{'GE (amaas validate)':<28} {ge_s:>8.2f} {n / ge_s:>12,.0f} {ge_s / pandas_s:>9.1f}")
    print(f"{'GE + Data Docs':<28} {docs_s:>8.2f} {n / docs_s:>12,.0f} {docs_s / pandas_s:>9.1f}")
    print(f"failing rows: {len(found):,} (both paths agree)")
    print(f"peak RSS MiB: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
