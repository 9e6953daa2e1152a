"""`amaas init`: infer params.yaml from a sample of the user's table, and check new data against it.

Like TFX's SchemaGen: statistics of a bounded sample give each column a role (id, time, target, numeric,
categorical, or free text that is left out), numeric ranges widened by a stated margin, nullability where
nulls occur, category lists as the data spells them, and the task from the target. Every inferred line of
the written params.yaml carries a comment saying what was seen, and the review printed after it names
what is uncertain. `check` compares the newest collected batch with the schema in params.yaml and lists
what validation would quarantine (new categories, values out of range, new nulls) before it does.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pandas.api import types

from pipelines.config import Paths, Settings
from pipelines.transform import normalize_value

TEMPLATE = Path(__file__).resolve().parent.parent / "params.yaml"  # the shipped settings: defaults for the rest
MAX_CATEGORIES = 50  # more distinct values than this (or than half the rows) is free text, left out
REGRESSION_MIN_VALUES = 20  # a numeric target with more distinct values than this is a regression target
_ID_NAME = re.compile(r"(^|_)(id|uuid|key)$|^id_")
_TIME_NAME = re.compile(r"time|date|year|day|^ts$|_ts$|timestamp|epoch|month")
_WILDCARD = re.compile(r"[*?\[]")


class InitError(ValueError):
    """The table cannot be described as asked; the message says what to change."""


@dataclass
class Inferred:
    """What inference found: the schema, sized defaults, and a sentence per guess."""

    schema: dict[str, Any]
    comments: dict[str, str] = field(default_factory=dict)  # schema key (e.g. "numeric.age") -> what was seen
    review: list[str] = field(default_factory=list)  # what is uncertain or left out, in words
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted params keys sized for the table


# --- reading a bounded sample -----------------------------------------------------------------------------

def files_source(where: str, root: Path) -> tuple[dict[str, Any], Path, str]:
    """source.files settings for a folder or a glob (relative ones from the project root), and the folder and
    pattern to read now."""
    path = Path(where)
    if _WILDCARD.search(where):
        parts = path.parts
        first = next(i for i, p in enumerate(parts) if _WILDCARD.search(p))
        folder, pattern = Path(*parts[:first]) if first else Path("."), str(Path(*parts[first:]))
    else:
        folder, pattern = path, ""
    folder = folder if folder.is_absolute() else root / folder  # as params.yaml reads it: from the project root
    if not folder.is_dir():
        raise InitError(f"{folder} is not a folder: give a drop folder or a glob such as data/drop/*.csv")
    if not pattern:
        kinds = {p.suffix.lower() for p in folder.iterdir() if p.suffix.lower() in (".csv", ".parquet")}
        if len(kinds) != 1:
            raise InitError(f"{folder} holds {sorted(kinds) or 'no .csv or .parquet files'}: give a glob that "
                            f"picks one kind, e.g. {folder}/*.csv")
        pattern = f"*{kinds.pop()}"
    try:
        shown = str(folder.resolve().relative_to(root.resolve()))
    except ValueError:
        shown = str(folder.resolve())
    return {"path": shown, "pattern": pattern}, folder, pattern


def read_files_sample(folder: Path, pattern: str, rows: int) -> pd.DataFrame:
    """Up to `rows` rows from the files of `folder` matching `pattern`, oldest name first, streamed."""
    import pyarrow.parquet as pq

    frames, left = [], rows
    for file in sorted(p for p in folder.glob(pattern) if p.is_file()):
        if left <= 0:
            break
        if file.suffix.lower() == ".csv":
            frame = pd.read_csv(file, nrows=left)
        elif file.suffix.lower() in (".parquet", ".pq"):
            batches = []
            for batch in pq.ParquetFile(file).iter_batches(batch_size=min(left, 65_536)):
                batches.append(batch.to_pandas())
                if sum(map(len, batches)) >= left:
                    break
            frame = pd.concat(batches, ignore_index=True).head(left) if batches else pd.DataFrame()
        else:
            continue
        frames.append(frame)
        left -= len(frame)
    if not frames:
        raise InitError(f"no {pattern} files with rows in {folder}")
    return pd.concat(frames, ignore_index=True)


def url_without_password(url: str) -> str:
    """The URL to keep in params.yaml (in git): a password stays out; $AMAAS_SOURCE_URL carries the full URL."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return parsed._replace(password=None).render_as_string(hide_password=False) if parsed.password else url


