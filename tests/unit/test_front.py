"""The blue-green front (pipelines/serving/front.py) against tiny local backends: requests and answers pass
through unchanged, a switch of the state file moves new requests while one in flight finishes where it
started, and a dead or silent backend is a quick 502/504 with Retry-After, never a hang."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipelines.io import write_json
from pipelines.serving.front import Front


class _Echo(BaseHTTPRequestHandler):
    """Answers with what it received, its own name, and the status asked for in X-Status."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path.startswith("/slow"):
            time.sleep(0.5)
        out = json.dumps({"backend": self.server.name, "method": self.command, "path": self.path,  # type: ignore[attr-defined]
                          "headers": {k.lower(): v for k, v in self.headers.items()},
                          "body": body.decode()}).encode()
        self.send_response(int(self.headers.get("x-status") or 200))
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.send_header("x-backend", self.server.name)  # type: ignore[attr-defined]
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def backends() -> Iterator[dict[str, str]]:
    """Two echo servers on localhost ports: {name: url}."""
    servers = {}
    for name in ("blue", "green"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
        server.name = name  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers[name] = server
    yield {name: f"http://127.0.0.1:{s.server_address[1]}" for name, s in servers.items()}
    for server in servers.values():
        server.shutdown()
        server.server_close()


def _switch(state: Path, url: str) -> None:
    write_json(state, {"supervisor_pid": 1, "active": {"url": url}, "last_deploy": None})


def _run(front: Front, *requests: tuple[str, str, dict[str, Any]]) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=front)
        async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
            return list(await asyncio.gather(*(client.request(m, p, **kw) for m, p, kw in requests)))
    return asyncio.run(go())


def test_requests_and_answers_pass_through_unchanged(tmp_path, backends):
    state = tmp_path / "front.json"
    _switch(state, backends["blue"])
    front = Front(state, connect_timeout_s=1, read_timeout_s=5)
    (answer,) = _run(front, ("POST", "/predict?x=1&y=%20z", {
        "content": b'{"row": {"a": 1}}', "headers": {"Authorization": "Bearer k", "X-Request-ID": "r-1",
                                                     "X-Status": "422", "Content-Type": "application/json",
                                                     "User-Agent": "tiny-client/1"}}))
    assert answer.status_code == 422 and answer.headers["x-backend"] == "blue"
    seen = answer.json()
    assert seen["method"] == "POST" and seen["path"] == "/predict?x=1&y=%20z"
    assert seen["body"] == '{"row": {"a": 1}}'
    assert {"authorization": "Bearer k", "x-request-id": "r-1", "content-type": "application/json",
            "user-agent": "tiny-client/1"}.items() <= seen["headers"].items()  # the client's, not the front's
    assert front.inflight[backends["blue"]] == 0


def test_a_switch_moves_new_requests_and_one_in_flight_finishes_where_it_started(tmp_path, backends):
    state = tmp_path / "front.json"
    _switch(state, backends["blue"])
    front = Front(state, connect_timeout_s=1, read_timeout_s=5)

    async def go() -> tuple[httpx.Response, httpx.Response, int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front), base_url="http://front") as client:
            slow = asyncio.create_task(client.get("/slow"))
            while not front.inflight[backends["blue"]]:
                await asyncio.sleep(0.01)
            _switch(state, backends["green"])
            after = await client.get("/models")
            in_flight = front.inflight[backends["blue"]]
            return await slow, after, in_flight

    slow, after, in_flight = asyncio.run(go())
    assert after.json()["backend"] == "green"
    assert in_flight == 1  # the slow request was still on blue when green answered
    assert slow.status_code == 200 and slow.json()["backend"] == "blue"
    assert front.inflight[backends["blue"]] == 0


def test_a_dead_or_silent_backend_is_a_quick_502_or_504_with_retry_after(tmp_path):
    state = tmp_path / "front.json"
    front = Front(state, connect_timeout_s=0.5, read_timeout_s=0.5)
    (none,) = _run(front, ("GET", "/models", {}))
    assert none.status_code == 503 and none.headers["retry-after"] == "1"

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    _switch(state, f"http://127.0.0.1:{dead}")
    started = time.monotonic()
    (refused,) = _run(front, ("POST", "/predict", {"json": {"row": {}}}))
    assert refused.status_code == 502 and refused.headers["retry-after"] == "1"
    assert "not reachable" in refused.json()["error"] and time.monotonic() - started < 1

    with socket.socket() as silent:  # accepts connections (the kernel's backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        _switch(state, f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        (hung,) = _run(front, ("GET", "/models", {}))
    assert hung.status_code == 504 and hung.headers["retry-after"] == "1"
    assert time.monotonic() - started < 2


def test_a_request_refused_by_the_old_backend_during_a_switch_goes_to_the_new_one(tmp_path, backends):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        stopped = f"http://127.0.0.1:{closed.getsockname()[1]}"
    state = tmp_path / "front.json"
    _switch(state, stopped)
    front = Front(state, connect_timeout_s=1, read_timeout_s=5)
    picks = iter([stopped, backends["green"]])
    front.active = lambda: next(picks)  # type: ignore[method-assign]  # the switch lands between pick and connect
    (answer,) = _run(front, ("POST", "/predict", {"content": b"{}"}))
    assert answer.status_code == 200 and answer.json()["backend"] == "green"
    assert answer.json()["body"] == "{}"


def test_workers_that_keep_exiting_at_start_are_counted_and_others_are_not(tmp_path):
    """What a blue-green deploy gives up on at once (MAX_WORKER_EXITS), instead of waiting out its timeout: a
    server whose API workers exit and are started again, as BentoML does with a worker whose model fails to
    load. Other children of the server (not API workers) that come and go are not counted."""
    import subprocess
    import sys

    import psutil

    from pipelines.serving.bluegreen import WORKER_MODULE, WorkerExits

    server = (f"import subprocess, sys, time\n"
              f"for _ in range(5):\n"  # a helper that ends, then a worker that keeps failing, restarted each time
              f"    subprocess.run([sys.executable, '-c', 'pass', 'helper'])\n"
              f"    subprocess.run([sys.executable, '-c', 'import time; time.sleep(0.4)', '{WORKER_MODULE}.service'])\n"
              f"time.sleep(30)\n")
    steady = f"import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(30)', " \
             f"'{WORKER_MODULE}.service'])"
    failing, healthy = (subprocess.Popen([sys.executable, "-c", code]) for code in (server, steady))
    try:
        exits, calm = WorkerExits(failing.pid), WorkerExits(healthy.pid)
        deadline = time.monotonic() + 30
        while exits.count() < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert exits.count() >= 3
        assert calm.count() == 0 and len(calm.workers()) == 1  # one worker, alive all along
    finally:
        for process in (failing, healthy):
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
            process.wait()
    assert WorkerExits(failing.pid).workers() == set()  # a server that is gone has no workers
