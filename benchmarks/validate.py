"""Validate 1M rows: amaas's path (the suite's row rules vectorized, GE for the rest and the Data Docs), the
all-GE path, and plain vectorized pandas masks of the same rules.

Usage: python benchmarks/validate.py [--rows 1000000] [--batches 4] [--params params.yaml]
Checked before the figures are printed: amaas's path and the all-GE path find the same failing rows with
the same reasons and the same per-expectation outcomes, and the pandas masks the same rows for each rule.
Also printed: the fixed cost of a batch (10-row batches, GE already imported).
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

    chunk_rows = settings.validation.chunk_rows

    def best(run: Callable[[], Any], repeat: int) -> tuple[Any, float]:
        """The result and the best time of `repeat` runs: the machine may be shared."""
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - start)
        return out, min(times)

    def amaas(docs_dir: Path | None = None, vectorized: bool = True) -> validate.SuiteResult:
        return validate.run_expectations(batches, suite, docs_dir, chunk_rows=chunk_rows, vectorized=vectorized)

    found, pandas_s = best(lambda: pandas_checks(batches, settings), 3)
    ge, ge_s = best(lambda: amaas(vectorized=False), 1)  # the reference: slow, once
    fast, fast_s = best(amaas, 3)
    with tempfile.TemporaryDirectory() as docs:
        _, docs_s = best(lambda: amaas(Path(docs)), 3)

    reasons = {r: sorted(n) for r, n in fast.row_failures.items()}
    assert reasons == {r: sorted(n) for r, n in ge.row_failures.items()}, "row rules and GE disagree on failing rows"
    assert fast.expectations == ge.expectations and fast.batch_failures == ge.batch_failures, "outcomes disagree"
    # the reasons name the value too ("rule(col): 'value'"); the rules are what pandas and GE must agree on
    rules = {r: sorted(name.partition("): ")[0] + (")" if "): " in name else "") for name in n)
             for r, n in reasons.items()}
    assert rules == {r: sorted(n) for r, n in found.items()}, "GE and pandas disagree on failing rows"
    n = len(raw)
    print(f"{'path (best of 3 but GE)':<34} {'seconds':>8} {'rows/s':>12} {'x pandas':>9}")
    for label, seconds in [("pandas (vectorized masks)", pandas_s), ("GE for every expectation", ge_s),
                           ("amaas (row rules + GE)", fast_s), ("amaas + Data Docs", docs_s)]:
        print(f"{label:<34} {seconds:>8.2f} {n / seconds:>12,.0f} {seconds / pandas_s:>9.1f}")
    print(f"failing rows: {len(reasons):,} (row rules, GE and pandas agree, reasons too)")

    def once(small: list[tuple[str, pd.DataFrame]], docs_dir: Path | None) -> float:
        return best(lambda: validate.run_expectations(small, suite, docs_dir), 3)[1]

    one, two = batches[:1], batches[:2]
    one, two = [(name, rows.iloc[:10]) for name, rows in one], [(name, rows.iloc[:10]) for name, rows in two]
    with tempfile.TemporaryDirectory() as docs:
        once(one, Path(docs))  # warm: GE's first validation and its first Data Docs import more
        bare, docs_one, docs_two = once(one, None), once(one, Path(docs)), once(two, Path(docs))
    print(f"fixed cost of a batch (10 rows): {bare:.3f} s; with Data Docs {docs_two - docs_one:.3f} s per batch "
          f"plus {2 * docs_one - docs_two:.3f} s once per run (the docs site)")
    print(f"peak RSS MiB: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