def read_sql_sample(url: str, table: str, rows: int, root: Path) -> pd.DataFrame:
    """Up to `rows` rows of `table` (a bounded SELECT, never the whole table)."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() == "sqlite" and database and not Path(database).is_absolute():
        parsed = parsed.set(database=str(root / database))
    engine = sa.create_engine(parsed)
    try:
        with engine.connect() as conn:
            try:
                source = sa.Table(table, sa.MetaData(), autoload_with=conn)
            except sa.exc.NoSuchTableError:
                raise InitError(f"table {table!r} not found in {url}") from None
            return pd.read_sql(sa.select(source).limit(rows), conn)
    finally:
        engine.dispose()


# --- inference ------------------------------------------------------------------------------------------

def _seen(values: pd.Series) -> str:
    nulls = values.isna().mean()
    return f"{values.nunique(dropna=True)} distinct" + (f", {nulls:.0%} null" if nulls else ", no nulls")


def _round(value: float) -> float | int:
    """A bound readable in YAML: 4 significant digits, an integer where it is one."""
    if value == 0 or not math.isfinite(value):
        return 0
    rounded = float(f"{value:.4g}")
    return int(rounded) if rounded.is_integer() and abs(rounded) < 1e15 else rounded


def infer_task(target: pd.Series, asked: str) -> str:
    values = target.dropna()
    distinct = values.nunique()
    if distinct < 2:
        raise InitError(f"target {target.name!r} has {distinct} distinct value(s) in the sample: nothing to learn")
    numeric = types.is_numeric_dtype(values) and not types.is_bool_dtype(values)
    fractional = numeric and not np.allclose(values, np.round(values))  # measurements, not class codes
    inferred = ("regression" if numeric and (distinct > REGRESSION_MIN_VALUES or fractional)
                else "binary" if distinct == 2 else "multiclass")
    if asked != "auto":
        if asked == "binary" and distinct != 2:
            raise InitError(f"--task binary, but target {target.name!r} has {distinct} values; use --task "
                            f"{inferred}")
        if asked == "regression" and not numeric:
            raise InitError(f"--task regression, but target {target.name!r} is not numeric")
        return asked
    return inferred


def _time_kind(values: pd.Series, name: str) -> tuple[str | None, str] | None:
    """(time_unit, what was seen) if the column holds times, else None."""
    present = values.dropna()
    if present.empty:
        return None
    if types.is_datetime64_any_dtype(values):
        return None, "timestamps"
    if types.is_numeric_dtype(values) and not types.is_bool_dtype(values) and _TIME_NAME.search(name.lower()):
        if not np.allclose(present, np.round(present)):
            return None
        low, high = float(present.min()), float(present.max())
        if low >= 1800 and high <= 2200:
            return None, f"integer years {int(low)}-{int(high)}: an ordinal watermark, not a timestamp"
        for unit, (lo, hi) in {"s": (1e9, 1e10), "ms": (1e12, 1e13)}.items():
            if lo <= low and high < hi:
                return unit, f"integers that read as epoch {unit} ({pd.Timestamp(int(low), unit=unit).date()} to " \
                             f"{pd.Timestamp(int(high), unit=unit).date()})"
        return None, f"increasing integers {int(low)}-{int(high)}: an ordinal watermark"
    if types.is_object_dtype(values) and present.astype(str).str.contains(r"\d[-/:]\d").mean() > 0.95:
        parsed = pd.to_datetime(present, errors="coerce", format="mixed")
        if parsed.notna().mean() > 0.95:
            return None, "text timestamps"
    return None


def _is_id(values: pd.Series, name: str) -> bool:
    return bool(_ID_NAME.search(name.lower()) and values.notna().all() and values.is_unique and (
        types.is_integer_dtype(values) or types.is_object_dtype(values)))


_FRACTION_NAME = re.compile(r"rate|ratio|share|fraction|frac|prob|pct|percent")


def numeric_rule(name: str, present: pd.Series, margin: float = 0.0) -> tuple[dict[str, Any], str]:
    """The schema rule of a numeric column from its non-null sample values, and what was seen.

    Hard bounds only where the data shows one (an impossible value beyond it): never negative -> min 0; every
    value in [0, 1] with a fraction-like name or a non-integer -> [0, 1]. The reference range is the sample's
    range (widened by `margin` of the span on each side): values outside it are served and reported as drift.
    """
    low, high = float(present.min()), float(present.max())
    span = high - low or max(abs(high), 1.0)
    rule: dict[str, Any] = {}
    said = f"seen {_round(low)} to {_round(high)}"
    fraction = low >= 0 and high <= 1 and (bool(_FRACTION_NAME.search(name.lower()))
                                           or not np.allclose(present, np.round(present)))
    if fraction:
        rule |= {"min": 0, "max": 1}
        said += "; a fraction: hard bounds [0, 1]"
    elif low >= 0:
        rule["min"] = 0
        said += "; never negative: hard min 0"
    reference = [_round_out(low - margin * span, down=True), _round_out(high + margin * span, down=False)]
    if "min" in rule:
        reference[0] = max(reference[0], rule["min"])
    if "max" in rule:
        reference[1] = min(reference[1], rule["max"])
    rule["reference"] = reference
    if margin:
        said += f"; reference widened by {margin:.0%} of the span"
    return rule, said


def _round_out(value: float, down: bool) -> float | int:
    """`value` to 4 significant digits, rounded away from the range's inside so that the sample stays in it."""
    rounded = _round(value)
    if (down and rounded > value) or (not down and rounded < value):
        step = 10 ** (math.floor(math.log10(abs(value))) - 3) if value else 0
        rounded = _round(rounded - step if down else rounded + step)
    return rounded


