"""validate: check raw batches with Great Expectations; bad rows go to quarantine with reasons.

Invariant: rows in = clean rows + quarantined rows. A broken schema, too few rows, or a bad-row
share over the threshold stops the pipeline (DataValidationError) after writing a report that says why.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.config import Paths, SchemaConfig, Settings
from pipelines.io import read_json, write_json, write_parquet
from pipelines.transform import normalize_category

log = logging.getLogger(__name__)

ROW = "__row__"  # position of a row in the collected data; GE reports failures by it
REASONS = "quarantine_reasons"
METRIC_KEYS = ("status", "rows_in", "rows_clean", "rows_quarantined", "bad_share")


class DataValidationError(RuntimeError):
    """The batch must not reach training; the message says which columns and why."""


def load_batches(paths: Paths) -> list[tuple[str, pd.DataFrame]]:
    """Every collected batch as (name, rows), in manifest order."""
    manifest_file = paths.raw / "manifest.json"
    if not manifest_file.is_file():
        raise DataValidationError(f"{manifest_file} not found: run `amaas collect` first")
    batches = []
    for entry in read_json(manifest_file)["batches"]:
        try:
            batches.append((entry["batch"], pd.read_parquet(paths.raw / entry["file"])))
        except Exception as exc:  # a truncated or corrupt file is a data problem, not a crash
            raise DataValidationError(f"batch file {entry['file']} cannot be read ({exc}); re-collect it") from exc
    if not batches:
        raise DataValidationError("the source returned no batches: check source settings in params.yaml")
    return batches


def concat_batches(batches: list[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    """All batches in one frame, with a `batch` column."""
    return pd.concat([rows.assign(batch=name) for name, rows in batches], ignore_index=True)


def check_schema(df: pd.DataFrame, schema: SchemaConfig) -> list[str]:
    """Batch-level problems: missing columns, or columns whose values are not of the declared type."""
    problems = [f"column {c!r} is missing" for c in schema.columns if c not in df.columns]
    for col in [*schema.numeric, schema.id_column, schema.target]:
        if col in df.columns and df[col].notna().any():
            coerced = pd.to_numeric(df[col], errors="coerce")
            if coerced.notna().sum() == 0:
                problems.append(f"column {col!r} should be numeric but has type {df[col].dtype}")
    if schema.time_column in df.columns:
        parsed = pd.to_datetime(df[schema.time_column], errors="coerce")
        if df[schema.time_column].notna().any() and parsed.notna().sum() == 0:
            problems.append(f"column {schema.time_column!r} should hold timestamps")
    return problems


def coerce_types(df: pd.DataFrame, schema: SchemaConfig) -> tuple[pd.DataFrame, dict[int, list[str]]]:
    """Cast columns to their declared types; a value that will not cast is a row failure."""
    out = df.copy()
    reasons: dict[int, list[str]] = defaultdict(list)
    for col in [*schema.numeric, schema.id_column, schema.target]:
        coerced = pd.to_numeric(out[col], errors="coerce").astype("float64")
        for row in out.loc[coerced.isna() & out[col].notna(), ROW]:
            reasons[int(row)].append(f"expect_column_values_to_be_of_type({col})")
        out[col] = coerced
    time = pd.to_datetime(out[schema.time_column], errors="coerce")
    for row in out.loc[time.isna() & out[schema.time_column].notna(), ROW]:
        reasons[int(row)].append(f"expect_column_values_to_be_of_type({schema.time_column})")
    out[schema.time_column] = time
    for col in schema.categorical:
        out[col] = normalize_category(out[col])
    return out, reasons


def _expectations(schema: SchemaConfig) -> list[Any]:
    import great_expectations as gx

    e = gx.expectations
    rules: list[Any] = [
        e.ExpectColumnValuesToNotBeNull(column=schema.id_column),
        e.ExpectColumnValuesToNotBeNull(column=schema.time_column),
        e.ExpectColumnValuesToNotBeNull(column=schema.target),
        e.ExpectColumnValuesToBeInSet(column=schema.target, value_set=[0, 1]),
    ]
    for col, rule in schema.numeric.items():
        rules.append(e.ExpectColumnValuesToBeBetween(column=col, min_value=rule.min, max_value=rule.max))
        if not rule.nullable:
            rules.append(e.ExpectColumnValuesToNotBeNull(column=col))
    for col, cats in schema.categorical.items():
        rules.append(e.ExpectColumnValuesToBeInSet(column=col, value_set=cats))
        rules.append(e.ExpectColumnValuesToNotBeNull(column=col))
    return rules


def run_expectations(df: pd.DataFrame, schema: SchemaConfig) -> tuple[dict[int, list[str]], dict[str, Any]]:
    """Run the suite built from params on `df`; return failures per row and a JSON summary."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its INFO lines are noise here
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # no network calls from a pipeline stage
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = (
        ctx.data_sources.add_pandas("amaas")
        .add_dataframe_asset("batch")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = ctx.suites.add(gx.ExpectationSuite(name="amaas_suite", expectations=_expectations(schema)))
    definition = ctx.validation_definitions.add(gx.ValidationDefinition(name="amaas", data=batch_def, suite=suite))
    result = definition.run(
        batch_parameters={"dataframe": df},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW]},
    )
    reasons: dict[int, list[str]] = defaultdict(list)
    summary: dict[str, Any] = {}
    for res in result.results:
        cfg = res.expectation_config
        name = f"{cfg.type}({cfg.kwargs.get('column')})"
        failed = res.result.get("unexpected_index_list") or []
        summary[name] = {"success": bool(res.success), "unexpected_count": len(failed)}
        for hit in failed:
            reasons[int(hit[ROW])].append(name)
    return reasons, summary


