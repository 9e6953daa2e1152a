"""collect: every source reads incrementally; no row read twice or skipped; reruns give the same batch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from pipelines.config import Paths, load_settings
from pipelines.io import read_json
from pipelines.sources import SourceError, open_source
from pipelines.stages import collect
from tests.conftest import write_params

KEY = ["loan_id", "event_time"]


def _settings(root, **overrides):
    return load_settings(write_params(root, **overrides)), Paths(root)


def _collected(paths: Paths) -> pd.DataFrame:
    manifest = read_json(paths.raw / "manifest.json")
    return pd.concat([pd.read_parquet(paths.raw / b["file"]) for b in manifest["batches"]], ignore_index=True)


def test_simulator_is_incremental_and_loses_nothing(tmp_path):
    settings, paths = _settings(tmp_path, **{"source.simulator.n_batches": 2})
    first = collect.run(settings, paths)
    assert first["new_batches"] == 2 and first["new_rows"] == 2000
    again = collect.run(settings, paths)  # nothing new: no batch, no change
    assert again["new_rows"] == 0 and again["batches"] == 2

    settings, _ = _settings(tmp_path, **{"source.simulator.n_batches": 4})  # two more days arrive
    later = collect.run(settings, paths)
    assert later["new_batches"] == 2 and later["new_rows"] == 2000
    manifest = read_json(paths.raw / "manifest.json")
    assert [b["batch"] for b in manifest["batches"]] == ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]
    assert all(a["high"] == b["low"] for a, b in zip(manifest["batches"], manifest["batches"][1:], strict=False))

    # incrementally collected == everything read at once: no row twice, none skipped
    everything, _ = open_source(settings, paths).read(None, None)
    pd.testing.assert_frame_equal(_collected(paths)[KEY], everything[KEY])


def test_rerun_gives_the_same_batch_and_restores_a_damaged_file(tmp_path):
    settings, paths = _settings(tmp_path)
    collect.run(settings, paths)
    file = paths.raw / "batch_2026-01-02.parquet"
    before = file.read_bytes()
    assert collect.run(settings, paths, rerun="2026-01-02") == {"batch": "2026-01-02", "rows": 1000,
                                                                 "identical": True, "restored": False}
    file.write_bytes(before[:200])  # truncated on disk
    assert collect.run(settings, paths, rerun="2026-01-02")["restored"] is True
    assert file.read_bytes() == before
    with pytest.raises(SourceError, match="no collected batch 'nope'"):
        collect.run(settings, paths, rerun="nope")
    changed, _ = _settings(tmp_path, **{"source.simulator.drift_start_batch": 0})  # the source now differs
    entry_before = read_json(paths.raw / "manifest.json")["batches"][1]
    replaced = collect.run(changed, paths, rerun="2026-01-02")  # the batch takes the source's current rows
    assert replaced["identical"] is False and replaced["rows"] == 1000
    assert replaced["rows_added"] == replaced["rows_removed"] == 1000  # drift changed every row of the day
    assert file.read_bytes() != before
    entry = read_json(paths.raw / "manifest.json")["batches"][1]
    assert entry["sha256"] != entry_before["sha256"] and entry["high"] == entry_before["high"]
    (record,) = entry["reruns"]
    assert record["previous_sha256"] == entry_before["sha256"] and record["previous_rows"] == 1000
    assert record["rows_added"] == 1000 and "at" in record
    assert collect.run(changed, paths, rerun="2026-01-02")["identical"]  # and now it is the collected batch


def test_changing_the_watermark_column_is_refused(tmp_path):
    settings, paths = _settings(tmp_path)
    collect.run(settings, paths)
    other, _ = _settings(tmp_path, **{"source.watermark_column": "loan_id"})
    with pytest.raises(SourceError, match="watermark column 'event_time'"):
        collect.run(other, paths)


@pytest.fixture
def rows(tmp_path_factory) -> pd.DataFrame:
    """Three days of source rows, as a database table or a drop folder would hold them."""
    from pipelines.sources.simulator import generate_batch

    cfg = load_settings(write_params(tmp_path_factory.mktemp("params"))).source.simulator
    return pd.concat([generate_batch(cfg, 7, i) for i in range(3)], ignore_index=True)


def test_files_source_reads_new_rows_of_csv_and_parquet(tmp_path, rows):
    drop = tmp_path / "data" / "drop"
    drop.mkdir(parents=True)
    day1, day2, day3 = (rows.iloc[i * 1000:(i + 1) * 1000] for i in range(3))
    day1.to_csv(drop / "a.csv", index=False)
    day2.to_parquet(drop / "b.parquet", index=False)
    settings, paths = _settings(tmp_path, **{"source.kind": "files", "source.files.pattern": "*.*"})
    first = collect.run(settings, paths)
    assert first["new_rows"] == 2000 and first["new_batches"] == 2

    late = day3.copy()
    late.loc[late.index[:5], "event_time"] = None  # no watermark: reported, not silently dropped
    late.to_csv(drop / "c.csv", index=False)
    second = collect.run(settings, paths)
    assert second["new_rows"] == 995 and second["rows_without_watermark"] == 5
    assert collect.run(settings, paths)["new_rows"] == 0  # the old files are read again but give nothing new
    expected = pd.concat([day1, day2, late.dropna(subset=["event_time"])])
    assert sorted(_collected(paths)["loan_id"]) == sorted(expected["loan_id"])  # none twice, none skipped
    assert read_json(paths.raw / "manifest.json")["source"] == "files(data/drop/*.*)"


def test_files_source_errors_name_the_file_and_the_fix(tmp_path, rows):
    drop = tmp_path / "data" / "drop"
    drop.mkdir(parents=True)
    settings, paths = _settings(tmp_path, **{"source.kind": "files", "source.files.pattern": "*.parquet"})
    rows.iloc[:10].to_parquet(drop / "a.parquet", index=False)
    rows.iloc[10:20].drop(columns=["region"]).to_parquet(drop / "b.parquet", index=False)
    with pytest.raises(SourceError, match="b.parquet has columns"):
        collect.run(settings, paths)
    (drop / "b.parquet").write_bytes((drop / "a.parquet").read_bytes()[:50])
    with pytest.raises(SourceError, match="cannot read .*b.parquet.*fix or remove the file"):
        collect.run(settings, paths)
    missing, _ = _settings(tmp_path, **{"source.kind": "files", "source.files.path": "nowhere"})
    with pytest.raises(SourceError, match="drop folder .*nowhere not found"):
        collect.run(missing, paths)


def test_sql_source_sqlite_with_id_watermark(tmp_path, rows, caplog):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'data' / 'source.db'}")
    (tmp_path / "data").mkdir()
    rows.iloc[:1500].to_sql("loans", engine, index=False)
    settings, paths = _settings(tmp_path, **{"source.kind": "sql", "source.watermark_column": "loan_id"})
    first = collect.run(settings, paths)
    assert first["new_rows"] == 1500 and first["new_batches"] == 1  # an id watermark: one batch per run
    rows.iloc[1500:].to_sql("loans", engine, index=False, if_exists="append")
    second = collect.run(settings, paths)
    assert second["new_rows"] == 1500
    got = _collected(paths)
    assert sorted(got["loan_id"]) == sorted(rows["loan_id"])  # appended rows: none twice, none skipped
    assert collect.run(settings, paths, rerun="000001")["identical"]
    assert "rows_skipped_below_watermark" not in read_json(paths.raw_manifest)

    late = rows.iloc[[0, 1]].assign(loan_id=rows["loan_id"].min() - np.array([1, 2]))  # ids below the watermark
    late.to_sql("loans", engine, index=False, if_exists="append")
    with caplog.at_level("WARNING", logger="pipelines.stages.collect"):
        assert collect.run(settings, paths)["new_rows"] == 0
    assert read_json(paths.raw_manifest)["rows_skipped_below_watermark"] == 2
    assert "2 row(s) of sql(" in caplog.text and "were not collected" in caplog.text

    bad, _ = _settings(tmp_path, **{"source.kind": "sql", "source.watermark_column": "loan_id",
                                    "source.sql.table": "nope"})
    with pytest.raises(SourceError, match="table not found"):
        collect.run(bad, paths)
