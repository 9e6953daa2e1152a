"""`amaas init` on tables the tests build: params.yaml inferred from a CSV folder and from a SQLite table,
then `dvc repro` with no hand edits, a real `amaas serve`, and `init --check` on a later batch."""

from __future__ import annotations

import json
import sqlite3

import pandas as pd
import pytest
import yaml

from pipelines.bundle import ModelBundle
from pipelines.registry import Registry
from tests.conftest import amaas, dvc_project, run_tool, served
from tests.tables import make_survey

pytestmark = pytest.mark.slow


def test_init_from_a_csv_folder_then_dvc_repro_serve_and_check(tmp_path):
    dvc_project(tmp_path)
    drop = tmp_path / "data" / "drop"
    drop.mkdir(parents=True)
    table = make_survey(400, seed=1)
    table[table["year"] < 2021].to_csv(drop / "survey_a.csv", index=False)
    table[table["year"] >= 2021].to_csv(drop / "survey_b.csv", index=False)

    init = amaas("init", "--source", "files", "data/drop", "--target", "grade", root=tmp_path)
    assert "integer years 2019-2022" in init.stdout and "`comment` looks like free text" in init.stdout
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    schema = params["schema"]
    assert (schema["task"], schema["id_column"], schema["time_column"], schema["time_unit"]) == (
        "multiclass", "customer_id", "year", None)
    assert set(schema["numeric"]) == {"income", "age"} and schema["numeric"]["income"]["nullable"]
    assert set(schema["categorical"]) == {"region", "member"} and "comment" not in schema["categorical"]
    assert params["source"]["files"] == {"path": "data/drop", "pattern": "*.csv"}
    again = amaas("init", "--source", "files", "data/drop", "--target", "grade", root=tmp_path, check=False)
    assert again.returncode == 2 and "--force" in again.stderr  # never overwrites silently

    repro = run_tool(["dvc", "repro"], tmp_path, timeout=900)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    registry = Registry(tmp_path / "models" / "registry")
    champion = ModelBundle.load(registry.version_dir(registry.champion))
    assert champion.classes == ["high", "low", "mid"]
    rows = table[champion.transform.numeric + champion.transform.categorical].tail(20)
    payload = {"rows": [{k: (None if pd.isna(v) else v) for k, v in r.items()} for r in rows.to_dict("records")]}
    with served(tmp_path) as server:
        answered = server.session.post(f"{server.url}/predict", json=payload, timeout=30)
    assert answered.status_code == 200, answered.text
    assert [a["label"] for a in answered.json()] == [a["label"] for a in champion.answers(rows)]

    # a later export: a new region, an unusual age and an impossible one; --check names what validation would quarantine
    later = make_survey(100, seed=2, first_year=2023, years=1)
    later.loc[0, "region"], later.loc[1, "age"], later.loc[2, "age"] = "Central", 250, -5
    later.to_csv(drop / "survey_c.csv", index=False)
    amaas("collect", root=tmp_path)
    checked = amaas("init", "--check", root=tmp_path, check=False)
    assert checked.returncode == 1, checked.stderr
    found = json.loads(checked.stdout)  # validation's own rules: the rows it would quarantine, and why
    reasons = {q["row"]: q["reasons"] for q in found["quarantined"]}
    assert "expect_column_values_to_be_in_set(region): 'central'" in reasons[0], found
    assert 1 not in reasons  # age 250 leaves the reference range only: validated, served, monitored as drift
    assert "expect_column_values_to_be_between(age): -5" in reasons[2], found  # below the hard min 0


def test_init_from_a_sqlite_table_then_dvc_repro(tmp_path):
    dvc_project(tmp_path)
    (tmp_path / "data").mkdir()
    with sqlite3.connect(tmp_path / "data" / "source.db") as conn:
        make_survey(400, seed=3).to_sql("survey", conn, index=False)

    amaas("init", "--source", "sql", "sqlite:///data/source.db", "--table", "survey", "--target", "grade",
          root=tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert params["source"]["kind"] == "sql" and params["source"]["sql"]["table"] == "survey"
    assert params["schema"]["time_column"] == "year" and params["promote"]["metric"] == "f1_macro"
    repro = run_tool(["dvc", "repro"], tmp_path, timeout=900)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    assert Registry(tmp_path / "models" / "registry").champion is not None
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["task"] == "multiclass" and metrics["f1_macro"] > 0.4
