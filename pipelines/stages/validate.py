"""validate: check raw batches with Great Expectations; bad rows go to quarantine with reasons.

The suite is generated from `schema` and `validate` in params.yaml (types, ranges, allowed categories,
not-null, unique id, the target's classes, batch row count), plus the user's own expectations from
`validate.expectations_file`. Each batch is validated on its own and gets a Great Expectations Data
Docs page (reports/data_docs/). The row-level expectations are evaluated vectorized (`pipelines.rowrules`,
`validate.chunk_rows` rows at a time), GE runs the others and renders both. A quarantined row's reasons
name the expectation and the value that failed it (`expect_column_values_to_be_in_set(region): 'nroth'`).

Validated data keeps the table's own types: a string id stays text, a numeric time column (a year)
stays numeric, a classification target is int64 where every label is an integer and text otherwise,
a regression target is float64. A table without an id column gets a ROW_KEY column, a stable hash
of the row (`row_keys`), so later stages can join labels and order rows.

Batch by batch: memory holds one batch, the quarantined rows and the ids seen, whatever the table's size. What
spans batches (an id repeated in a later batch, the target's classes, the validated types, the bad-row share of
each batch, the top unexpected values) is kept as a compact summary; clean rows wait in files beside the output
until the whole table's types are known, then go to data/validated/data.parquet one batch at a time.

Invariant: rows in = clean rows + quarantined rows. A broken schema, a batch-level expectation that
fails (row count), too few rows, or a bad-row share over the threshold stops the pipeline
(DataValidationError) after writing a report that says which batch, which columns and why.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pandas.api import types

from pipelines import rowrules
from pipelines.config import ROW_KEY, Paths, SchemaConfig, Settings
from pipelines.contracts import Out, stage
from pipelines.io import (
    atomic_dir,
    file_digest,
    read_json,
    text_if_mixed,
    write_json,
    write_parquet,
    write_parquet_chunks,
)
from pipelines.progress import progress
from pipelines.sources import parse_time, row_hash
from pipelines.transform import allowed_categories, label_key, normalize_category

log = logging.getLogger(__name__)

ROW = "__row__"  # position of a row in the collected data; GE reports failures by it
REASONS = "quarantine_reasons"
METRIC_KEYS = ("status", "batches", "rows_in", "rows_clean", "rows_quarantined", "bad_share",
               "rows_skipped_below_watermark")
UNIQUE = rowrules.UNIQUE
TABLE_ROWS = ("expect_table_row_count_to_be_between", "expect_table_row_count_to_equal")  # read no column
OF_TYPE = "expect_column_values_to_be_of_type"
IN_SET = "expect_column_values_to_be_in_set"
TOP_VALUES = 5  # unexpected values listed per failing expectation in the stop message and the details
_INTEGER = re.compile(r"-?\d+")
SUITE = "amaas_suite"
DOCS_SITE = "amaas"


class DataValidationError(RuntimeError):
    """The batch must not reach training; the message says which columns and why."""


def batch_entries(paths: Paths) -> list[dict[str, Any]]:
    """The manifest's batches, in order, once every batch file is known to be there."""
    manifest_file = paths.raw_manifest
    if not manifest_file.is_file():
        raise DataValidationError(f"{manifest_file} not found: run `amaas collect` first")
    entries = read_json(manifest_file, fix="restore data/raw (`dvc checkout data/raw`, `dvc pull`)")["batches"]
    for entry in entries:
        file = paths.raw / entry["file"]
        if not file.is_file():
            raise DataValidationError(f"batch file {file} is missing; restore it from the source with "
                                      f"`amaas collect --rerun {entry['batch']}`")
    if not entries:
        raise DataValidationError("the source returned no batches: check source settings in params.yaml")
    return list(entries)


def read_batch(paths: Paths, entry: dict[str, Any]) -> pd.DataFrame:
    """One collected batch's rows, once its bytes are known to be those the manifest recorded."""
    file = paths.raw / entry["file"]
    try:
        rows = pd.read_parquet(file)
    except Exception as exc:  # a truncated or corrupt file is a data problem, not a crash
        raise DataValidationError(f"batch file {entry['file']} cannot be read ({exc}); restore it from the "
                                  f"source with `amaas collect --rerun {entry['batch']}`") from exc
    digest = file_digest(file)
    if "sha256" in entry and digest != entry["sha256"]:
        raise DataValidationError(
            f"batch {entry['batch']}: {file} has sha256 {digest[:12]}..., but {paths.raw_manifest} recorded "
            f"{entry['sha256'][:12]}... when it was collected: the file was changed or damaged since. Restore "
            f"it from the source with `amaas collect --rerun {entry['batch']}` (it also records what the "
            f"source now gives)")
    return rows


