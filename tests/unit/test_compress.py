"""Compression: a student distilled from the ensemble, pruned; an int8 MLP; the gate that picks what serves;
the cost of every stage and the promotion limits on latency and cost."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipelines.bundle import ModelBundle
from pipelines.cli import main
from pipelines.compression import augmented_rows, choose, distill, measure, prune
from pipelines.config import Paths, load_settings
from pipelines.io import read_json
from pipelines.metrics import improvement, score
from pipelines.models import Ensemble, Learner, LightGBMLearner, MLPLearner
from pipelines.runner import STAGES, run_stage
from pipelines.stages import compress, promote
from pipelines.transform import FeatureTransform
from tests.conftest import write_params

SCHEMAS = {
    "binary": {"task": "binary", "target": "bought", "classes": ["no", "Yes"], "metric": "roc_auc"},
    "multiclass": {"task": "multiclass", "target": "grade", "metric": "f1_macro"},
    "regression": {"task": "regression", "target": "price", "metric": "r2"},
}


def _table(n: int, seed: int = 0) -> pd.DataFrame:
    """A small user table: mixed-case categories, missing values, a rare class; three kinds of target."""
    rng = np.random.default_rng(seed)
    size = rng.uniform(1, 100, n)
    weight = np.where(rng.random(n) < 0.1, np.nan, rng.normal(50, 10, n))
    region = rng.choice(["North", "SOUTH", "  east ", "South"], n)
    south = np.char.lower(np.char.strip(region.astype(str))) == "south"
    signal = size / 25 + 1.5 * south + np.nan_to_num(weight - 50) / 10 + rng.normal(0, 0.7, n)
    return pd.DataFrame({
        "size": size, "weight": weight, "region": region,
        "colour": np.where(rng.random(n) < 0.15, None, rng.choice(["Red", "blue"], n)),
        "bought": np.where(signal > 2.6, "Yes", "no"),
        "grade": np.where(signal > 5.2, "Mid", np.where(signal > 2.4, "High", "low")),  # Mid is rare
        "price": 3 * signal + rng.normal(0, 0.5, n),
    })


def _settings(root: Path, task: str, **overrides: Any) -> Any:
    spec = SCHEMAS[task]
    schema = {"task": task, "target": spec["target"], "id_column": None, "time_column": None,
              "classes": spec.get("classes"),
              "numeric": {"size": {"min": 0, "max": 100}, "weight": {"min": 0, "max": 200, "nullable": True}},
              "categorical": {"region": ["North", "South", "East"], "colour": {"values": ["Red", "Blue"],
                                                                               "nullable": True}}}
    return load_settings(write_params(root, **{"source.kind": "files", "schema": schema, "evaluate.slices": [],
                                               "prepare.split": "random", "promote.metric": spec["metric"],
                                               **overrides}))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Any]:
    """Per task, once for the module: the table's splits as features and labels, its transform, and an ensemble
    trained on them (the teacher both kinds of student learn from)."""
    @functools.cache
    def teacher(task: str) -> Any:
        settings = _settings(tmp_path_factory.mktemp(task), task)
        target = settings.data_schema.target
        table = _table(900)
        parts = {"train": table.iloc[:500], "valid": table.iloc[500:650], "test": table.iloc[650:]}
        transform = FeatureTransform.fit(parts["train"], settings.data_schema, settings.clean)
        X = {name: transform.transform(rows) for name, rows in parts.items()}
        y = {name: transform.encode_target(rows[target]) for name, rows in parts.items()}
        common = {"categorical": transform.cardinalities, "task": task, "n_classes": len(transform.classes or ()),
                  "random_state": 0}
        ensemble = Ensemble([LightGBMLearner(**common, n_estimators=200), MLPLearner(**common, epochs=20)],
                            "blending").fit(X["train"], y["train"], X["valid"], y["valid"])
        return X, y, transform, ensemble

    return teacher


@pytest.mark.parametrize("kind", ["lightgbm", "mlp"])
@pytest.mark.parametrize("task", list(SCHEMAS))
def test_student_beats_a_constant_and_stays_within_the_loss_on_a_small_table(task, kind, teachers, tmp_path):
    settings = _settings(tmp_path, task, **{"compress.student.kind": kind, "compress.max_metric_loss": 0.03})
    cfg, metric = settings.compress, settings.promote.metric
    X, y, transform, teacher = teachers(task)

    from pipelines.compression import build_student

    student = build_student(cfg, transform, seed=0, threads=1)
    assert student.kind == kind
    made = distill(cfg, teacher, student, X["train"], X["valid"], seed=0)
    assert made["augmented_rows"] == 500 and made["rows"] == 1000
    if kind == "lightgbm":
        student, curve = prune(student, X["valid"], y["valid"], metric, 0.5, cfg.prune_tolerance)
        assert student.n_trees_ <= curve[-1]["trees"] and student.n_trees_ in [p["trees"] for p in curve]

    ens_value = score(metric, y["test"], teacher.predict_output(X["test"]))
    student_value = score(metric, y["test"], student.predict_output(X["test"]))
    if task == "regression":
        constant = np.full(len(y["test"]), y["train"].mean())
    else:
        prior = np.bincount(y["train"], minlength=len(transform.classes)) / len(y["train"])
        constant = np.tile(prior, (len(y["test"]), 1))
    assert improvement(metric, student_value, score(metric, y["test"], constant)) > 0.1, (student_value,)
    assert -improvement(metric, student_value, ens_value) <= cfg.max_metric_loss, (student_value, ens_value)


def test_augmented_rows_keep_each_column_with_its_missing_flag():
    X = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0], "a_missing": [1.0, 0.0, 0.0, 0.0], "c": [1, 2, 3, 4]})
    rows = augmented_rows(X, factor=50, swap_share=0.5, seed=0)
    assert len(rows) == 200 and list(rows.columns) == list(X.columns) and rows["c"].dtype == X["c"].dtype
    assert set(map(tuple, rows[["a", "a_missing"]].to_numpy())) <= set(map(tuple, X[["a", "a_missing"]].to_numpy()))
    assert len(set(map(tuple, rows.to_numpy()))) > len(X)  # new combinations, not only copies
    assert augmented_rows(X, 0, 0.5, 0).empty


def test_int8_mlp_saves_loads_and_predicts_the_same(tmp_path):
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(400, 5)), columns=list("abcde"))
    y = (X["a"] + X["b"] > 0).astype(int).to_numpy()
    mlp = MLPLearner(epochs=5).fit(X, y)
    int8 = mlp.quantized()
    assert int8.int8 and not mlp.int8  # the original is untouched
    int8.save(tmp_path / "m")
    loaded = Learner.load(tmp_path / "m")
    assert isinstance(loaded, MLPLearner) and loaded.int8
    np.testing.assert_array_equal(loaded.predict_proba(X), int8.predict_proba(X))
    assert np.abs(int8.predict_proba(X) - mlp.predict_proba(X)).max() < 0.1


def _figures(**cpu_ms: float) -> dict[str, dict[str, Any]]:
    """Candidates' figures as choose reads them: the given single-row CPU medians, equal metrics, the student
    smallest on disk."""
    size = {"ensemble": 400, "quantized": 300, "student": 100}
    return {name: {"roc_auc": 0.8, "cpu_ms_p50": ms, "model_latency_ms_p50": ms, "disk_bytes": size[name]}
            for name, ms in cpu_ms.items()}


@pytest.mark.parametrize(("student", "quantized", "served", "tied"), [
    (2.0, 4.0, "student", False),  # clearly the fastest
    (4.0, 2.0, "quantized", False),
    (2.2, 2.0, "student", True),  # within the margin of the fastest: the smaller on disk
    (2.0, 2.2, "student", True),
    (6.0, 5.5, "ensemble", False),  # neither is min_speedup times faster than the ensemble
])
def test_auto_picks_the_fastest_and_a_tie_goes_to_the_smallest_on_disk(tmp_path, student, quantized, served, tied):
    cfg = load_settings(write_params(tmp_path)).compress
    assert cfg.tie_margin == 0.15 and cfg.min_speedup == 2.0
    choice = choose("auto", _figures(ensemble=10.0, student=student, quantized=quantized), "roc_auc", cfg)
    assert choice["served"] == served, choice["reason"]
    assert ("tied within 15% of the fastest with quantized, and the smallest on disk" in choice["reason"]) == tied


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny simulator project (1,500 rows) trained up to `evaluate` (the ensemble in models/trained)."""
    root = tmp_path_factory.mktemp("compress")
    params = write_params(root, **SMALL)
    for name in STAGES[:STAGES.index("compress")]:
        run_stage(name, params, root)
    return root