def infer_schema(sample: pd.DataFrame, target: str, task: str = "auto", margin: float = 0.0) -> Inferred:
    """The schema of `sample` with `target` as the label, and a sentence for every guess."""
    if target not in sample.columns:
        raise InitError(f"no column {target!r} in the table; its columns: {', '.join(map(str, sample.columns))}")
    n = len(sample)
    asked, task = task, infer_task(sample[target], task)
    schema: dict[str, Any] = {"task": task, "id_column": None, "time_column": None, "time_unit": None,
                              "target": target, "classes": None, "numeric": {}, "categorical": {}}
    out = Inferred(schema)
    labels = sample[target].dropna()
    shown = "" if task == "regression" else " (" + ", ".join(map(str, sorted(labels.unique(), key=str)[:10])) + ")"
    out.comments["task"] = f"target {target!r}: {labels.nunique()} distinct values{shown}"
    out.review.insert(0, task_reason(sample[target], task, asked))
    out.comments["target"] = _seen(sample[target])
    times = [(c, kind) for c in sample.columns if c != target and (kind := _time_kind(sample[c], str(c)))]
    times.sort(key=lambda ck: (not _TIME_NAME.search(str(ck[0]).lower()), str(ck[0])))
    if times:
        column, (unit, seen) = times[0]
        schema["time_column"], schema["time_unit"] = column, unit
        out.comments["time_column"] = seen
        if unit is None and "ordinal" in seen:
            out.review.append(f"`{column}` looks like a time column with {seen}")
        for other, _ in times[1:]:
            out.review.append(f"`{other}` also looks like a time; it is left out (set schema.time_column to "
                              f"prefer it)")
    ids = [c for c in sample.columns if c not in (target, schema["time_column"]) and _is_id(sample[c], str(c))]
    if ids:
        schema["id_column"] = ids[0]
        out.comments["id_column"] = f"unique and never null in {n} rows"
    else:
        out.comments["id_column"] = "no unique id-named column: a hash of each row identifies it"
    roles = {target, schema["time_column"], *ids}
    for column in sample.columns:
        if column in roles:
            if column in ids[1:]:
                out.review.append(f"`{column}` is a second unique id column; it is left out")
            continue
        values = sample[column]
        name = str(column)
        if types.is_bool_dtype(values) or not (types.is_numeric_dtype(values) or types.is_datetime64_any_dtype(values)):
            spelled = values.dropna().map(str)
            distinct = spelled.map(normalize_value).nunique()
            if distinct > MAX_CATEGORIES or (n >= 20 and distinct > n / 2):
                out.review.append(f"`{name}` looks like free text ({distinct} distinct values in {n} rows); it is "
                                  f"left out of the model")
                continue
            first = spelled.groupby(spelled.map(normalize_value)).first()  # one spelling per category
            rule: dict[str, Any] = {"values": sorted(first.tolist(), key=str)}
            if values.isna().any():
                rule["nullable"] = True
            schema["categorical"][name] = rule
            out.comments[f"categorical.{name}"] = _seen(values)
        elif types.is_numeric_dtype(values):
            present = values.dropna().astype("float64")
            if present.empty:
                out.review.append(f"`{name}` is empty in the sample; it is left out")
                continue
            schema["numeric"][name], out.comments[f"numeric.{name}"] = numeric_rule(name, present, margin)
            if values.isna().any():
                schema["numeric"][name]["nullable"] = True
            out.comments[f"numeric.{name}"] = f"{_seen(values)}, {out.comments[f'numeric.{name}']}"
        else:
            out.review.append(f"`{name}` ({values.dtype}) is left out")
    if not schema["numeric"] and not schema["categorical"]:
        raise InitError("no feature columns left after the id, time and target: nothing to learn from")
    _size_defaults(out, sample)
    return out


