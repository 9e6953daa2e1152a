"""Progress of long work: bars on a terminal, a few plain log lines without one (Airflow, CI, a test)."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pandas as pd
import pytest

from pipelines import progress as progress_module
from pipelines.config import Paths, load_settings
from pipelines.models import Ensemble, LightGBMLearner, MLPLearner
from pipelines.progress import bars_enabled, progress
from pipelines.stages import collect, validate
from tests.conftest import write_params

BAR = ("\r", "█", "it/s", "epoch/s", "batch/s", "s/epoch", "s/batch")  # what a tqdm bar writes


def _frame(n: int = 300) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(n, 3)), columns=["a", "b", "c"])
    return X, (X["a"] + X["b"] > 0).astype(int).to_numpy()


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipelines.progress"]


@pytest.mark.parametrize(("setting", "tty", "bars"), [("", True, True), ("", False, False), ("0", True, False),
                                                      ("1", False, True), ("0", False, False)])
def test_bars_follow_the_terminal_unless_amaas_progress_says(setting, tty, bars, monkeypatch):
    monkeypatch.setenv(progress_module.ENV, setting)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    assert bars_enabled() is bars


def test_amaas_progress_0_logs_lines_even_on_a_terminal(monkeypatch, capsys, caplog):
    monkeypatch.setenv(progress_module.ENV, "0")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with caplog.at_level(logging.INFO, logger="pipelines.progress"):
        assert list(progress(range(3), "work", unit="step")) == [0, 1, 2]
    assert _messages(caplog)[0] == "work: started (3 step)" and _messages(caplog)[-1].startswith("work: done, 3 step")
    assert capsys.readouterr().err == ""


def test_without_a_terminal_validate_logs_lines_and_draws_no_bar(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.delenv(progress_module.ENV, raising=False)
    assert not sys.stderr.isatty()  # pytest's captured stderr, like Airflow's or CI's
    settings, paths = load_settings(write_params(tmp_path, **{"source.simulator.n_batches": 2})), Paths(tmp_path)
    collect.run(settings, paths)
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="pipelines.progress"):
        validate.run(settings, paths)
    assert _messages(caplog)[0] == "validate: started (2 batch)"
    assert _messages(caplog)[-1].startswith("validate: done, 2 batch in ")
    err = capsys.readouterr().err
    assert not [mark for mark in BAR if mark in err], err


def test_without_a_terminal_a_fit_logs_each_learner_and_the_epochs(monkeypatch, capsys, caplog):
    monkeypatch.delenv(progress_module.ENV, raising=False)
    X, y = _frame()
    learners = [LightGBMLearner(n_estimators=5), MLPLearner(epochs=3, patience=10)]
    with caplog.at_level(logging.INFO, logger="pipelines.progress"):
        Ensemble(learners, "blending").fit(X[:200], y[:200], X[200:], y[200:])
    messages = _messages(caplog)
    assert messages[0] == "ensemble blending: started (2 learner)"
    assert "mlp training: started (3 epoch)" in messages and any(m.startswith("mlp training: done, 3 epoch")
                                                                  for m in messages)
    assert messages[-1].startswith("ensemble blending: done, 2 learner")
    err = capsys.readouterr().err
    assert not [mark for mark in BAR if mark in err], err


def test_an_early_stop_is_logged_where_it_stopped(monkeypatch, caplog):
    monkeypatch.delenv(progress_module.ENV, raising=False)
    X, y = _frame()
    noise = np.random.default_rng(1).integers(0, 2, 100)  # validation labels it cannot learn: it stops early
    with caplog.at_level(logging.INFO, logger="pipelines.progress"):
        MLPLearner(epochs=200, patience=1).fit(X[:200], y[:200], X[200:], noise)
    last = _messages(caplog)[-1]
    assert last.startswith("mlp training: stopped at epoch ") and "/200 in " in last, last


def test_amaas_progress_1_draws_a_bar(monkeypatch, capsys, caplog):
    monkeypatch.setenv(progress_module.ENV, "1")
    X, y = _frame()
    with caplog.at_level(logging.INFO, logger="pipelines.progress"):
        MLPLearner(epochs=3).fit(X, y)
    err = capsys.readouterr().err
    assert "mlp training:" in err and "/3 [" in err and "epoch/s" in err and "\r" in err, err
    assert not _messages(caplog)  # a bar instead of the log lines


def test_scoring_knows_its_chunk_count_from_a_parquet_footer(tmp_path):
    from pipelines.score import chunk_count, read_chunks

    pd.DataFrame({"a": range(1000)}).to_parquet(tmp_path / "in.parquet", row_group_size=300)
    assert chunk_count(tmp_path / "in.parquet", 250) == len(list(read_chunks(tmp_path / "in.parquet", 250))) == 4
    assert chunk_count(tmp_path / "in.parquet", 300) == 4 and chunk_count(tmp_path / "in.parquet", 1000) == 1
    pd.DataFrame({"a": range(10)}).to_csv(tmp_path / "in.csv", index=False)
    assert chunk_count(tmp_path / "in.csv", 4) is None  # a CSV is not counted before it is read: the bar has no end