SMALL = {"source.simulator.rows_per_batch": 500, "compress.measure_memory": True}
# a compress run whose test reads no memory or latency figure: none measured, 20 single rows timed
UNMEASURED = {"compress.measure_memory": False, "compress.latency_rows": 20}


def _compress(root: Path, **overrides: Any) -> tuple[Any, dict[str, Any]]:
    settings = load_settings(write_params(root, **{**SMALL, **overrides}))
    compress.run(settings, Paths(root))
    return settings, json.loads((root / "reports" / "compression.json").read_text(),
                                parse_constant=lambda c: pytest.fail(f"{c} in compression.json"))


@contextlib.contextmanager
def cpu_hog() -> Iterator[None]:
    """Every core busy with a spinning process of its own while the block runs."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


@pytest.fixture(scope="module")
def gated(project: Path) -> dict[str, Any]:
    """compression.json of a compress run whose gate lets both the student and the int8 copy through, its
    candidates timed while every core is busy: the pick rests on CPU times taken in turns, so what else runs does
    not change it."""
    def measured_under_load(*args: Any, **kwargs: Any) -> Any:
        with cpu_hog():
            return measure(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compress, "measure", measured_under_load)
        return _compress(project, **{"compress.min_speedup": 1.0, "compress.max_metric_loss": 0.02})[1]


@pytest.mark.slow  # the stages up to evaluate on a small project, then compress with every core busy
def test_the_gate_picks_a_passing_student_and_serves_what_it_measured(project, gated):
    report = gated
    trained = ModelBundle.load(project / "models" / "trained")
    challenger = ModelBundle.load(project / "models" / "challenger")
    assert report["served"] == "student" and report["reason"].startswith("auto: student")
    assert set(report["candidates"]) == {"ensemble", "student", "quantized"}
    student = report["candidates"]["student"]
    assert student["passes"] and student["metric_loss"] <= 0.02 and student["roc_auc"] > 0.6
    for fig in report["candidates"].values():
        assert fig["latency_ms_p99"] >= fig["latency_ms_p50"] > 0 and fig["rows_per_s"] > 0
        assert fig["disk_bytes"] > 0 and fig["usd_per_1k_rows"] > 0 and fig["peak_memory_bytes"] >= 0
        assert fig["cpu_ms_p50"] > 0
    assert student["disk_bytes"] < report["candidates"]["ensemble"]["disk_bytes"]
    assert report["student"]["trees"] <= report["student"]["trees_distilled"]

    assert challenger.version == student["version"] == report["challenger_version"] != trained.version
    assert challenger.metadata["compressed_from"] == trained.version
    assert challenger.metadata["compression"]["served"] == "student"
    assert challenger.ensemble.names == ["student_lightgbm"]
    test = pd.read_parquet(Paths(project).test_rows)
    y = challenger.transform.encode_target(test["default"])
    assert score("roc_auc", y, challenger.predict(test)) == pytest.approx(student["roc_auc"])
    predictions = pd.read_parquet(Paths(project).test_predictions)  # monitoring's baseline: the served model's,
    recent = pd.read_parquet(Paths(project).recent_rows)  # on the newest rows as the table has them
    np.testing.assert_allclose(predictions["proba_1"], challenger.predict(recent)[:, 1])


@pytest.mark.slow  # the stages up to evaluate on a small project (the fixture the gate test shares)
def test_a_too_weak_student_leaves_the_ensemble_serving(project):
    _, report = _compress(project, **{**UNMEASURED, "compress.student.n_estimators": 1,
                                      "compress.student.num_leaves": 2, "compress.min_speedup": 1.0,
                                      "compress.max_metric_loss": 0.005, "compress.augment_factor": 0,
                                      "compress.quantize": False})  # the student alone against the ensemble
    student = report["candidates"]["student"]
    assert not student["passes"] and student["metric_loss"] > 0.005, student
    assert report["served"] == "ensemble" and "no candidate passes" in report["reason"]
    trained = ModelBundle.load(project / "models" / "trained")
    challenger = ModelBundle.load(project / "models" / "challenger")
    assert challenger.version == trained.version and challenger.ensemble.names == trained.ensemble.names


@pytest.mark.slow  # the stages up to compress on a small project
def test_serve_model_forces_the_int8_ensemble(project, gated):
    before = (project / "reports" / "compression.json").read_text()
    with pytest.raises(ValueError, match="no quantized candidate.*serve.model: auto"):  # before any work
        _compress(project, **{"serve.model": "quantized", "compress.quantize": False})
    assert (project / "reports" / "compression.json").read_text() == before
    _, report = _compress(project, **{**UNMEASURED, "serve.model": "quantized",  # the student's quality does not
                                      "compress.augment_factor": 0, "compress.student.n_estimators": 10})  # matter
    assert report["served"] == "quantized" and report["reason"] == "serve.model: quantized"
    challenger = ModelBundle.load(project / "models" / "challenger")
    mlp = [m for m in challenger.ensemble.members_ if isinstance(m, MLPLearner)]
    assert mlp and all(m.int8 for m in mlp)
    assert set(report["mlp_int8"]) == {"float32", "int8"} and report["mlp_int8"]["int8"]["speedup"] > 0


@pytest.mark.slow  # the stages up to compress on a small project, then promote
def test_promotion_rejects_a_challenger_over_the_latency_or_cost_limit(project, gated, caplog, capsys):
    paths = Paths(project)  # the challenger of the last compress run of this module
    report = read_json(paths.compression_report)
    settings = load_settings(write_params(project, **{**SMALL, "promote.max_latency_ms": 1e-6}))
    decision = promote.run(settings, paths)
    p99 = report["served_figures"]["latency_ms_p99"]
    assert not decision["promoted"] and decision["over_budget"], decision
    assert f"single-row p99 latency {p99:.2f} ms is over promote.max_latency_ms 1e-06" in decision["reason"]
    assert decision["serving"]["latency_ms_p99"] == p99 and decision["champion_after"] is None
    assert any(r.getMessage().startswith("ALERT gate_failed") for r in caplog.records)

    settings = load_settings(write_params(project, **{**SMALL, "promote.max_cost_per_1k": 1e-12}))
    assert "is over promote.max_cost_per_1k" in promote.run(settings, paths)["reason"]

    decision = run_stage("promote", write_params(project, **{**SMALL, "promote.max_latency_ms": 10_000}), project)
    assert decision["promoted"], decision["reason"]
    card = (project / "reports" / "model_card.md").read_text()
    assert "## Compression" in card and f"Serves: **{report['served']}**" in card and "## Cost" in card
    page = paths.model_card_html.read_text()  # the same card as a page, with the evaluate stage's pictures
    metrics = read_json(paths.metrics)
    assert f"<td>roc_auc</td><td>{metrics['roc_auc']:.4f}</td>" in page
    assert 'aria-label="ROC curve"' in page and 'aria-label="Calibration"' in page
    assert "<h3>Confusion matrix</h3>" in page and "<h2>Compression</h2>" in page and "<h2>Lineage</h2>" in page
    assert decision["reason"] in page and 'class="status champion"' in page
    champion_page = Paths(project).registry / "versions" / decision["champion_after"] / "MODEL_CARD.html"
    assert champion_page.read_text() == page
    assert main(["--params", str(project / "params.yaml"), "--root", str(project), "where"]) == 0
    out = capsys.readouterr().out
    assert f"Challenger card:   {paths.model_card_html} (Markdown: model_card.md)\n" in out
    assert f"Champion card:     {champion_page} (Markdown: MODEL_CARD.md)\n" in out

    cost = read_json(paths.cost_report)  # every stage run through run_stage is in it, with its price
    assert set(cost["stages"]) == {*STAGES[:STAGES.index("compress")], "promote"}
    for entry in cost["stages"].values():
        assert entry["status"] == "ok" and entry["cpu_s"] > 0 and entry["usd"] > 0 and entry["gpu_s"] == 0
    assert cost["total"]["usd"] == pytest.approx(sum(s["usd"] for s in cost["stages"].values()))


def test_compress_runs_with_openmp_threads_asleep_as_serving_does():
    """OMP_WAIT_POLICY=PASSIVE before the stage's module loads OpenMP (scikit-learn's libgomp, which XGBoost shares;
    the CLI loads none of them); a stage that times nothing keeps the environment as it is; the user's policy wins;
    once OpenMP is loaded, the environment is left alone."""
    probe = ("import os; from pipelines.runner import serve_like_openmp as s; import pipelines.cli\n"
             "policy = lambda: os.environ.get('OMP_WAIT_POLICY')\n"
             "print(s('train'), policy()); os.environ['OMP_WAIT_POLICY'] = 'ACTIVE'; print(s('compress'), policy())\n"
             "del os.environ['OMP_WAIT_POLICY']; print(s('compress'), policy())\n"
             "del os.environ['OMP_WAIT_POLICY']; import sklearn; print(s('compress'), policy())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "None", "True", "ACTIVE", "True", "PASSIVE", "False", "None"]
