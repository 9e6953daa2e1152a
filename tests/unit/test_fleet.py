"""The fleet's HAProxy configuration (pipelines/serving/fleet.py): HAProxy accepts it, and it checks health on
/readyz, retries only what no replica can have processed, and has the slots replicas are added to."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipelines.serving.fleet import SLOTS, FleetError, haproxy_config, request_scale
from tests.conftest import server_binary


def _directives(config: str) -> dict[str, list[str]]:
    """Each directive of the configuration (comments dropped) -> its arguments, the last one written."""
    found: dict[str, list[str]] = {}
    for line in config.splitlines():
        words = line.split("#")[0].split()
        if words:
            name = " ".join(words[:2]) if words[0] in ("option", "http-check", "timeout", "stats") else words[0]
            found[name] = words[1:] if name == words[0] else words[2:]
    return found


def test_haproxy_accepts_the_fleet_configuration(tmp_path: Path):
    haproxy = server_binary("haproxy", "haproxy", also="/usr/sbin/haproxy")
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config("127.0.0.1", 18080, tmp_path))
    checked = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_configuration_checks_readyz_retries_only_unprocessed_requests_and_has_slots(tmp_path: Path):
    found = _directives(haproxy_config("127.0.0.1", 18080, tmp_path, slots=8))
    assert found["option httpchk"] == ["GET", "/readyz"]
    assert found["http-check expect"] == ["status", "200"]
    assert {"inter", "fall", "rise"} <= set(found["default-server"])
    assert found["balance"] == ["leastconn"]
    # a replica that died holding a request may have logged it: only a failed connection or a 503 is resent
    assert set(found["retry-on"]) == {"conn-failure", "503"}
    assert found["retries"] == ["3"] and found["option redispatch"] == ["1"]
    assert "option http-buffer-request" in found
    prefix, slots, parked, *params = found["server-template"]
    assert slots == "1-8" and "check" in params and "disabled" in params  # no replica takes traffic unannounced
    assert found["stats socket"][0] == str(tmp_path / "haproxy.sock") and "admin" in found["stats socket"]
    assert found["bind"] == ["127.0.0.1:18080"]
    assert SLOTS >= 8


def test_scaling_a_fleet_that_is_not_running_says_so(tmp_path: Path):
    with pytest.raises(FleetError, match="no fleet runs"):
        request_scale(tmp_path, 3)


def test_fleet_commands_without_a_running_fleet_or_a_champion_say_what_to_do(tmp_path: Path, capsys, monkeypatch):
    from pipelines.cli import main
    from pipelines.config import STATE_URL_ENV
    from tests.conftest import write_params

    monkeypatch.delenv(STATE_URL_ENV, raising=False)  # replicas of this project, not of a shared state

    base = ["--params", str(write_params(tmp_path)), "--root", str(tmp_path), "fleet"]
    assert main([*base, "scale", "3"]) == 2
    assert "no fleet runs" in capsys.readouterr().err
    assert main([*base, "status"]) == 0
    assert '"running": false' in capsys.readouterr().out
    assert main([*base, "--replicas", "2"]) == 2  # replicas of this project serve its champion: there is none
    assert "no champion" in capsys.readouterr().err
    assert not (tmp_path / ".fleet" / "haproxy.cfg").exists()  # nothing started


def test_a_replica_serves_on_loopback_from_its_project_or_from_its_own_empty_folder(tmp_path: Path):
    from pipelines.serving.fleet import project_replica, state_replica

    project = project_replica(tmp_path, tmp_path / "params.yaml")(4100)
    assert project[-5:] == ["serve", "--host", "127.0.0.1", "--port", "4100"]
    assert project[project.index("--root") + 1] == str(tmp_path)
    shared = state_replica()(4101)  # in fleet mode the replica's folder (its working directory) is its root
    assert shared[shared.index("--root") + 1] == "." and "--params" not in shared
    assert shared[-5:] == ["serve", "--host", "127.0.0.1", "--port", "4101"]
