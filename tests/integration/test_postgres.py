"""The SQL source against a real PostgreSQL server: incremental collect through the CLI, then validate."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import sqlalchemy as sa

from pipelines.config import load_settings
from pipelines.io import read_json
from pipelines.sources import SOURCE_URL_ENV
from pipelines.sources.simulator import generate_batch
from tests.conftest import amaas, write_params

pytestmark = pytest.mark.slow


def test_incremental_collect_from_postgres_then_validate(tmp_path, postgres_url):
    params = write_params(tmp_path, **{"source.kind": "sql", "source.sql.url": "postgresql+psycopg://nobody@nowhere/x",
                                       "source.sql.schema": "public", "source.sql.table": "loan_events"})
    cfg = load_settings(params).source.simulator
    days = [generate_batch(cfg, 3, i) for i in range(3)]
    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS loan_events"))
    days[0].to_sql("loan_events", engine, index=False)
    days[1].iloc[:500].to_sql("loan_events", engine, index=False, if_exists="append")
    env = {**os.environ, SOURCE_URL_ENV: postgres_url}  # the URL from the environment, not from params

    first = amaas("collect", root=tmp_path, env=env)
    assert json.loads(first.stdout)["collect"]["new_rows"] == 1500
    # the rest of day 2 and all of day 3 arrive later
    pd.concat([days[1].iloc[500:], days[2]]).to_sql("loan_events", engine, index=False, if_exists="append")
    second = json.loads(amaas("collect", root=tmp_path, env=env).stdout)["collect"]
    assert second["new_rows"] == 1500 and second["batches"] == 4

    manifest = read_json(tmp_path / "data" / "raw" / "manifest.json")
    assert [b["batch"] for b in manifest["batches"]] == ["2026-01-01", "2026-01-02", "2026-01-02.2", "2026-01-03"]
    collected = pd.concat([pd.read_parquet(tmp_path / "data" / "raw" / b["file"]) for b in manifest["batches"]])
    expected = pd.concat(days)
    assert sorted(collected["loan_id"]) == sorted(expected["loan_id"])  # none twice, none skipped
    # PostgreSQL keeps microseconds: compare the times at that precision
    assert (collected["event_time"].sort_values().to_numpy()
            == expected["event_time"].dt.floor("us").sort_values().to_numpy()).all()

    rerun = json.loads(amaas("collect", "--rerun", "2026-01-02.2", root=tmp_path, env=env).stdout)["collect"]
    assert rerun == {"batch": "2026-01-02.2", "rows": 500, "identical": True, "restored": False}

    validated = json.loads(amaas("validate", root=tmp_path, env=env).stdout)["validate"]
    assert validated["rows_in"] == 3000 == validated["rows_clean"] + validated["rows_quarantined"]

    wrong = amaas("collect", root=tmp_path, check=False, env={**env, SOURCE_URL_ENV: postgres_url + "_missing"})
    assert wrong.returncode == 2 and "check source.sql in params.yaml" in wrong.stderr