def _size_defaults(out: Inferred, sample: pd.DataFrame) -> None:
    """The settings that depend on the table's size and task, sized for the sample."""
    n, schema = len(sample), out.schema
    small = [c for c, r in schema["categorical"].items() if len(r["values"]) <= 10]
    out.overrides = {
        "validate.min_rows": max(10, min(100, n // 5)),
        "prepare.split": "time" if schema["time_column"] else "random",
        "promote.metric": {"binary": "roc_auc", "multiclass": "f1_macro", "regression": "rmse"}[schema["task"]],
        "evaluate.slices": small[:3],
        "report.reference_rows": max(100, min(20_000, n)),
        "report.min_labeled_rows": max(10, min(200, n // 10)),
        "train.lightgbm.min_child_samples": max(5, min(20, n // 50)),
        "source.split_by_day": bool(schema["time_column"]) and (
            schema["time_unit"] is not None or types.is_datetime64_any_dtype(sample[schema["time_column"]])
            or types.is_object_dtype(sample[schema["time_column"]])),
    }


# --- writing params.yaml --------------------------------------------------------------------------------

def params_text(inferred: Inferred, source: dict[str, Any], described: str, template: Path = TEMPLATE,
                expectations: bool = False) -> str:
    """params.yaml: the shipped defaults, the source, the inferred schema with a comment per inferred line,
    and the sized settings."""
    params = yaml.safe_load(template.read_text())
    params["source"] = {**params["source"], **source}
    params["validate"]["expectations_file"] = "expectations/extra.json" if expectations else None
    for dotted, value in inferred.overrides.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    lines = [f"# Written by `amaas init` from {described}. Review the schema: each inferred line says what",
             "# the sample showed. Every setting is documented in the shipped params.yaml and the README."]
    for key, value in params.items():
        if key == "schema":
            lines += _schema_lines(inferred)
        else:
            lines.append(yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False).rstrip())
    return "\n".join(lines) + "\n"


def _schema_lines(inferred: Inferred) -> list[str]:
    schema, notes = inferred.schema, inferred.comments

    def line(indent: int, key: str, value: Any, note: str | None) -> str:
        text = f"{' ' * indent}{key}: {json.dumps(value)}"
        return f"{text}  # {note}" if note else text

    lines = ["schema:"]
    for key in ("task", "id_column", "time_column", "time_unit", "target", "classes"):
        lines.append(line(2, key, schema[key], notes.get(key)))
    lines.append("  numeric:" + ("" if schema["numeric"] else " {}"))
    for name, rule in schema["numeric"].items():
        lines.append(line(4, json.dumps(name), rule, notes.get(f"numeric.{name}")))
    lines.append("  categorical:" + ("" if schema["categorical"] else " {}"))
    for name, rule in schema["categorical"].items():
        value = rule if rule.get("nullable") else rule["values"]
        lines.append(line(4, json.dumps(name), value, notes.get(f"categorical.{name}")))
    return lines


# --- checking new data against params.yaml --------------------------------------------------------------

def check(settings: Settings, paths: Paths) -> dict[str, Any]:
    """What validation would quarantine in the newest collected batch, and why, before it does.

    It runs validation's own checks (the same suite, casts and cross-batch id check, over every collected batch
    in order, as `amaas validate` does) and lists the newest batch's quarantined rows with their reasons (`row`:
    the position in that batch), and the schema problems that would stop the pipeline.
    """
    import tempfile

    from pipelines.stages import validate

    entries = validate.batch_entries(paths)
    suite = validate.SuiteRun(validate.build_suite(settings, paths), None, settings.validation.chunk_rows)
    tally = validate._Tally()
    with tempfile.TemporaryDirectory() as spill:
        for entry in entries:
            start = tally.rows_in
            rows = validate.read_batch(paths, entry)
            validate.check_batch(entry["batch"], rows, settings, suite, tally, Path(spill))
    newest = entries[-1]
    quarantined = [q for q in tally.quarantine if len(q)]
    found = pd.concat(quarantined, ignore_index=True) if quarantined else pd.DataFrame(columns=[validate.ROW])
    mine = found[found[validate.ROW] >= start] if len(found) else found
    listed = [{"row": int(r) - start, "reasons": str(why)}
              for r, why in zip(mine[validate.ROW], mine.get(validate.REASONS, []), strict=True)]
    counts: dict[str, int] = {}
    for item in listed:
        for why in str(item["reasons"]).split("; "):
            name = why.partition(": ")[0]
            counts[name] = counts.get(name, 0) + 1
    problems = [*tally.schema_problems, *[f"{name}: {n} row(s) would be quarantined" for name, n in counts.items()]]
    return {"batch": newest["batch"], "rows": len(rows), "problems": problems, "quarantined": listed}


def task_reason(target: pd.Series, task: str, asked: str) -> str:
    """Why the task is what it is, and the `--task` switch that changes it (init prints it in its review)."""
    values = target.dropna()
    distinct = values.nunique()
    numeric = types.is_numeric_dtype(values) and not types.is_bool_dtype(values)
    if asked != "auto":
        why = "as asked with --task"
    elif task == "regression":
        why = (f"numbers with {distinct} distinct values" + ("" if distinct > REGRESSION_MIN_VALUES else
                                                             ", not whole numbers"))
    else:
        kind = "whole numbers" if numeric else "labels"
        why = f"{distinct} distinct {kind} (at most {REGRESSION_MIN_VALUES} whole numbers are classes)"
    other = ("regression" if task != "regression" and numeric else "multiclass" if task == "regression"
             else "binary" if task == "multiclass" and distinct == 2 else None)
    switch = f"; if that is wrong, rerun with `--task {other}`" if other else ""
    return f"task {task} for target {target.name!r}: {why}{switch}"
