"""Blue-green serving (serve.strategy: blue-green): `amaas serve` runs the front (pipelines/serving/front.py) on
serve.port and one bento behind it; `amaas deploy` asks it to put a new bento beside the old one and switch.

`amaas serve` owns every process: the front runs in its own event loop, each backend is a `bentoml serve` child
on a free localhost port. `amaas deploy` (any process of the project: the CLI, an Airflow task) writes a
request (`Paths.deploy_request`) and waits for its result in the front's state file (`Paths.front_state`).
For each request the server starts the new bento on a second port, waits until it is ready, checks that
GET /models names the champion and that a real /predict of a row of the champion's own reference sample
answers 200, then switches the front (an atomic rewrite of the state file), lets the requests in flight on
the old backend finish (serve.blue_green.drain_s at most) and stops it. A failure at any step stops the new
backend and leaves the old one serving; the reason goes back to deploy, which records it.

A backend never follows the registry by itself (that is the hot strategy): it is started with a copy of
params.yaml whose reload interval outlasts it, so it serves the champion (and challenger) of the moment it
started, with the settings of that moment, until a deploy replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from pipelines.bundle import TRANSFORM_FILE
from pipelines.config import PARAMS_ENV, Paths, load_settings
from pipelines.io import read_json, write_json, write_text
from pipelines.registry import MONITORING_DIR, Registry
from pipelines.serving.front import Front, read_state
from pipelines.serving.server import alive
from pipelines.state.keys import ApiKeys

log = logging.getLogger(__name__)
BACKEND_HOST = "127.0.0.1"  # backends are reached through the front only
COLORS = ("blue", "green")
FROZEN_RELOAD_S = 10 * 365 * 86_400.0  # a backend's registry check interval: never, in practice (see above)
POLL_S = 0.2
# a backend whose workers exit this many times before it is ready is given up at once: BentoML restarts a worker
# that fails at start (a model that does not load) for as long as it is let, so waiting would cost deploy.timeout_s
MAX_WORKER_EXITS = 3
WORKER_MODULE = "_bentoml_impl.worker"  # in the command line of BentoML's API workers (they load the models)
Launch = Callable[[str, int, dict[str, str]], "subprocess.Popen[bytes]"]  # (bento tag, port, env) -> the server


class BlueGreenError(RuntimeError):
    """A new backend did not start, get ready or answer the smoke request (the old one keeps serving), or a
    second blue-green server of the same project was asked for."""


def smoke_row(paths: Paths, version: str) -> dict[str, Any]:
    """A valid request row for `version`: the first row of its own reference sample (its training rows), its
    input columns as the data spells them, missing values as null."""
    import pandas as pd

    folder = Registry(paths.registry).version_dir(version)
    sample = folder / MONITORING_DIR / Paths.SAMPLE_FILE
    if not sample.is_file():
        raise FileNotFoundError(f"{sample} is missing: a blue-green deploy smoke-tests the new backend with a row of "
                                f"its model's reference sample; restore it (`dvc checkout`, a backup)")
    inputs = read_json(folder / TRANSFORM_FILE)
    frame = pd.read_parquet(sample, columns=[*inputs["numeric"], *inputs["categorical"]]).head(1)
    row: dict[str, Any] = json.loads(frame.to_json(orient="records"))[0]  # NaN -> null, numpy -> JSON types
    return row


def running_server(paths: Paths) -> dict[str, Any] | None:
    """The state of this project's blue-green server, or None when none is running."""
    state = read_state(paths.front_state)
    return state if state and alive(state["supervisor_pid"]) else None


def request_deploy(paths: Paths, champion: str, bento_tag: str, smoke: dict[str, Any], timeout_s: float,
                   drain_s: float) -> dict[str, Any]:
    """Ask the running blue-green server to serve `bento_tag`; wait for its result ({"ok", "reason", "active"})."""
    request_id = uuid.uuid4().hex
    write_json(paths.deploy_request, {"id": request_id, "champion": champion, "bento_tag": bento_tag,
                                      "smoke_row": smoke, "timeout_s": timeout_s, "at": _now()})
    # ready and smoke-tested within timeout_s, then the old backend drains and stops (drain_s, twice at most)
    wait_s = timeout_s + 2 * drain_s + 10
    deadline = time.monotonic() + wait_s
    while True:
        state = running_server(paths)
        if state is None:
            return {"ok": False, "reason": "the blue-green server stopped during the deploy"}
        result = state.get("last_deploy") or {}
        if result.get("id") == request_id:
            return {**result, "active": state["active"]}
        if time.monotonic() > deadline:
            return {"ok": False, "reason": f"the blue-green server (pid {state['supervisor_pid']}) did not answer "
                                           f"within {wait_s:.0f} s"}
        time.sleep(POLL_S)


