"""pipelines.stagehost: which host a command may use, and the protocol end to end in one process (a host forked
from the test, preloading only the CLI). The real console script under signals: tests/integration/test_stagehost.py."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from pipelines import stagehost
from tests.conftest import write_params


def test_the_digest_follows_code_and_environment_but_not_what_differs_per_command(tmp_path, monkeypatch):
    code = tmp_path / "code"
    (code / "stages").mkdir(parents=True)
    (code / "stages" / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(stagehost, "CODE_ROOT", code)
    env = {"PATH": "/usr/bin", "HOME": "/home/u", "OMP_NUM_THREADS": "2"}
    key = stagehost.digest(env)
    assert stagehost.digest(dict(env)) == key
    per_command = {"DVC_STAGE": "train", "DVC_ROOT": "/p", "PYTEST_CURRENT_TEST": "t", "AIRFLOW_CTX_DAG_ID": "d",
                   "PWD": "/p", "_": "/usr/bin/dvc", stagehost.USAGE_ENV: "/tmp/u.json"}
    assert stagehost.digest({**env, **per_command}) == key
    assert stagehost.digest({**env, "OMP_NUM_THREADS": "1"}) != key  # read when OpenMP loads: another host
    assert stagehost.digest({**env, "PWD_FILE": "1"}) != key  # only names ending in "_" are prefixes
    os.utime(code / "stages" / "a.py", ns=(0, 1))  # an edit to the code: another host
    assert stagehost.digest(env) != key
    assert stagehost.address(key).startswith(b"\0")  # Linux's abstract namespace: nothing on disk


@pytest.mark.parametrize(("value", "on"), [("1", True), ("0", False), ("off", False), (" No ", False),
                                           ("false", False), ("yes", True)])
def test_the_switch(value, on):
    assert stagehost.enabled({stagehost.SWITCH: value}) is (on and sys.platform == "linux")


@pytest.fixture
def host(monkeypatch):
    """A host for this process's environment, forked from the test with a preload of the CLI alone, and a
    successor for the late preload (json: loaded already). Yields the host's pid and a list for the successor's."""
    monkeypatch.setattr(stagehost, "PRELOAD", ("pipelines.cli",))
    monkeypatch.setattr(stagehost, "LATE_PRELOAD", ("json",))
    monkeypatch.setattr(stagehost, "IDLE_S", 30.0)
    key = stagehost.digest(os.environ)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the host's own process
        code = 1
        try:
            logging.getLogger().handlers.clear()  # pytest's log and output capture, copied by the fork: a real host
            # has neither; the streams stay open for the process
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)  # noqa: SIM115
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            code = stagehost.serve(key, str(stagehost.CODE_ROOT))
        finally:
            os._exit(code)
    others: list[int] = []
    try:
        yield pid, others
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for other in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(other, signal.SIGKILL)


def test_a_stage_command_runs_in_the_host_with_its_own_streams_status_and_usage(tmp_path, monkeypatch, capfd, host):
    first, successors = host
    usage = tmp_path / "usage.json"
    monkeypatch.setenv(stagehost.USAGE_ENV, str(usage))  # per command: the same host serves it
    params = write_params(tmp_path / "p")
    root = params.parent
    monkeypatch.chdir(root)  # the stage runs in the command's folder: relative paths resolve there
    code = stagehost.delegate("collect", ["--params", "params.yaml", "--root", ".", "collect"])
    assert code == 0
    out, err = capfd.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["collect"]["new_rows"] == 3000  # its stdout is ours
    assert "collect done" in err  # and so is its stderr
    assert (root / "data" / "raw" / "manifest.json").exists()
    figures = json.loads(usage.read_text())
    assert figures["hosted"] and figures["code"] == 0 and figures["signal"] is None
    assert figures["cpu_s"] > 0
    assert figures["peak_rss_mib"] > 50

    # a user's mistake: its message and exit status 2, as without a host
    assert stagehost.delegate("collect", ["--params", "missing.yaml", "collect"]) == 2
    assert "amaas: error:" in capfd.readouterr().err

    # the host hands over to the successor it forked for LATE_PRELOAD once that has its imports
    deadline = time.monotonic() + 60
    while (served := json.loads(usage.read_text())["host"]["host_pid"]) == first and time.monotonic() < deadline:
        time.sleep(0.2)
        assert stagehost.delegate("collect", ["--params", "params.yaml", "--root", ".", "collect"]) == 0
    assert served != first
    successors.append(served)
    assert json.loads(usage.read_text())["host"]["preloaded"]
    deadline = time.monotonic() + 30  # and the host that handed over ends, its stages done
    while running(first):
        assert time.monotonic() < deadline
        time.sleep(0.1)

    # a stage never runs twice: a command that stopped waiting for the host runs it itself, and the host does not
    monkeypatch.setattr(stagehost, "READY_WAIT_S", 1e-9)
    cost = root / "reports" / "cost.json"  # every run of a stage, even a failed one, writes it
    before = cost.stat().st_mtime_ns
    usage.unlink()
    assert stagehost.delegate("collect", ["--params", "params.yaml", "--root", ".", "collect"]) is None
    time.sleep(1.0)
    assert cost.stat().st_mtime_ns == before and not usage.exists()


def test_no_host_is_used_where_it_is_switched_off(monkeypatch, tmp_path):
    monkeypatch.setenv(stagehost.SWITCH, "0")
    started: list[str] = []
    monkeypatch.setattr(stagehost, "_start_host", started.append)
    assert stagehost.delegate("collect", ["collect"]) is None and started == []
    monkeypatch.delenv(stagehost.SWITCH)
    monkeypatch.setattr(stagehost, "address", lambda key: b"\0amaas-stagehost-test-" + str(Path(tmp_path)).encode())
    assert stagehost.delegate("collect", ["collect"]) is None  # none listening: one is started, the command runs
    assert len(started) == 1


def running(pid: int) -> bool:
    """Whether `pid` is alive (a zombie has ended: it waits for its parent, here the test, to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
