"""prepare splits from the key columns and moves rows in chunks: it writes the splits the whole sorted table gave.

`whole_table_splits` is the split as it was before, on the whole table sorted in memory. The table is stored
out of time order, with repeated rows, one rare class, mixed-case categories and missing values; prepare reads
it in chunks smaller than any split.
"""

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines.config import ROW_KEY, Paths, load_settings
from pipelines.stages import prepare
from pipelines.transform import FeatureTransform, label_key
from tests.tables import make_table, params_for


def whole_table_splits(df, schema, how, valid_share, test_share, seed):
    """prepare.split_rows as it was: the whole table sorted, shuffled and cut."""
    rows = df.sort_values([schema.time_column, schema.key_column], kind="mergesort").reset_index(drop=True)
    part = np.repeat([0, 1, 2], prepare._counts(len(rows), valid_share, test_share))
    if how == "random":
        rows = rows.iloc[np.random.default_rng(seed).permutation(len(rows))].reset_index(drop=True)
    keys = rows[schema.target].map(label_key)
    for label in keys.value_counts().index:
        mine = np.flatnonzero((keys == label).to_numpy())
        have = np.bincount(part[mine], minlength=3).tolist()
        want = prepare._counts(len(mine), valid_share, test_share) if how == "random" else have
        part[mine] = np.repeat([0, 1, 2], prepare._every_split(want))
    return {name: rows[part == i].reset_index(drop=True) for i, name in enumerate(prepare.SPLITS)}


@pytest.mark.parametrize("how", ["time", "random"])
@pytest.mark.parametrize("repeated", [False, True])
def test_prepare_writes_the_splits_of_the_whole_sorted_table(tmp_path, how, repeated):
    table = make_table("multiclass", 300, seed=5)
    table[ROW_KEY] = np.arange(len(table)) * 7919 % 1000  # a key that is not the stored order
    table.loc[[40, 41], "day"] = table.loc[39, "day"]  # equal times: the key decides
    if repeated:  # copies of rows, later: they join their originals' split, none is dropped
        repeats = table.iloc[[5, 6, 250]].assign(day=table["day"].max(), **{ROW_KEY: [2001, 2002, 2003]})
        table = pd.concat([table, repeats], ignore_index=True)
    table = table.sample(frac=1, random_state=1).reset_index(drop=True)  # stored out of time order
    params = params_for("multiclass", **{"prepare.split": how, "scale.score_chunk_rows": 23})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    settings, paths = load_settings(tmp_path / "params.yaml"), Paths(tmp_path)
    paths.validated.mkdir(parents=True)
    table.to_parquet(paths.validated_rows, row_group_size=50)
    summary = prepare.run(settings, paths)

    schema = settings.data_schema
    columns = [*schema.feature_columns, schema.target]
    # without copies the split is the plain one of the whole sorted table; with them, the grouped one
    splits = (prepare.split_rows(table, schema, how, 0.15, 0.15, settings.seed) if repeated
              else whole_table_splits(table, schema, how, 0.15, 0.15, settings.seed))
    assert sum(len(rows) for rows in splits.values()) == len(table)  # none dropped
    assert summary["duplicate_rows"] == (3 if repeated else 0)
    for name in ("valid", "test"):
        assert summary[f"{name}_duplicates_of_train"] == 0
        assert not prepare.duplicates_of(splits[name], splits["train"], columns).any()
    if repeated:
        originals = [k for k in table[ROW_KEY] if k >= 2001]
        assert len(originals) == 3
        for name, rows in splits.items():  # each copy is in its original's split
            keys = set(rows[ROW_KEY])
            for copy, original in zip((2001, 2002, 2003), np.arange(1000)[[5, 6, 250]] * 7919 % 1000, strict=True):
                assert (copy in keys) == (original in keys), name
    transform = FeatureTransform.fit(splits["train"], schema, settings.clean)
    for name, rows in splits.items():
        pd.testing.assert_frame_equal(pd.read_parquet(paths.split_rows(name)), rows, obj=name)
        features = transform.transform(rows)
        features[schema.target] = transform.encode_target(rows[schema.target])
        pd.testing.assert_frame_equal(pd.read_parquet(paths.split_features(name)), features, obj=name)
        assert set(rows["label"]) == {"low", "mid", "high", "extreme"}
    # monitoring's references are rows as drawn, copies included: the plain split's training rows and test rows
    drawn = whole_table_splits(table, schema, how, 0.15, 0.15, settings.seed)
    sample = drawn["train"].sample(n=min(settings.report.reference_rows, len(drawn["train"])),
                                   random_state=settings.seed).sort_index().reset_index(drop=True)
    pd.testing.assert_frame_equal(pd.read_parquet(paths.train_sample), sample)
    pd.testing.assert_frame_equal(pd.read_parquet(paths.recent_rows), drawn["test"])


def test_many_copies_stay_together_and_a_class_of_copies_is_still_split(tmp_path):
    table = make_table("multiclass", 300, seed=3)
    table = pd.concat([table, table.sample(200, replace=True, random_state=2)], ignore_index=True)  # 40% copies
    twin = table[table["label"] == "extreme"].iloc[[0]]
    table = pd.concat([table[table["label"] != "extreme"], twin, twin, twin, twin], ignore_index=True)
    table[ROW_KEY] = np.arange(len(table))
    params = params_for("multiclass")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    schema = load_settings(tmp_path / "params.yaml").data_schema
    splits = prepare.split_rows(table, schema, "random", 0.15, 0.15, 0)
    columns = [*schema.feature_columns, schema.target]
    assert sum(map(len, splits.values())) == len(table)
    for name in ("valid", "test"):  # only the class made of one row repeated must be split row by row
        dupes = prepare.duplicates_of(splits[name], splits["train"], columns)
        assert set(splits[name].loc[dupes, "label"]) == {"extreme"}, name
        assert 0.10 < len(splits[name]) / len(table) < 0.20, name  # groups move whole, the shares hold


def test_a_split_left_empty_stops_with_the_counts_and_the_fix(tmp_path):
    """Hardening II, item 12: a tiny table (or one of copies) left valid or test empty, and train failed later with
    an unclear LightGBM message."""
    from pipelines.stages.prepare import SplitError

    table = make_table("regression", 3, seed=1)
    table = pd.concat([table] * 10, ignore_index=True)  # 30 rows, 3 distinct
    table[ROW_KEY] = np.arange(len(table))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_for("regression")))
    schema = load_settings(tmp_path / "params.yaml").data_schema
    with pytest.raises(SplitError, match=r"split would be empty: 30 rows, 3 of them distinct.*collect more rows"):
        prepare.split_rows(table, schema, "random", 0.15, 0.15, 0)