@dataclass
class Backend:
    color: str
    port: int
    process: subprocess.Popen[bytes]
    champion: str
    bento_tag: str
    since: str = field(default_factory=lambda: _now())

    @property
    def url(self) -> str:
        return f"http://{BACKEND_HOST}:{self.port}"

    def describe(self) -> dict[str, Any]:
        return {"color": self.color, "url": self.url, "pid": self.process.pid, "champion": self.champion,
                "bento_tag": self.bento_tag, "since": self.since}


class Supervisor:
    """The blue-green server: the front, the active backend, and the switches deploy asks for."""

    def __init__(self, paths: Paths, params_file: Path, launch: Launch, env: dict[str, str]) -> None:
        self.paths, self.params_file, self.launch, self.env = paths, params_file, launch, env
        self.cfg = load_settings(params_file).serve.blue_green
        self.front = Front(paths.front_state, self.cfg.connect_timeout_s, self.cfg.read_timeout_s)
        self.active: Backend | None = None
        self.last_deploy: dict[str, Any] | None = None
        self.server: Any = None  # the front's uvicorn.Server
        self._handled = (read_state(paths.deploy_request) or {}).get("id")  # a request left from an earlier run

    def run(self, host: str, port: int, bento: str, champion: str, smoke: dict[str, Any]) -> int:
        """Serve until SIGTERM/SIGINT (0) or until the active backend dies (its exit code)."""
        signalled: list[int] = []
        # uvicorn restores these after its graceful shutdown and re-raises the signal: it must land here, so
        # that the backends are stopped after the front, not killed with us
        previous = {sig: signal.signal(sig, lambda signum, _frame: signalled.append(signum))
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = asyncio.run(self._serve(host, port, bento, champion, smoke))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0 if signalled else code

    async def _serve(self, host: str, port: int, bento: str, champion: str, smoke: dict[str, Any]) -> int:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(
            self.front, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
            server_header=False, date_header=False,  # the backend's own pass through
            timeout_graceful_shutdown=int(self.cfg.drain_s)))
        self._write_state()  # no backend yet: the front answers 503 (Retry-After) until the first is ready
        front = asyncio.create_task(self._run_front())
        while not (self.server.started or front.done()):
            await asyncio.sleep(0.05)
        code = 1
        try:
            if self.server.started:
                self.active = await self._start_checked(COLORS[0], bento, champion, smoke, timeout_s=None)
                self._write_state()
                log.info("blue-green: front on http://%s:%d -> %s (champion %s)", host, port, self.active.url,
                         champion)
                code = await self._watch(front)
        except BlueGreenError as exc:
            log.error("blue-green: the first backend did not come up: %s", exc)
        finally:
            self.server.should_exit = True
            await front  # the front finishes the requests it holds first
            if self.active is not None:
                await self._stop(self.active)
            with contextlib.suppress(FileNotFoundError):
                self.paths.front_state.unlink()
        return code

    async def _run_front(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits this way when it cannot bind: logged already
            await self.server.serve()

    async def _watch(self, front: asyncio.Task[None]) -> int:
        assert self.active is not None
        while not (self.server.should_exit or front.done()):
            if (code := self.active.process.poll()) is not None:
                log.error("blue-green: the active backend (%s, pid %d) exited with code %d: stopping",
                          self.active.color, self.active.process.pid, code)
                self.active = None
                return code or 1
            request = self._pending_request()
            if request is not None:
                await self._deploy(request)
            await asyncio.sleep(POLL_S)
        return 0

    def _pending_request(self) -> dict[str, Any] | None:
        try:
            request = read_state(self.paths.deploy_request)
        except ValueError:  # written atomically: only a hand edit gets here
            return None
        if request is None or request.get("id") == self._handled:
            return None
        self._handled = request["id"]
        return request

    async def _deploy(self, request: dict[str, Any]) -> None:
        assert self.active is not None
        old = self.active
        result: dict[str, Any] = {"id": request["id"], "champion": request["champion"],
                                  "bento_tag": request["bento_tag"], "at": _now()}
        if request["bento_tag"] == old.bento_tag:
            self.last_deploy = result | {"ok": True, "reason": "already serving"}
            self._write_state()
            return
        color = COLORS[1 - COLORS.index(old.color)]
        log.info("blue-green: starting %s (%s) beside %s", color, request["bento_tag"], old.color)
        try:
            new = await self._start_checked(color, request["bento_tag"], request["champion"], request["smoke_row"],
                                            timeout_s=float(request["timeout_s"]))
        except BlueGreenError as exc:
            log.error("blue-green: %s failed, %s keeps serving: %s", color, old.color, exc)
            self.last_deploy = result | {"ok": False, "reason": str(exc)}
            self._write_state()
            return
        self.active = new
        self._write_state()  # the switch: every request from now on goes to the new backend
        log.info("blue-green: switched to %s (champion %s); draining %s", color, new.champion, old.color)
        await self._retire(old)
        self.last_deploy = result | {"ok": True, "reason": f"switched from {old.color} ({old.champion})"}
        self._write_state()

    async def _start_checked(self, color: str, bento: str, champion: str, smoke: dict[str, Any],
                             timeout_s: float | None) -> Backend:
        """Start a backend and return it once it is ready, serves `champion` and answers the smoke request."""
        backend = self._start(color, bento, champion)
        try:
            await self._check(backend, smoke, None if timeout_s is None else time.monotonic() + timeout_s)
        except BaseException:
            await self._stop(backend)
            raise
        return backend

    def _start(self, color: str, bento: str, champion: str) -> Backend:
        raw = yaml.safe_load(self.params_file.read_text())
        raw["serve"]["reload_interval_s"] = FROZEN_RELOAD_S
        params = self.paths.backend_params / f"{color}.yaml"
        write_text(params, yaml.safe_dump(raw, sort_keys=False))
        port = _free_port()
        process = self.launch(bento, port, {**self.env, PARAMS_ENV: str(params)})
        return Backend(color, port, process, champion, bento)

    async def _check(self, backend: Backend, smoke: dict[str, Any], deadline: float | None) -> None:
        workers = WorkerExits(backend.process.pid)
        async with httpx.AsyncClient(base_url=backend.url, timeout=10) as client:
            while not await _ready(client):
                if (code := backend.process.poll()) is not None:
                    raise BlueGreenError(f"{backend.bento_tag} exited with code {code} before it was ready "
                                       f"(its log is in the server's output)")
                if (exits := workers.count()) >= MAX_WORKER_EXITS:
                    raise BlueGreenError(f"the workers of {backend.bento_tag} exited {exits} times before it was "
                                         f"ready: they fail at start (their log is in the server's output)")
                if self.server.should_exit:
                    raise BlueGreenError("the server is stopping")
                if deadline is not None and time.monotonic() > deadline:
                    raise BlueGreenError(f"{backend.bento_tag} was not ready within the deploy timeout")
                await asyncio.sleep(POLL_S)
            served = (await client.get("/models")).json()
            if served.get("champion") != backend.champion:
                raise BlueGreenError(f"{backend.bento_tag} serves {served.get('champion')}, not {backend.champion}")
            status, body = await self._smoke(client, backend, smoke)
            if status != 200 or not (isinstance(body, list) and body and "model_version" in body[0]):
                raise BlueGreenError(f"the smoke request to {backend.bento_tag} got {status}: {str(body)[:300]}")

    async def _smoke(self, client: httpx.AsyncClient, backend: Backend, row: dict[str, Any]) -> tuple[int, Any]:
        """POST /predict one reference row, with a key made for it and revoked after (when auth is on)."""
        keys, name = ApiKeys(self.paths.api_keys), f"bluegreen-smoke-{backend.color}-{backend.process.pid}"
        auth = load_settings(self.paths.backend_params / f"{backend.color}.yaml").serve.auth
        headers = {"X-Request-ID": f"bluegreen-smoke-{uuid.uuid4().hex[:12]}"}
        if auth:
            headers["Authorization"] = f"Bearer {keys.add(name)}"
        try:
            response = await client.post("/predict", json={"rows": [row]}, headers=headers)
        except httpx.HTTPError as exc:
            return 0, f"no answer ({exc})"
        finally:
            if auth:
                keys.revoke(name)
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, response.text

    async def _retire(self, old: Backend) -> None:
        """Stop the old backend once the requests the front sent it have finished (drain_s at most)."""
        deadline = time.monotonic() + self.cfg.drain_s
        while self.front.inflight[old.url] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.front.release(old.url)
        await self._stop(old)

    async def _stop(self, backend: Backend) -> None:
        """SIGTERM to the backend's process group: it finishes what it holds (drain_s, then SIGKILL)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(backend.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.drain_s
        while backend.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):  # workers left behind, or a server that did not stop
            os.killpg(backend.process.pid, signal.SIGKILL)
        backend.process.wait()
        log.info("blue-green: stopped %s (champion %s)", backend.color, backend.champion)

    def _write_state(self) -> None:
        write_json(self.paths.front_state, {
            "supervisor_pid": os.getpid(), "active": self.active.describe() if self.active else None,
            "last_deploy": self.last_deploy})


class WorkerExits:
    """Counts the BentoML workers under a server process that exited since counting began (BentoML starts
    another in each one's place)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: set[int] = set()

    def count(self) -> int:
        running = self.workers()
        self.seen |= running
        return len(self.seen - running)

    def workers(self) -> set[int]:
        """The pids of the server's API workers alive now."""
        import psutil

        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return set()
        found = set()
        for child in children:
            with contextlib.suppress(psutil.Error):  # gone meanwhile, or not ours to read
                if any(WORKER_MODULE in part for part in child.cmdline()):
                    found.add(child.pid)
        return found


async def _ready(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/readyz")).status_code == 200
    except httpx.HTTPError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((BACKEND_HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
