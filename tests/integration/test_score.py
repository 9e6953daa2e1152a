"""`amaas score`: chunked batch scoring, in process and on a Dask LocalCluster, equals in-memory scoring."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipelines.bundle import ModelBundle
from pipelines.config import load_settings
from pipelines.registry import Registry
from pipelines.sources.simulator import generate_batch
from tests.conftest import amaas

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def champion(trained_project):
    registry = Registry(trained_project / "models" / "registry")
    return ModelBundle.load(registry.version_dir(registry.champion))


def _table(trained_project, rows: int, name: str) -> pd.DataFrame:
    cfg = load_settings(trained_project / "params.yaml").source.simulator
    days = -(-rows // 250_000)
    df = pd.concat([generate_batch(cfg.model_copy(update={"rows_per_batch": rows // days}), 11, i)
                    for i in range(days)], ignore_index=True)
    df.to_parquet(trained_project / name, row_group_size=50_000)
    return df


def test_chunked_scoring_of_1m_rows_equals_in_memory(trained_project, champion):
    table = _table(trained_project, 1_000_000, "big.parquet")
    out = trained_project / "scores.parquet"
    summary = json.loads(amaas("score", str(trained_project / "big.parquet"), str(out),
                               root=trained_project).stdout)["score"]
    assert summary["rows"] == 1_000_000 and summary["chunks"] == 10 and summary["ran_on"] == "this process"
    scored = pd.read_parquet(out)
    assert list(scored.columns) == ["loan_id", "label", "probability", "proba_0", "proba_1", "model_version"]
    np.testing.assert_array_equal(scored["loan_id"], table["loan_id"])  # input order kept
    # the MLP runs in float32: a row's result moves in the 10th digit with the rows batched beside it
    np.testing.assert_allclose(scored["probability"], champion.predict(table)[:, 1], rtol=1e-9, atol=1e-12)
    assert (scored["model_version"] == champion.version).all()


def test_dask_local_cluster_scoring_equals_in_memory(trained_project, champion, tmp_path):
    table = _table(trained_project, 120_000, "mid.parquet")
    table.drop(columns=["loan_id"]).to_csv(tmp_path / "mid.csv", index=False)
    settings = trained_project / "params.yaml"
    small_chunks = tmp_path / "params.yaml"
    params = load_settings(settings).model_dump(mode="json", by_alias=True)
    params["scale"]["score_chunk_rows"] = 25_000
    small_chunks.write_text(json.dumps(params))  # JSON is YAML
    out = tmp_path / "scores.parquet"
    proc = amaas("--params", str(small_chunks), "score", str(tmp_path / "mid.csv"), str(out), "--workers", "2",
                 root=trained_project)
    summary = json.loads(proc.stdout)["score"]
    assert summary["ran_on"].startswith("dask tcp://127.0.0.1:") and summary["ran_on"].endswith("(2 workers)")
    assert summary["chunks"] == 5
    scored = pd.read_parquet(out)
    assert "loan_id" not in scored.columns  # no id in the input, none invented
    np.testing.assert_allclose(scored["probability"], champion.predict(table)[:, 1], rtol=1e-9, atol=1e-12)


def test_score_errors_are_clear(trained_project, tmp_path):
    missing = amaas("score", str(tmp_path / "nope.parquet"), str(tmp_path / "o.parquet"), root=trained_project,
                    check=False)
    assert missing.returncode == 2 and "nope.parquet not found" in missing.stderr
    (tmp_path / "x.txt").write_text("a")
    wrong = amaas("score", str(tmp_path / "x.txt"), str(tmp_path / "o.parquet"), root=trained_project, check=False)
    assert wrong.returncode == 2 and "must be a .parquet or .csv file" in wrong.stderr
    assert not (tmp_path / "o.parquet").exists()
