"""`amaas init --check` is validation: it lists exactly the rows, and the reasons, that validation quarantines."""

from __future__ import annotations

import pandas as pd

from pipelines.config import Paths, load_settings
from pipelines.io import file_digest, text_if_mixed, write_json
from pipelines.schema_inference import check
from pipelines.stages import validate
from tests.conftest import write_params
from tests.tables import params_for
from tests.unit.test_validate_batches import _batches


def test_init_check_lists_the_rows_and_reasons_validation_quarantines(tmp_path):
    params = params_for("multiclass", **{"validate.min_rows": 10, "validate.max_bad_share": 0.5,
                                         "validate.expectations_file": None})
    params["schema"]["id_column"] = "ident"
    settings, paths = load_settings(write_params(tmp_path, **params)), Paths(tmp_path)
    paths.raw.mkdir(parents=True)
    entries = []
    # the first rows in a batch of their own (an id repeated in a later batch); then one batch with every kind
    # of defect: text in a number column, a null target, a null time, a value beyond a hard bound, an unknown
    # category in two spellings, an id twice in the batch and one from the earlier batch
    batches = _batches("multiclass")
    defects = pd.concat([batches[0].iloc[15:], *batches[1:]], ignore_index=True)
    defects.loc[3, "x1"] = 50.0  # beyond the hard max 20
    for i, rows in enumerate([batches[0].iloc[:15], defects]):
        file = paths.raw / f"batch_{i}.parquet"
        text_if_mixed(rows.reset_index(drop=True)).to_parquet(file, index=False)  # numbers and text: a CSV
        entries.append({"batch": f"b{i}", "file": file.name, "rows": len(rows), "sha256": file_digest(file)})
    write_json(paths.raw_manifest, {"batches": entries})

    found = check(settings, paths)
    validate.run(settings, paths)
    quarantine = pd.read_parquet(paths.quarantined_rows)
    newest = quarantine[quarantine["batch"] == "b1"]
    expected = {int(r) - 15: why for r, why in zip(newest[validate.ROW], newest[validate.REASONS], strict=True)}
    assert {q["row"]: q["reasons"] for q in found["quarantined"]} == expected
    kinds = " ".join(expected.values())
    for kind in ("expect_column_values_to_be_of_type(x2): 'lots'", "expect_column_values_to_not_be_null(label)",
                 "expect_column_values_to_not_be_null(day)", "expect_column_values_to_be_between(x1)",
                 "expect_column_values_to_be_in_set(color)", "expect_column_values_to_be_unique(ident): 'r10'"):
        assert kind in kinds, kind
    assert any(p.startswith("expect_column_values_to_be_in_set(color): 2 row(s)") for p in found["problems"])
