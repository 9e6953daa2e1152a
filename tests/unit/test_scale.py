"""The pipeline at scale, on tiny data: seeded, stratified samples (train.max_rows, prepare.fit_rows,
report.max_rows) that keep every class; null keeps every row; the simulator's extra feature columns; chunked
reads and writes give the outputs of whole ones."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines.config import Paths, load_settings
from pipelines.sampling import sample_index, training_rows
from pipelines.sources import Watermarks, row_hash
from pipelines.sources.simulator import EXTRA_BOUND, SimulatorSource, extra_schema, generate_batch
from pipelines.stages import collect, prepare
from pipelines.stages.prepare import duplicates_of, fit_positions, write_parquet_chunks
from pipelines.stages.report import judged_sample
from tests.conftest import small_params
from tests.tables import make_table, params_for

RARE = 3  # rows of the rare class


def _labels(n: int = 2000) -> np.ndarray:
    y = np.zeros(n, dtype=int)
    y[: n // 4] = 1
    y[np.random.default_rng(0).choice(n, RARE, replace=False)] = 2
    return y


def test_sample_is_seeded_stratified_and_keeps_a_rare_class():
    y = _labels()
    index = sample_index(y, 200, seed=42, stratify=True)
    assert index is not None and np.array_equal(index, np.sort(np.unique(index)))  # sorted positions, no repeats
    assert np.array_equal(index, sample_index(y, 200, seed=42, stratify=True))
    assert not np.array_equal(index, sample_index(y, 200, seed=7, stratify=True))
    picked = np.bincount(y[index], minlength=3)
    assert picked[2] >= 1  # 3 of 2,000 rows: proportionally 0.3, kept all the same
    assert abs(len(index) - 200) <= 2 and abs(picked[1] / len(index) - 0.25) < 0.02


def test_no_limit_or_a_small_table_keeps_every_row():
    y = _labels(500)
    assert sample_index(y, None, seed=42, stratify=True) is None
    assert sample_index(y, 500, seed=42, stratify=True) is None
    assert len(sample_index(y.astype(float), 100, seed=42, stratify=False)) == 100  # regression: plain sample


def test_training_rows_read_group_by_group_are_the_sampled_rows(tmp_path):
    y = _labels(1000)
    frame = pd.DataFrame({"a": np.arange(1000, dtype=float), "b": np.arange(1000) % 7, "label": y})
    file = tmp_path / "train.parquet"
    write_parquet_chunks(file, (frame.iloc[i:i + 130] for i in range(0, 1000, 130)))  # 8 row groups
    sample, total = training_rows(file, "label", 100, seed=1, stratify=True)
    index = sample_index(y, 100, seed=1, stratify=True)
    assert total == 1000
    pd.testing.assert_frame_equal(sample, frame.iloc[index].reset_index(drop=True))
    whole, _ = training_rows(file, "label", None, seed=1, stratify=True)
    pd.testing.assert_frame_equal(whole, frame)


def test_fit_sample_keeps_every_category_and_class(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_for("multiclass")))
    schema = load_settings(tmp_path / "params.yaml").data_schema
    table = make_table("multiclass", 600, seed=3)
    table.loc[599, "color"] = "Purple "  # one row of a category
    chosen = fit_positions(table, schema, 40, seed=42)
    assert 40 <= len(chosen) < 60 and (np.diff(chosen) > 0).all()
    sample = table.iloc[chosen]
    for column in ("color", "size", "label"):
        assert set(sample[column].dropna()) == set(table[column].dropna()), column
    assert chosen.tolist() == fit_positions(table, schema, 40, seed=42).tolist()
    assert fit_positions(table, schema, None, seed=42) is None and fit_positions(table, schema, 600, seed=42) is None


def test_judged_sample_is_seeded_and_null_keeps_all():
    rows = pd.DataFrame({"a": np.arange(1000)})
    assert judged_sample(rows, None, 42) is rows
    sample = judged_sample(rows, 100, 42)
    assert len(sample) == 100 and sample["a"].is_monotonic_increasing and sample["a"].is_unique
    pd.testing.assert_frame_equal(sample, judged_sample(rows, 100, 42))


def test_simulator_extra_features_leave_the_real_columns_as_they_were(tmp_path):
    params = small_params(**{"source.simulator.rows_per_batch": 300})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_settings(tmp_path / "params.yaml").source.simulator
    plain = generate_batch(cfg, 42, 1)
    wide = generate_batch(cfg.model_copy(update={"extra_features": 17}), 42, 1)
    extra = [f"extra_{k}" for k in range(17)]
    assert list(wide.columns) == [*plain.columns[:-1], *extra, plain.columns[-1]]  # the target stays last
    pd.testing.assert_frame_equal(wide[plain.columns], plain)
    values = wide[extra]
    assert values.notna().all().all() and (values.abs() <= EXTRA_BOUND).all().all()
    assert values.std().gt(0.5).all() and values["extra_0"].corr(wide["age"]) > 0.5  # noisy, derived
    pd.testing.assert_frame_equal(wide, generate_batch(cfg.model_copy(update={"extra_features": 17}), 42, 1))
    # the schema that lists them loads, and their rules hold the values
    params["schema"]["numeric"] |= extra_schema(17)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert set(extra) <= set(load_settings(tmp_path / "params.yaml").data_schema.numeric)


def test_collect_writes_day_by_day_the_rows_one_read_gives(tmp_path):
    params = small_params(**{"source.simulator.rows_per_batch": 200, "source.simulator.extra_features": 2})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    settings, paths = load_settings(tmp_path / "params.yaml"), Paths(tmp_path)
    source = SimulatorSource(settings.source.simulator, settings.seed, Watermarks("event_time", "loan_id", True))
    everything, _ = source.read(None, None)
    summary = collect.run(settings, paths)
    assert summary["new_batches"] == 3 and summary["rows"] == len(everything)
    written = pd.concat([pd.read_parquet(f) for f in sorted(paths.raw.glob("batch_*.parquet"))], ignore_index=True)
    pd.testing.assert_frame_equal(written, everything)


def test_duplicates_are_the_rows_the_canonical_hash_finds():
    table = make_table("multiclass", 400, seed=5)
    seen, rows = table.iloc[:300], pd.concat([table.iloc[300:], table.iloc[[3, 50, 299]]], ignore_index=True)
    columns = ["x1", "x2", "color", "size", "label"]
    before = np.isin(row_hash(rows[columns]), row_hash(seen[columns]))  # how prepare found them before
    found = duplicates_of(rows, seen, columns)
    assert found.tolist() == before.tolist() and found.sum() == 3


@pytest.mark.parametrize("task", ["multiclass", "regression"])
def test_prepare_in_chunks_writes_what_it_wrote_whole(tmp_path, task):
    table = make_table(task, 400, seed=2)
    table["_row_key"] = np.arange(len(table))
    outputs = {}
    for chunk in (1_000_000, 37):
        root = tmp_path / str(chunk)
        (root / "data" / "validated").mkdir(parents=True)
        (root / "params.yaml").write_text(yaml.safe_dump(params_for(task, **{"scale.score_chunk_rows": chunk})))
        paths = Paths(root)
        table.to_parquet(paths.validated_rows)
        prepare.run(load_settings(root / "params.yaml"), paths)
        outputs[chunk] = {f"{d.name}/{f.name}": pd.read_parquet(f) for d in (paths.features, paths.reference)
                          for f in sorted(d.glob("*.parquet"))}
        assert (paths.features / paths.fitted_transform.name).is_file()
    assert outputs[37].keys() == outputs[1_000_000].keys() and len(outputs[37]) == 8  # recent.parquet too
    for name, frame in outputs[1_000_000].items():
        pd.testing.assert_frame_equal(outputs[37][name], frame, obj=name)
