"""Tables users bring, not the simulator: `dvc repro` end to end on each task, a real `amaas serve` that
answers what offline scoring answers, and strict JSON in every report.

- multiclass: ~300 rows with string labels and a rare class, mixed-case and nullable categories, no id
  column, as a CSV drop folder (two files);
- regression: ~500 rows in a SQLite table with an integer time column (ordinal seconds) and an integer id;
- binary: ~600 rows with yes/no labels and string ids, Parquet files, the label cut-off picked on the
  validation rows (evaluate.threshold: auto).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines.bundle import ModelBundle
from pipelines.registry import Registry
from tests.conftest import dvc_project, run_tool, served
from tests.tables import make_table, params_for

pytestmark = pytest.mark.slow


def _strict(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _declared_outputs(root: Path) -> list[Path]:
    """Every output, metric and plot file dvc.yaml's stages declare."""
    files = []
    for stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                files.append(root / (next(iter(entry)) if isinstance(entry, dict) else entry))
    return files


def _multiclass(root: Path) -> dict[str, Any]:
    table = make_table("multiclass", 300, seed=11)
    drop = root / "data" / "drop"
    drop.mkdir(parents=True)
    days = table["day"].dt.strftime("%Y-%m-%d")
    for day in sorted(days.unique()):
        table[days == day].to_csv(drop / f"export_{day}.csv", index=False)
    # the newest day has ~100 labelled rows, fewer than report.min_labeled_rows: the performance page says so
    return params_for("multiclass", **{"source.kind": "files", "source.files.pattern": "*.csv",
                                       "source.files.path": "data/drop", "report.min_labeled_rows": 200})


def _regression(root: Path) -> dict[str, Any]:
    table = make_table("regression", 500, seed=12)
    table.insert(0, "reading_id", np.arange(1, len(table) + 1))
    table["day"] = (table["day"] - pd.Timestamp("2026-01-01")).dt.total_seconds().astype("int64")  # ordinal
    (root / "data").mkdir(parents=True)
    with sqlite3.connect(root / "data" / "source.db") as conn:
        table.to_sql("readings", conn, index=False)
    params = params_for("regression", **{"source.kind": "sql", "source.sql.table": "readings",
                                         "source.split_by_day": False})
    params["schema"]["id_column"] = "reading_id"
    return params


def _binary(root: Path) -> dict[str, Any]:
    table = make_table("binary", 600, seed=13)
    table.insert(0, "customer", [f"c-{i:05d}" for i in range(len(table))])
    drop = root / "data" / "drop"
    drop.mkdir(parents=True)
    table.to_parquet(drop / "customers.parquet", index=False)
    params = params_for("binary", **{"source.kind": "files", "source.files.path": "data/drop",
                                     "evaluate.threshold": "auto"})
    params["schema"]["id_column"] = "customer"
    return params


TABLES = {"multiclass": _multiclass, "regression": _regression, "binary": _binary}


@pytest.mark.parametrize("task", list(TABLES))
def test_a_users_table_runs_end_to_end_and_serves_what_it_scores(task, tmp_path):
    dvc_project(tmp_path)
    params = TABLES[task](tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    repro = run_tool(["dvc", "repro"], tmp_path, timeout=900)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    missing = [str(p.relative_to(tmp_path)) for p in _declared_outputs(tmp_path) if not p.exists()]
    assert not missing, f"declared by dvc.yaml but not written: {missing}"
    for file in [*(tmp_path / "reports").rglob("*.json"), *(tmp_path / "models").rglob("*.json")]:
        _strict(file.read_text())  # no NaN or Infinity anywhere

    if task == "multiclass":
        assert "not enough labelled rows" in (tmp_path / "reports" / "performance.html").read_text()
    metrics = _strict((tmp_path / "reports" / "metrics.json").read_text())
    metric = params["promote"]["metric"]
    assert metrics["task"] == task and metrics[metric] is not None
    registry = Registry(tmp_path / "models" / "registry")
    assert registry.champion is not None, _strict((tmp_path / "reports" / "promotion.json").read_text())
    champion = ModelBundle.load(registry.version_dir(registry.champion))
    test = pd.read_parquet(tmp_path / "data" / "reference" / "test.parquet")
    if task == "multiclass":
        assert champion.classes == ["extreme", "high", "low", "mid"]
        assert set(metrics["per_class"]) == set(champion.classes)  # the rare class is in the test rows too
        assert metrics["f1_macro"] > 0.4
    elif task == "regression":
        assert metrics["r2"] > 0.5
    else:
        assert champion.classes == ["no", "yes"] and metrics["roc_auc"] > 0.75
        assert champion.metadata["threshold_choice"]["criterion"] == "f1"

    features = champion.transform.numeric + champion.transform.categorical
    rows = test[features].head(40)
    payload = {"rows": [{k: (None if pd.isna(v) else v) for k, v in r.items()} for r in rows.to_dict("records")]}
    with served(tmp_path) as server:
        response = server.session.post(f"{server.url}/predict", json=payload, timeout=30)
        docs = server.session.get(f"{server.url}/docs.json", timeout=30).json()
    assert response.status_code == 200, response.text
    served_answers = response.json()
    offline = champion.answers(rows)
    assert len(served_answers) == len(offline)
    for got, want in zip(served_answers, offline, strict=True):
        assert got["model_version"] == champion.version
        if task == "regression":
            assert got["value"] == pytest.approx(want["value"], rel=1e-9, abs=1e-9)
        else:
            assert got["label"] == want["label"]  # spelled as in the data: "mid", "yes"
            assert got["probabilities"] == pytest.approx(want["probabilities"], rel=1e-9, abs=1e-12)
    row_schema = docs["components"]["schemas"]["Row"]["properties"]  # /docs shows what the gateway enforces
    assert set(features) <= set(row_schema)
    post = docs["paths"]["/predict"]["post"]
    reference = post["responses"]["200"]["content"]["application/json"]["schema"]["items"]["$ref"]
    answer = docs["components"]["schemas"][reference.rsplit("/", 1)[1]]["properties"]
    assert ("value" if task == "regression" else "probabilities") in answer