def split_rows(
    raw: pd.DataFrame, typed: pd.DataFrame, bad: pd.Series, reasons: dict[int, list[str]]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Clean (typed) rows and quarantined rows as they arrived, with their reasons.

    Together they are exactly the input rows. Quarantined values are kept as received (a value
    that failed to cast stays visible), with mixed-type columns stored as text.
    """
    quarantine = raw[bad].copy()
    for col in quarantine.select_dtypes(include="object").columns:
        quarantine[col] = quarantine[col].map(lambda v: None if v is None or v != v else str(v))
    quarantine[REASONS] = ["; ".join(sorted(set(reasons[int(r)]))) for r in quarantine[ROW]]
    return typed[~bad.to_numpy()].copy(), quarantine


def run(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Validate every collected row; write clean rows, quarantined rows and reports/validation.json."""
    schema, rules = settings.data_schema, settings.validation
    batches = load_batches(paths)
    raw = concat_batches(batches)
    raw.insert(0, ROW, range(len(raw)))
    report_file = paths.reports / "validation.json"

    # per batch: after concatenation a column missing from one batch would look like nulls
    problems = [f"batch {name}: {problem}" for name, rows in batches for problem in check_schema(rows, schema)]
    if problems:
        _fail(report_file, len(raw), "schema", problems)

    typed, reasons = coerce_types(raw, schema)
    ge_reasons, expectations = run_expectations(typed, schema)
    for row, names in ge_reasons.items():
        reasons[row].extend(names)
    dupes = typed[schema.id_column].notna() & typed.duplicated(schema.id_column, keep="first")
    for row in typed.loc[dupes, ROW]:
        reasons[int(row)].append(f"expect_column_values_to_be_unique({schema.id_column})")
    expectations[f"expect_column_values_to_be_unique({schema.id_column})"] = {
        "success": not dupes.any(), "unexpected_count": int(dupes.sum())
    }

    bad = raw[ROW].isin(list(reasons))
    clean, quarantine = split_rows(raw, typed, bad, reasons)
    assert len(clean) + len(quarantine) == len(raw), "validate lost or duplicated rows"
    bad_share = {str(b): float(s) for b, s in bad.groupby(raw["batch"]).mean().items()}
    summary = {
        "status": "passed",
        "rows_in": len(raw),
        "rows_clean": len(clean),
        "rows_quarantined": len(quarantine),
        "bad_share": round(len(quarantine) / max(len(raw), 1), 6),
        "bad_share_by_batch": bad_share,
        "expectations": expectations,
    }
    write_parquet(paths.quarantine / "quarantine.parquet", quarantine)
    over = {b: s for b, s in bad_share.items() if s > rules.max_bad_share}
    if over:
        _fail(report_file, len(raw), "bad_share", [
            f"batch {b}: {s:.1%} of rows failed expectations (max {rules.max_bad_share:.1%}); "
            f"see {paths.quarantine / 'quarantine.parquet'}" for b, s in over.items()
        ], summary)
    if len(clean) < rules.min_rows:
        _fail(report_file, len(raw), "too_few_rows",
              [f"{len(clean)} clean rows, fewer than validate.min_rows={rules.min_rows}"], summary)

    clean = clean.astype({schema.id_column: "int64", schema.target: "int64"})  # not null once validated
    write_parquet(paths.validated / "data.parquet", clean.drop(columns=[ROW]))
    write_json(paths.reports / "validation_details.json", summary)
    write_json(report_file, {k: summary[k] for k in METRIC_KEYS})
    log.info("validated %d rows: %d clean, %d quarantined", len(raw), len(clean), len(quarantine))
    return {k: summary[k] for k in METRIC_KEYS}


def _fail(report_file: Path, rows: int, kind: str, problems: list[str], summary: dict[str, Any] | None = None) -> None:
    write_json(report_file, {**(summary or {}), "status": "failed", "rows_in": rows, "failure": kind,
                             "problems": problems})
    raise DataValidationError(f"validation failed ({kind}), pipeline stopped before training:\n  - "
                              + "\n  - ".join(problems))
