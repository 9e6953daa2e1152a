"""The real `amaas` console script with the preloaded stage host (pipelines.stagehost): later stage commands run
in it, write what a command of their own writes, and die with their command."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines import stagehost
from tests.conftest import BIN, write_params


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A small project after `amaas collect` (which starts the host) and `amaas validate` (run in it); the
    environment its commands run with. The host is stopped at the end."""
    root = tmp_path_factory.mktemp("hosted")
    write_params(root, **{"train.mlp.epochs": 400})  # train runs long enough to be signalled
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", stagehost.SWITCH: "1",
           stagehost.USAGE_ENV: str(root / "usage.json"), "HOSTED_TEST_MODULE": str(root)}  # a host of its own
    hosts: set[int] = set()
    try:
        for stage in ("collect", "validate"):
            proc = command(root, env, stage)
            assert proc.returncode == 0, proc.stderr[-2000:]
            hosts.update([usage(root)["host"]["host_pid"]] if stage == "validate" else [])
            assert (stage == "validate") == (root / "usage.json").exists()  # the first starts the host
        yield root, env
    finally:
        for pid in hosts:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def command(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    (root / "usage.json").unlink(missing_ok=True)
    return subprocess.run([str(BIN / "amaas"), "--params", "params.yaml", "--root", ".", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)


def usage(root: Path) -> dict:
    return json.loads((root / "usage.json").read_text())


def test_a_hosted_stage_writes_what_its_own_process_writes(project, tmp_path):
    root, env = project
    alone = tmp_path / "alone"
    shutil.copytree(root, alone)
    hosted = command(root, env, "prepare")
    assert hosted.returncode == 0, hosted.stderr[-2000:]
    assert usage(root)["hosted"] and usage(root)["code"] == 0
    by_itself = command(alone, {**env, stagehost.SWITCH: "0"}, "prepare")
    assert by_itself.returncode == 0, by_itself.stderr[-2000:]
    assert not (alone / "usage.json").exists()
    for name in ("train.parquet", "valid.parquet", "test.parquet", "transform.json"):
        assert (root / "data" / "features" / name).read_bytes() == (alone / "data" / "features" / name).read_bytes()
    assert json.loads(hosted.stdout)["prepare"] == json.loads(by_itself.stdout)["prepare"]
    assert "prepare done" in hosted.stderr and "prepare done" in by_itself.stderr

    # a user's mistake: the same one line and exit status 2
    bad = command(root, env, "--params", "nowhere.yaml", "prepare")
    assert bad.returncode == 2 and bad.stderr.startswith("amaas: error:") and usage(root)["hosted"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signalled_command_takes_its_stage_down_and_frees_the_project(project, sig):
    root, env = project
    lock = root / ".amaas.lock"
    lock.write_text("")  # the lock names its holder once one holds it
    proc = subprocess.Popen([str(BIN / "amaas"), "--params", "params.yaml", "--root", ".", "train"], cwd=root,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stage = holder(lock, proc)
    assert stage != proc.pid  # the stage runs in the host's process, not the command's
    assert Path(f"/proc/{stage}/comm").read_text().strip() == "amaas train"
    time.sleep(1.0)  # well into training
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == -sig  # the command ends as the stage did (SIGTERM) or as it was killed
    deadline = time.monotonic() + 30
    while Path(f"/proc/{stage}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{stage}").exists()
    with open(lock, "rb+") as f:  # nobody holds the project any more
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if sig == signal.SIGTERM:
        assert usage(root)["signal"] == signal.SIGTERM


def holder(lock: Path, proc: subprocess.Popen[str], timeout: float = 120) -> int:
    """The pid that holds the project lock, once one does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        with contextlib.suppress(ValueError):
            if text := lock.read_text():
                return int(json.loads(text)["pid"])
        time.sleep(0.1)
    raise AssertionError("no stage took the project lock")