def load_batches(paths: Paths) -> list[tuple[str, pd.DataFrame]]:
    """Every collected batch as (name, rows), in manifest order (all in memory: `run` reads one at a time)."""
    return [(entry["batch"], read_batch(paths, entry)) for entry in batch_entries(paths)]


def concat_batches(batches: list[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    """All batches in one frame, with a `batch` column."""
    return pd.concat([rows.assign(batch=name) for name, rows in batches], ignore_index=True)


def check_schema(df: pd.DataFrame, schema: SchemaConfig) -> list[str]:
    """Batch-level problems: missing columns, or columns whose values are not of the declared type."""
    missing = [c for c in schema.columns if c not in df.columns]
    extra = [c for c in df.columns if c not in schema.columns]
    hint = f" (the batch has unexpected column(s) {', '.join(map(repr, extra))}: renamed?)" if extra else ""
    problems = [f"column {c!r} is missing{hint}" for c in missing]
    numeric = [*schema.numeric, *([schema.target] if schema.task == "regression" else [])]
    for col in numeric:
        if col in df.columns and df[col].notna().any():
            coerced = pd.to_numeric(df[col], errors="coerce")
            if coerced.notna().sum() == 0:
                problems.append(f"column {col!r} should be numeric but has type {df[col].dtype}")
    if schema.time_column is not None and schema.time_column in df.columns:
        parsed = parse_time(df[schema.time_column], schema.time_unit)
        if df[schema.time_column].notna().any() and parsed.notna().sum() == 0:
            kind = f"epoch numbers in {schema.time_unit!r}" if schema.time_unit else "timestamps or numbers"
            problems.append(f"column {schema.time_column!r} should hold {kind} (schema.time_unit)")
    return problems


def coerce_types(df: pd.DataFrame, schema: SchemaConfig, normalize: bool = True
                 ) -> tuple[pd.DataFrame, dict[int, list[str]]]:
    """Cast columns to their declared types; a value that will not cast is a row failure.

    With `normalize` (params clean.normalize_categories), categories are normalized before they are
    checked, exactly as the fitted transform normalizes them for training and serving. A numeric id
    stays numeric, any other id stays text; the time column is read by `parse_time` (timestamps, or
    numbers unless schema.time_unit names their epoch unit); a classification target becomes one
    spelling per label (`label_key`), a regression target a number.
    """
    out = df.copy()
    reasons: dict[int, list[str]] = defaultdict(list)

    def cast(col: str, typed: pd.Series) -> None:
        for row, value in out.loc[typed.isna() & out[col].notna(), [ROW, col]].itertuples(index=False):
            reasons[int(row)].append(reason(f"{OF_TYPE}({col})", value))
        out[col] = typed

    for col in [*schema.numeric, *([schema.target] if schema.task == "regression" else [])]:
        cast(col, pd.to_numeric(out[col], errors="coerce").astype("float64"))
    if schema.id_column is not None and not types.is_numeric_dtype(out[schema.id_column]):
        out[schema.id_column] = _text(out[schema.id_column])
    if schema.time_column is not None:
        cast(schema.time_column, parse_time(out[schema.time_column], schema.time_unit))
    if schema.is_classification:
        out[schema.target] = _labels(out[schema.target])
    for col in schema.categorical:
        out[col] = normalize_category(out[col]) if normalize else _text(out[col])
    return out, reasons


def reason(expectation: str, value: Any = None) -> str:
    """A quarantine reason: the expectation, and the value that failed it where there is one."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return expectation
    if isinstance(value, np.generic):
        value = value.item()
    return f"{expectation}: {value!r}"


def _text(values: pd.Series) -> pd.Series:
    """Values as text, nulls kept (None)."""
    return values.map(lambda v: None if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v)
                      ).astype(object)


def _labels(values: pd.Series) -> pd.Series:
    """Class labels, one spelling each (1, 1.0 and "1" are one class), as the data spells them otherwise."""
    keys, distinct = pd.factorize(values, use_na_sentinel=True)
    spelled = np.array([label_key(v) for v in distinct] + [None], dtype=object)
    return pd.Series(spelled[keys], index=values.index, dtype=object, name=values.name)


def row_keys(rows: pd.DataFrame, schema: SchemaConfig) -> pd.Series:
    """A stable int64 key per row of a table without an id: a hash of the schema's columns but the target.

    Computed on validated values (normalized categories, float numerics), so two spellings of one row
    get one key; identical rows get the same key.
    """
    columns = [c for c in schema.columns if c != schema.target]
    return pd.Series(row_hash(rows[columns]), index=rows.index, name=ROW_KEY, dtype="int64")


def target_problems(labels: set[str], schema: SchemaConfig) -> list[str]:
    """Batch-level target problems: a binary target without schema.classes whose data holds more than 2 labels.

    `labels`: every label the typed rows of all batches hold (a classification target as coerce_types spells it).
    """
    if schema.task != "binary" or schema.classes is not None or len(labels) <= 2:
        return []
    found = sorted(labels, key=_label_order)
    return [f"target {schema.target!r} must have 2 classes for task binary; set schema.task: multiclass for "
            f"{len(found)} classes found: {', '.join(found)} (or list the 2 valid labels in schema.classes to "
            f"quarantine the others)"]


def _label_order(key: str) -> tuple[bool, int, str]:
    """Integer labels by value, then text labels alphabetically."""
    integer = bool(_INTEGER.fullmatch(key))
    return (not integer, int(key) if integer else 0, key)


def count_unexpected(reasons: dict[int, list[str]], counts: dict[str, Counter[str]]) -> None:
    """Add each failing expectation's unexpected values in `reasons` (one count per row) to `counts`."""
    for names in reasons.values():
        for text in set(names):
            name, has_value, value = text.partition(": ")
            if has_value:
                counts[name][value] += 1


def top_unexpected(counts: dict[str, Counter[str]]) -> dict[str, list[tuple[str, int]]]:
    """Per failing expectation (column), its most frequent unexpected values with their row counts."""
    return {name: sorted(found.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_VALUES]
            for name, found in sorted(counts.items())}


def _values_lines(values: dict[str, list[tuple[str, int]]]) -> list[str]:
    return [f"{name} unexpected values: " + ", ".join(f"{v} ({n})" for v, n in top) for name, top in values.items()]


def type_facts(clean: pd.DataFrame, schema: SchemaConfig) -> dict[str, bool]:
    """What `validated_types` decides on clean rows: whether the id and time columns hold whole numbers, and
    (classification) whether every label is an integer. The facts of a table are those of its parts, and-ed."""
    facts = {col: types.is_numeric_dtype(clean[col]) and _integral(clean[col])
             for col in (schema.id_column, schema.time_column) if col is not None}
    if schema.task != "regression":
        facts[schema.target] = all(_INTEGER.fullmatch(str(k)) for k in clean[schema.target].unique())
    return facts


def validated_types(clean: pd.DataFrame, schema: SchemaConfig, facts: dict[str, bool] | None = None) -> pd.DataFrame:
    """Clean rows in the types later stages read (none of these columns holds nulls once validated).

    `facts`: the `type_facts` of the whole table these rows are part of (default: of these rows).
    """
    facts = type_facts(clean, schema) if facts is None else facts
    out = clean.copy()
    for col in (schema.id_column, schema.time_column):
        if col is not None and facts[col]:
            out[col] = out[col].astype("int64")
    target = out[schema.target]
    if schema.task == "regression":
        out[schema.target] = target.astype("float64")
    elif facts[schema.target]:
        out[schema.target] = target.astype("int64")
    else:
        out[schema.target] = target.astype(str)
    if schema.id_column is None:
        out[ROW_KEY] = row_keys(out, schema)
    return out


def _integral(values: pd.Series) -> bool:
    numbers = values.to_numpy(dtype="float64")
    return bool(np.all(np.isfinite(numbers)) and np.all(numbers == np.round(numbers)))


def _gx() -> Any:
    """great_expectations, imported quietly and with no network calls from a pipeline stage."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations

    # its INFO lines are noise here; one of its modules sets its own logger to INFO when imported
    for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return great_expectations


def build_suite(settings: Settings, paths: Paths) -> list[Any]:
    """The expectations: generated from params.yaml, then the user's own from validate.expectations_file."""
    gx = _gx()
    schema, rules, e = settings.data_schema, settings.validation, gx.expectations
    suite: list[Any] = [
        e.ExpectTableRowCountToBeBetween(min_value=rules.batch_rows[0], max_value=rules.batch_rows[1])]
    if schema.id_column is not None:
        suite += [e.ExpectColumnValuesToNotBeNull(column=schema.id_column),
                  e.ExpectColumnValuesToBeUnique(column=schema.id_column)]
    if schema.time_column is not None:
        suite.append(e.ExpectColumnValuesToNotBeNull(column=schema.time_column))
    suite.append(e.ExpectColumnValuesToNotBeNull(column=schema.target))
    if schema.classes is not None:  # labels as coerce_types spells them
        suite.append(e.ExpectColumnValuesToBeInSet(column=schema.target,
                                                   value_set=[label_key(c) for c in schema.classes]))
    for col, rule in schema.numeric.items():
        if rule.min is not None or rule.max is not None:  # hard bounds only: the reference range is monitoring's
            suite.append(e.ExpectColumnValuesToBeBetween(column=col, min_value=rule.min, max_value=rule.max))
        if not rule.nullable:
            suite.append(e.ExpectColumnValuesToNotBeNull(column=col))
    for col, cat in schema.categorical.items():
        suite.append(e.ExpectColumnValuesToBeInSet(
            column=col, value_set=allowed_categories(cat.values, settings.clean.normalize_categories)))
        if not cat.nullable:  # nullable: missing is a category of its own
            suite.append(e.ExpectColumnValuesToNotBeNull(column=col))
    if rules.expectations_file:
        suite.extend(_user_expectations(paths.resolve(rules.expectations_file)))
    return suite


def _user_expectations(file: Path) -> list[Any]:
    """Expectations in GE's JSON form: [{"type": "expect_column_values_to_match_regex", "kwargs": {...}}]."""
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    if not file.is_file():
        raise DataValidationError(f"validate.expectations_file {file} not found: create it or set it to null")
    try:
        entries = json.loads(file.read_text())
        return [ExpectationConfiguration(type=x["type"], kwargs=x.get("kwargs", {})).to_domain_obj()
                for x in entries]
    except Exception as exc:
        raise DataValidationError(f"{file} is not a JSON list of expectations like "
                                  f'[{{"type": "expect_column_values_to_be_between", "kwargs": {{"column": "age", '
                                  f'"min_value": 18}}}}]: {exc}') from exc


@dataclass
class SuiteResult:
    """What Great Expectations found in all batches."""

    row_failures: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    batch_failures: list[str] = field(default_factory=list)
    expectations: dict[str, dict[str, Any]] = field(default_factory=dict)


def frame_for_ge(typed: pd.DataFrame, schema: SchemaConfig) -> pd.DataFrame:
    """A batch's typed rows as the suite checks them: the schema's columns, categories as a pandas category.

    The category dtype gives the same results as text for in-set and not-null checks, and both the row
    rules and GE run faster on it (GE copies its input for every metric).
    """
    return typed[[ROW, *schema.columns]].astype({c: "category" for c in schema.categorical})


def frames_for_ge(typed: pd.DataFrame, batches: list[tuple[str, pd.DataFrame]], schema: SchemaConfig
                  ) -> list[tuple[str, pd.DataFrame]]:
    """`frame_for_ge` of each batch, from `typed`: the batches' typed rows one after the other."""
    sizes = [len(rows) for _, rows in batches]
    ends = np.cumsum(sizes)
    return [(name, frame_for_ge(typed.iloc[end - size : end], schema))
            for (name, _), size, end in zip(batches, sizes, ends, strict=True)]


class SuiteRun:
    """The suite over batches given one at a time (`check`), then their Data Docs (`finish`).

    The row-level expectations are evaluated once, vectorized, `chunk_rows` rows at a time
    (`pipelines.rowrules`); GE runs the rest (batch-level ones, and row-level ones with no vectorized
    equivalent) and builds the Data Docs, one page per batch in `docs_dir` when given, on both results
    together. `vectorized=False` leaves every expectation to GE: the reference the row rules must agree
    with (benchmarks/validate.py, tests/unit/test_rowrules.py).

    GE runs in two passes, because most expectations pass and listing every unexpected row is GE's
    costly part: its expectations with BASIC results (counts and a sample, as Data Docs shows them),
    then only those that found unexpected rows, with COMPLETE results that list every such row.
    `result` holds the batch-level failures and each expectation's counts over the batches checked so far.
    """

    def __init__(self, suite: list[Any], docs_dir: Path | None, chunk_rows: int = 1_000_000,
                 vectorized: bool = True) -> None:
        gx = self._gx = _gx()
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.ctx = gx.get_context(mode="ephemeral")
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.docs_dir, self.chunk_rows, self.vectorized = docs_dir, chunk_rows, vectorized
        if docs_dir is not None:
            self.ctx.add_data_docs_site(site_name=DOCS_SITE, site_config={
                "class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)}})
        self.batch_def = self.ctx.data_sources.add_pandas("amaas").add_dataframe_asset(
            "batch").add_batch_definition_whole_dataframe("whole")
        # copies: GE binds an expectation to the suite it joins, and the caller may run `suite` again
        self.full = self.ctx.suites.add(gx.ExpectationSuite(name=SUITE, expectations=[copy.copy(e) for e in suite]))
        self.result = SuiteResult()
        self.pages: list[Any] = []  # one Data Docs page per batch

    def _ge_run(self, configurations: list[Any], frame: pd.DataFrame, result_format: Any) -> Any:
        from great_expectations.validator.v1_validator import Validator

        # from configurations, which keep their ids (copies of expectations would not): results are found by id
        checked = self._gx.ExpectationSuite(name=SUITE, expectations=configurations)
        return Validator(self.batch_def, result_format, {"dataframe": frame}).validate_expectation_suite(checked)

    def check(self, name: str, rows: pd.DataFrame) -> dict[int, list[str]]:
        """Validate one batch (`frame_for_ge`); its row failures by `__row__` (but uniqueness: see _summarize)."""
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
            ValidationResultIdentifier,
        )

        failures: dict[int, list[str]] = defaultdict(list)
        expectations = self.full.expectations
        rules, by_ge = rowrules.split(expectations, rows.dtypes) if self.vectorized else ([], expectations)
        outcomes = rowrules.evaluate(rules, rows, ROW, self.chunk_rows)
        frame = _frame_for(by_ge, rows)
        checked = self._ge_run([e.configuration for e in by_ge], frame, "BASIC")
        merged = _merge(expectations, checked.results, outcomes)
        flagged = {id(res) for res in merged if _summarize(self.result, name, res)}
        listed = [res.expectation_config for res in checked.results if id(res) in flagged]
        for outcome in outcomes:
            if outcome.rule.type != UNIQUE:
                for row, value in zip(outcome.keys.tolist(), outcome.values, strict=True):
                    failures[int(row)].append(reason(outcome.rule.name, value))
        if listed:
            detail = self._ge_run(listed, frame, {"result_format": "COMPLETE", "unexpected_index_column_names": [ROW]})
            for res in detail.results:
                rule, column = _name(res.expectation_config), res.expectation_config.kwargs.get("column")
                for hit in res.result["unexpected_index_list"]:
                    failures[int(hit[ROW])].append(reason(rule, hit.get(column)))
        if self.docs_dir is not None:
            page = ValidationResultIdentifier(batch_identifier=checked.batch_id,
                                              expectation_suite_identifier=ExpectationSuiteIdentifier(SUITE),
                                              run_id=self._gx.RunIdentifier(run_name=name))
            self.ctx.validation_results_store.set(page, _suite_result(checked, merged, page.run_id))
            self.pages.append(page)
        return failures

    def finish(self) -> SuiteResult:
        """Build the Data Docs of every batch checked (once: building per batch would rebuild the whole site)."""
        from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

        if self.docs_dir is not None:
            self.ctx.build_data_docs(site_names=[DOCS_SITE],
                                     resource_identifiers=[ExpectationSuiteIdentifier(SUITE), *self.pages])
        return self.result


def run_expectations(batches: list[tuple[str, pd.DataFrame]], suite: list[Any], docs_dir: Path | None,
                     chunk_rows: int = 1_000_000, vectorized: bool = True) -> SuiteResult:
    """Validate each batch with the suite (`SuiteRun`); row failures by `__row__`, batch-level failures by name."""
    run = SuiteRun(suite, docs_dir, chunk_rows, vectorized)
    for name, rows in progress(batches, "validate", unit="batch"):
        for row, names in run.check(name, rows).items():
            run.result.row_failures[row].extend(names)
    return run.finish()


def _frame_for(expectations: list[Any], rows: pd.DataFrame) -> pd.DataFrame:
    """The columns of `rows` that GE's expectations read, as a new frame.

    GE fingerprints and copies the frame it is given (per metric), so it gets only what it reads: the
    columns its expectations name, and every column where one reads the table's columns or has a row
    condition. The new frame is consolidated: a fragmented one copies slowly.
    """
    named = {ROW}
    for expectation in expectations:
        cfg = expectation.configuration
        if cfg.kwargs.get("row_condition") or (cfg.type.startswith("expect_table_") and cfg.type not in TABLE_ROWS):
            return rows.copy()
        named.update(cfg.kwargs[k] for k in ("column", "column_A", "column_B") if k in cfg.kwargs)
        named.update(cfg.kwargs.get("column_list") or [])
    return rows[[c for c in rows.columns if c in named]].copy()


def _merge(expectations: list[Any], by_ge: list[Any], outcomes: list[rowrules.Outcome]) -> list[Any]:
    """Every expectation's result in suite order: GE's, or the row rule's in GE's form."""
    from great_expectations.core.expectation_validation_result import ExpectationValidationResult

    found = {res.expectation_config.id: res for res in by_ge}
    for outcome in outcomes:
        found[outcome.rule.expectation.id] = ExpectationValidationResult(
            success=outcome.success, expectation_config=outcome.rule.expectation.configuration,
            result=outcome.result(),
            exception_info={"raised_exception": False, "exception_traceback": None, "exception_message": None})
    return [found[e.id] for e in expectations]


def _suite_result(checked: Any, merged: list[Any], run_id: Any) -> Any:
    """GE's result for the batch (its own expectations) completed with the row rules': what Data Docs shows."""
    from great_expectations.validator.validation_statistics import calc_validation_statistics

    stats = calc_validation_statistics(merged)
    checked.results, checked.success = merged, stats.success
    checked.statistics = {"evaluated_expectations": stats.evaluated_expectations,
                          "successful_expectations": stats.successful_expectations,
                          "unsuccessful_expectations": stats.unsuccessful_expectations,
                          "success_percent": stats.success_percent}
    checked.meta.update(run_id=run_id, validation_time=run_id.run_time)
    return checked


def _name(cfg: Any) -> str:
    column = cfg.kwargs.get("column")
    return f"{cfg.type}({column})" if column else cfg.type


def _summarize(result: SuiteResult, batch: str, res: Any) -> bool:
    """Record one expectation's outcome on a batch; True if it found rows that must go to quarantine."""
    cfg, name = res.expectation_config, _name(res.expectation_config)
    unexpected: int | None = res.result.get("unexpected_count")
    seen = result.expectations.setdefault(name, {"success": True, "unexpected_count": 0})
    seen["success"] &= bool(res.success)
    seen["unexpected_count"] += unexpected or 0
    if unexpected is None:  # a batch-level expectation (row count, a column statistic): a failed batch stops
        if not res.success:
            observed = res.result.get("observed_value")
            expected = {k: v for k, v in cfg.kwargs.items() if k not in ("column", "batch_id")}
            result.batch_failures.append(f"batch {batch}: {name} failed (observed {observed}, expected {expected})")
        return False
    # every unexpected row goes, even where `mostly` lets the expectation pass; GE flags every copy of an
    # id, but amaas keeps the first copy, so uniqueness rows come from the check across batches instead
    return unexpected > 0 and cfg.type != UNIQUE


@dataclass
class _Tally:
    """What `run` keeps of the batches checked so far: counts and compact summaries, not their rows.

    What grows with the table: the quarantined rows (a bounded share: a larger one stops the pipeline) and
    the ids seen (uniqueness holds across batches). Clean rows wait in files (`clean_files`) until the
    whole table's `type_facts` are known.
    """

    rows_in: int = 0
    rows_clean: int = 0
    schema_problems: list[str] = field(default_factory=list)
    labels: set[str] = field(default_factory=set)
    ids: list[np.ndarray] = field(default_factory=list)
    duplicates: int = 0
    bad_by_batch: dict[str, list[int]] = field(default_factory=dict)  # batch name: [bad rows, rows]
    unexpected: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    quarantine: list[pd.DataFrame] = field(default_factory=list)
    facts: dict[str, bool] = field(default_factory=dict)
    clean_files: list[Path] = field(default_factory=list)


def check_batch(name: str, rows: pd.DataFrame, settings: Settings, suite: SuiteRun, tally: _Tally,
                spill: Path) -> None:
    """Validate one batch: its quarantined rows and summaries go to `tally`, its clean rows to a file in `spill`.

    Once a batch's schema is broken, later batches are only counted and their schema checked.
    """
    schema = settings.data_schema
    raw = rows.assign(batch=name)
    raw.insert(0, ROW, range(tally.rows_in, tally.rows_in + len(raw)))  # positions in the table, as GE reports them
    tally.rows_in += len(raw)
    tally.schema_problems += [f"batch {name}: {problem}" for problem in check_schema(rows, schema)]
    if tally.schema_problems:
        return
    typed, reasons = coerce_types(raw, schema, settings.clean.normalize_categories)
    if schema.is_classification:
        tally.labels.update(typed[schema.target].dropna().unique())
    for row, names in suite.check(name, frame_for_ge(typed, schema)).items():
        reasons[row].extend(names)
    if schema.id_column is not None:  # the first copy of an id in the table stays; GE flags every copy in a batch
        dupes = _repeated(typed[schema.id_column], tally.ids)
        tally.duplicates += int(dupes.sum())
        for row, value in typed.loc[dupes, [ROW, schema.id_column]].itertuples(index=False):
            reasons[int(row)].append(reason(f"{UNIQUE}({schema.id_column})", value))
    count_unexpected(reasons, tally.unexpected)
    bad = raw[ROW].isin(list(reasons)).to_numpy()
    counts = tally.bad_by_batch.setdefault(name, [0, 0])
    counts[0], counts[1] = counts[0] + int(bad.sum()), counts[1] + len(raw)
    # quarantined values as received (a value that failed to cast stays visible), with their reasons
    tally.quarantine.append(raw[bad].assign(**{REASONS: ["; ".join(sorted(set(reasons[int(r)])))
                                                          for r in raw[ROW].to_numpy()[bad]]}))
    clean = typed[~bad].drop(columns=[ROW])
    tally.facts = {k: v and tally.facts.get(k, True) for k, v in type_facts(clean, schema).items()}
    tally.rows_clean += len(clean)
    tally.clean_files.append(spill / f"{len(tally.clean_files)}.parquet")
    clean.to_parquet(tally.clean_files[-1], index=False)


def _repeated(ids: pd.Series, seen: list[np.ndarray]) -> np.ndarray:
    """Which of `ids` repeat an earlier one, in this batch or in `seen` (earlier batches'); adds the new ones to it."""
    present = ids.notna().to_numpy()
    dupes = present & ids.duplicated(keep="first").to_numpy()
    if seen:
        dupes |= present & ids.isin(np.concatenate(seen)).to_numpy()
    seen.append(ids.to_numpy()[present & ~dupes])
    return dupes


def write_clean(target: Path, files: list[Path], schema: SchemaConfig, facts: dict[str, bool]) -> None:
    """The clean rows of every batch (`files`) in one Parquet file, in `validated_types` (one batch in memory)."""
    import pyarrow as pa

    def batches() -> Iterator[pd.DataFrame]:
        return (validated_types(pd.read_parquet(file), schema, facts) for file in files)

    # the types of all batches together: a text column all missing in one batch is still text
    arrow = pa.unify_schemas([pa.Schema.from_pandas(rows, preserve_index=False) for rows in batches()],
                             promote_options="permissive")
    write_parquet_chunks(target, batches(), arrow)


@stage(
    params=("schema", "validate", "clean.normalize_categories"),
    deps=("raw", "expectations"),
    outs=(Out("validated"), Out("quarantine"), Out("validation_details", cache=False), Out("data_docs", cache=False)),
    metrics=("validation_report",),
    description="Check every collected row with Great Expectations; quarantine bad rows with their reasons",
    atomic_outs=True,  # each written to a temp file or folder and renamed: DVC need not delete them first
)
def run(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Validate every collected row; write clean rows, quarantined rows, Data Docs and reports/validation.json.

    Batch by batch: memory holds one batch (and the quarantined rows), whatever the table's size.
    """
    schema, rules = settings.data_schema, settings.validation
    entries = batch_entries(paths)
    report_file, tally = paths.validation_report, _Tally()
    with atomic_dir(paths.validated) as validated:
        spill = validated / "batches"
        spill.mkdir()
        with atomic_dir(paths.data_docs) as docs:
            suite = SuiteRun(build_suite(settings, paths), docs, rules.chunk_rows)
            for entry in progress(entries, "validate", unit="batch"):
                check_batch(entry["batch"], read_batch(paths, entry), settings, suite, tally, spill)
            if tally.schema_problems:
                _fail(report_file, tally.rows_in, "schema", tally.schema_problems)
            problems = target_problems(tally.labels, schema)
            if problems:
                _fail(report_file, tally.rows_in, "target_classes", problems)
            checked = suite.finish()
        if schema.id_column is not None:
            checked.expectations[f"{UNIQUE}({schema.id_column})"] = {"success": tally.duplicates == 0,
                                                                     "unexpected_count": tally.duplicates}
        quarantine = text_if_mixed(pd.concat(tally.quarantine, ignore_index=True))
        assert tally.rows_clean + len(quarantine) == tally.rows_in, "validate lost or duplicated rows"
        bad_share = {str(b): bad / rows for b, (bad, rows) in tally.bad_by_batch.items() if rows}
        values = top_unexpected(tally.unexpected)
        summary = {
            "status": "passed",
            "batches": len(entries),
            "rows_in": tally.rows_in,
            "rows_clean": tally.rows_clean,
            "rows_quarantined": len(quarantine),
            "bad_share": round(len(quarantine) / max(tally.rows_in, 1), 6),
            "bad_share_by_batch": bad_share,
            "expectations": checked.expectations,
            "unexpected_values": values,
            "data_docs": str(paths.data_docs / "index.html"),
            # rows a SQL source held at or below the watermark that collect never read (inserted late)
            "rows_skipped_below_watermark": int(read_json(paths.raw_manifest).get("rows_skipped_below_watermark", 0)),
        }
        if summary["rows_skipped_below_watermark"]:
            log.warning("%d source row(s) at or below the watermark were skipped by collect (see "
                        "data/raw/manifest.json)", summary["rows_skipped_below_watermark"])
        write_parquet(paths.quarantined_rows, quarantine)
        write_json(paths.validation_details, summary)
        if checked.batch_failures:
            _fail(report_file, tally.rows_in, "batch_expectations", checked.batch_failures, summary)
        over = {b: s for b, s in bad_share.items() if s > rules.max_bad_share}
        if over:
            _fail(report_file, tally.rows_in, "bad_share", [
                f"batch {b}: {s:.1%} of rows failed expectations (max {rules.max_bad_share:.1%}); "
                f"see {paths.quarantined_rows}" for b, s in over.items()
            ] + _values_lines(values), summary)
        if tally.rows_clean < rules.min_rows:
            _fail(report_file, tally.rows_in, "too_few_rows",
                  [f"{tally.rows_clean} clean rows, fewer than validate.min_rows={rules.min_rows}",
                   *_values_lines(values)], summary)
        write_clean(validated / paths.validated_rows.name, tally.clean_files, schema, tally.facts)
        shutil.rmtree(spill)
    write_json(report_file, {k: summary[k] for k in METRIC_KEYS})
    log.info("validated %d rows in %d batches: %d clean, %d quarantined", tally.rows_in, len(entries),
             tally.rows_clean, len(quarantine))
    return {k: summary[k] for k in METRIC_KEYS}


def _fail(report_file: Path, rows: int, kind: str, problems: list[str], summary: dict[str, Any] | None = None) -> None:
    write_json(report_file, {**(summary or {}), "status": "failed", "rows_in": rows, "failure": kind,
                             "problems": problems})
    raise DataValidationError(f"validation failed ({kind}), pipeline stopped before training:\n  - "
                              + "\n  - ".join(problems))
