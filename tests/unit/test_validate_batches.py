"""validate goes batch by batch (one batch in memory): what it writes equals what the whole table in one frame gave.

`whole_table` is the stage as it was before: every batch concatenated, typed, checked and split at once. Tiny
batches, with row-rule chunks smaller than a batch, and everything that spans batches: an id repeated in a later
batch, labels and types decided over the whole table, one rare class, mixed-case categories, missing values.
"""

import json
from collections import Counter, defaultdict

import pandas as pd
import pytest

from pipelines.config import ROW_KEY, Paths, load_settings
from pipelines.io import file_digest, read_json, text_if_mixed, write_json
from pipelines.stages import validate
from pipelines.stages.validate import REASONS, ROW, UNIQUE
from tests.conftest import write_params
from tests.tables import make_table, params_for

BATCHES = 4


def _batches(task: str) -> list[pd.DataFrame]:
    """make_table's rows in BATCHES batches, with bad and messy rows, one batch's numbers arriving as text."""
    table = make_table(task, 360, seed=3)
    table["ident"] = [f"r{i}" for i in range(len(table))]
    table.loc[300, "ident"] = "r10"  # repeats an id of the first batch: only a check across batches finds it
    table.loc[[20, 21], "ident"] = "r15"  # repeated inside its batch, twice
    table.loc[7, "x1"] = 99.0  # out of range
    table.loc[[95, 190], "color"] = ["purple", "PURPLE "]  # not an allowed category, in two spellings
    table.loc[130, "day"] = pd.NaT
    table.loc[250, "label"] = None
    size = len(table) // BATCHES
    batches = [table.iloc[i : i + size] for i in range(0, len(table), size)]
    text = batches[2]["x2"].map(lambda v: None if pd.isna(v) else str(v)).astype(object)  # a CSV export
    batches[2] = batches[2].assign(x2=text.where(text.index != 200, "lots"))
    return [rows.reset_index(drop=True) for rows in batches]


def _project(tmp_path, task: str, ident: bool):
    params = params_for(task, **{"validate.chunk_rows": 7, "validate.min_rows": 10, "validate.max_bad_share": 0.5,
                                 "validate.expectations_file": None})
    if ident:
        params["schema"]["id_column"] = "ident"
    settings, paths = load_settings(write_params(tmp_path, **params)), Paths(tmp_path)
    paths.raw.mkdir(parents=True)
    entries = []
    for i, rows in enumerate(_batches(task)):
        file = paths.raw / f"batch_{i}.parquet"
        (rows if ident else rows.drop(columns=["ident"])).to_parquet(file, index=False)
        entries.append({"batch": f"b{i}", "file": file.name, "rows": len(rows), "sha256": file_digest(file)})
    write_json(paths.raw_manifest, {"batches": entries})
    return settings, paths


def whole_table(settings, paths):
    """Clean rows, quarantined rows and the details as validate computed them with the whole table in one frame."""
    schema = settings.data_schema
    batches = validate.load_batches(paths)
    raw = validate.concat_batches(batches)
    raw.insert(0, ROW, range(len(raw)))
    typed, reasons = validate.coerce_types(raw, schema, settings.clean.normalize_categories)
    suite = validate.build_suite(settings, paths)
    checked = validate.run_expectations(validate.frames_for_ge(typed, batches, schema), suite, None,
                                        settings.validation.chunk_rows)
    for row, names in checked.row_failures.items():
        reasons[row].extend(names)
    if schema.id_column is not None:
        ident = schema.id_column
        dupes = typed[ident].notna() & typed.duplicated(ident, keep="first")
        for row, value in typed.loc[dupes, [ROW, ident]].itertuples(index=False):
            reasons[int(row)].append(validate.reason(f"{UNIQUE}({ident})", value))
        checked.expectations[f"{UNIQUE}({ident})"] = {"success": not dupes.any(), "unexpected_count": int(dupes.sum())}
    bad = raw[ROW].isin(list(reasons))
    quarantine = text_if_mixed(raw[bad])
    quarantine[REASONS] = ["; ".join(sorted(set(reasons[int(r)]))) for r in quarantine[ROW]]
    clean = validate.validated_types(typed[~bad.to_numpy()], schema).drop(columns=[ROW])
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    validate.count_unexpected(reasons, counts)
    shares = bad.groupby(raw["batch"], sort=False).mean()
    details = {"expectations": checked.expectations, "unexpected_values": validate.top_unexpected(counts),
               "bad_share_by_batch": {str(b): float(s) for b, s in shares.items()}}
    return clean.reset_index(drop=True), quarantine.reset_index(drop=True), details


@pytest.mark.parametrize(("task", "ident"), [("multiclass", True), ("binary", False)])
def test_batch_by_batch_equals_the_whole_table(tmp_path, task, ident):
    settings, paths = _project(tmp_path, task, ident)
    clean, quarantine, details = whole_table(settings, paths)
    summary = validate.run(settings, paths)

    pd.testing.assert_frame_equal(pd.read_parquet(paths.validated_rows), clean)
    pd.testing.assert_frame_equal(pd.read_parquet(paths.quarantined_rows), quarantine)
    written = read_json(paths.validation_details)
    assert {k: written[k] for k in details} == json.loads(json.dumps(details))  # tuples as lists
    assert summary["rows_in"] == 360 == summary["rows_clean"] + summary["rows_quarantined"]
    assert [p.name for p in paths.validated.iterdir()] == ["data.parquet"]  # the batches' clean rows are gone
    # the cases that span batches were there to be found
    reasons = quarantine.set_index(ROW)[REASONS]
    assert "expect_column_values_to_be_in_set(color): 'purple'" in reasons[190]
    assert "expect_column_values_to_be_of_type(x2): 'lots'" in reasons[200]
    if ident:
        assert "expect_column_values_to_be_unique(ident): 'r10'" in reasons[300] and 10 not in reasons.index
        assert details["expectations"]["expect_column_values_to_be_unique(ident)"]["unexpected_count"] == 3
    else:
        assert clean[ROW_KEY].is_unique
