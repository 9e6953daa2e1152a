"""Fault handling: SIGKILL mid-write leaves no partial output and a rerun succeeds; concurrent runs are
serialized; a failed package leaves the champion serving."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from pipelines.bundle import ModelBundle
from tests.conftest import BIN, REPO, amaas, run_tool, served, write_params
from tests.integration.conftest import copy_project

pytestmark = pytest.mark.slow


def _killed_inside(block: str, tmp_path: Path) -> None:
    """Run `block` in a child inside an atomic write; SIGKILL it once it has written half its output."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from pipelines.io import atomic_dir, atomic_path
        root = Path({str(tmp_path)!r})
        {block}
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    marker = tmp_path / "half-written"
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert child.poll() is None and time.monotonic() < deadline, "child never reached the write"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()


def test_sigkill_inside_atomic_writes_leaves_old_or_nothing(tmp_path):
    from pipelines.io import atomic_dir, write_json

    write_json(tmp_path / "out.json", {"version": 1})
    _killed_inside("""
        with atomic_path(root / "out.json") as tmp:
            tmp.write_text('{"version": 2, "trunc')
            (root / "half-written").touch(); time.sleep(60)
    """, tmp_path)
    assert json.loads((tmp_path / "out.json").read_text()) == {"version": 1}
    assert list(tmp_path.glob(".out.json.*.tmp"))  # SIGKILL skips cleanup: the next write removes it
    write_json(tmp_path / "out.json", {"version": 3})
    assert not list(tmp_path.glob(".out.json.*.tmp"))

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "a.txt").write_text("old")
    (tmp_path / "half-written").unlink()
    _killed_inside("""
        import os
        with atomic_dir(root / "model") as tmp:
            (tmp / "a.txt").write_text("new")
        # replay atomic_dir's swap up to the kill: the old folder parked, the new one not yet in place
        os.rename(root / "model", root / ".model.old")
        (root / "half-written").touch(); time.sleep(60)
    """, tmp_path)
    assert not (tmp_path / "model").exists()
    with atomic_dir(tmp_path / "model") as out:  # the next writer of `model` first puts the old one back
        assert (tmp_path / "model" / "a.txt").read_text() == "new"
        (out / "a.txt").write_text("newer")
    assert (tmp_path / "model" / "a.txt").read_text() == "newer"
    assert not list(tmp_path.glob(".model*"))


def _outputs_are_whole(root: Path) -> None:
    """Whatever exists after a kill is complete: readable Parquet and JSON, a loadable model."""
    for file in [*root.glob("data/**/*.parquet"), *root.glob("reports/**/*.parquet")]:
        if not file.name.startswith("."):
            pd.read_parquet(file)
    for file in [*root.glob("data/**/*.json"), *root.glob("reports/*.json"), *root.glob("models/**/*.json")]:
        if not file.name.startswith("."):
            json.loads(file.read_text())
    for model in ("trained", "challenger"):
        if (root / "models" / model).exists():
            ModelBundle.load(root / "models" / model)


def test_pipeline_killed_at_any_point_reruns_to_the_same_result(tmp_path, trained_project):
    write_params(tmp_path)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for delay in (1.5, 3.0, 4.5, 6.0, 7.5):
        proc = subprocess.Popen([str(BIN / "amaas"), "--params", str(tmp_path / "params.yaml"), "--root",
                                 str(tmp_path), "run"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _outputs_are_whole(tmp_path)
    final = amaas("run", root=tmp_path)
    assert final.returncode == 0
    assert not [p for p in tmp_path.rglob("*.tmp")], "a rerun leaves no temp files behind"
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics == json.loads((trained_project / "reports" / "metrics.json").read_text())


def test_concurrent_runs_are_serialized_with_a_clear_message(tmp_path):
    write_params(tmp_path)
    first = subprocess.Popen([str(BIN / "amaas"), "--params", str(tmp_path / "params.yaml"), "--root",
                              str(tmp_path), "run"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = tmp_path / ".amaas.lock"
    deadline = time.monotonic() + 30
    while not (lock.exists() and lock.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.05)

    impatient = write_params(tmp_path / "impatient", **{"pipeline.lock_timeout_s": 1})
    refused = subprocess.run([str(BIN / "amaas"), "--params", str(impatient), "--root", str(tmp_path), "collect"],
                             capture_output=True, text=True)
    assert refused.returncode == 2
    assert f"another pipeline run holds {lock}" in refused.stderr and f"pid {first.pid}" in refused.stderr

    # one stage takes the lock as a whole run does, and costs seconds instead of a second training
    second = amaas("collect", root=tmp_path)  # waits for the first, then runs
    assert "waiting for another pipeline run on this project to finish" in second.stderr
    assert first.wait(timeout=10) == 0  # the first had finished before the second could start
    assert json.loads(second.stdout.splitlines()[0])["collect"]["new_rows"] == 0


def test_failed_package_leaves_the_champion_serving(tmp_path, trained_project):
    project = tmp_path / "project"
    shutil.copytree(trained_project, project, symlinks=True)
    registry = project / "models" / "registry"
    champion = json.loads((registry / "aliases.json").read_text())["champion"]
    row = pd.read_parquet(project / "data" / "reference" / "test.parquet").head(1)
    features = [c for c in row.columns if c not in ("loan_id", "event_time", "default", "batch")]
    payload = {"rows": [{k: (None if pd.isna(v) else v) for k, v in row[features].iloc[0].items()}]}

    with served(project) as server:
        before = server.session.post(f"{server.url}/predict", json=payload, timeout=30).json()
        # new data arrives and a new challenger trains, but the model store is broken when it is packaged
        write_params(project, **{"source.simulator.n_batches": 5})
        store = project / ".bentoml" / "models"
        store.rename(project / ".bentoml" / "models.saved")
        store.write_text("not a folder")
        failed = amaas("run", root=project, check=False)
        assert failed.returncode != 0
        done = [next(iter(json.loads(line))) for line in failed.stdout.splitlines() if line.startswith("{")]
        assert done == ["collect", "validate", "prepare", "train", "evaluate", "compress", "report"]  # package failed
        assert json.loads((project / "models" / "challenger" / "metadata.json").read_text())["version"] != champion

        # the registry never saw the challenger, and the running server still answers with the champion
        assert json.loads((registry / "aliases.json").read_text())["champion"] == champion
        after = server.session.post(f"{server.url}/predict", json=payload, timeout=30).json()
        assert [a["probability"] for a in after] == [b["probability"] for b in before]
        assert after[0]["model_version"] == champion


def test_dvc_repro_killed_in_train_keeps_the_previous_outputs(tmp_path, reproduced):
    """DVC deletes a stage's outputs before it runs it, unless they persist: those of train and evaluate are
    replaced atomically by the stages, so a SIGKILL mid-`dvc repro` leaves the previous ones, whole.
    Starts from a copy of a fresh project after its first `dvc repro` (the session's `reproduced`)."""
    source, first = reproduced
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    copy_project(source, tmp_path)
    kept = ["reports/tuning.json", "reports/train.json", "reports/metrics.json", "reports/slices.json",
            "reports/test_predictions.parquet", "models/trained/metadata.json", "models/challenger/metadata.json"]
    before = {name: (tmp_path / name).read_bytes() for name in kept}

    # a train setting changes: train and what follows run again; kill the whole dvc repro inside train
    write_params(tmp_path, **{"train.lightgbm.n_estimators": 7})
    log = tmp_path / "repro.log"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with log.open("w") as out:
        proc = subprocess.Popen(["dvc", "repro"], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        deadline = time.monotonic() + 120
        while "Running stage 'train'" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        time.sleep(1.0)  # inside amaas train
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert "Running stage 'evaluate'" not in log.read_text()

    for name, content in before.items():  # DVC deleted none of them, and none is half-written
        assert (tmp_path / name).read_bytes() == content, name
    _outputs_are_whole(tmp_path)

    again = run_tool(["dvc", "repro"], tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "Running stage 'train'" in again.stdout and "Running stage 'evaluate'" in again.stdout
    assert not [p for p in tmp_path.rglob("*.tmp") if ".dvc" not in p.parts]
    ModelBundle.load(tmp_path / "models" / "challenger")
    # persisted outputs are still versioned: a third repro skips every stage after collect
    third = run_tool(["dvc", "repro"], tmp_path)
    assert third.returncode == 0, third.stderr[-2000:]
    assert [line for line in third.stdout.splitlines() if "Running stage" in line] == ["Running stage 'collect':"]
