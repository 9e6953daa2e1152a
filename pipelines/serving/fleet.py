"""A serving fleet on one machine: N replicas of `amaas serve` behind HAProxy (`amaas fleet`).

The supervisor (`Fleet`) owns every process: HAProxy with its configuration, pid and runtime socket in the fleet's
folder, and each replica in a working folder of its own (`<folder>/replica-<slot>/`) on a free loopback port.

HAProxy's backend has `SLOTS` server slots (`server-template`), all in maintenance at start. A replica gets a slot:
the supervisor points the slot at the replica's port through the runtime API (`set server ... addr`) and sets it
`ready` only once the replica's own /readyz answers 200, so a replica takes traffic only when it can answer it. From
then on HAProxy's health check (GET /readyz every 500 ms, down after 2 failures) decides; the supervisor also puts
the slot in maintenance the moment it sees the replica's process exit, restarts it (on a new port) and enables the
slot again once the new process is ready. `remove()` drains: the slot stops getting new requests, the supervisor
waits until HAProxy counts no request on it, and only then stops the replica.

Retries: HAProxy resends a request to another replica only when it cannot have been processed: the connection
failed (`conn-failure`), or the replica answered 503, which amaas answers only before a request is predicted or
logged (draining, shed by adaptive batching, the shared state busy). A request a replica had already taken when it
died is not resent (`empty-response` is not in `retry-on`): it may already be in the prediction log, and a retry
would log it twice. Such requests (those in flight at the moment of a crash) fail: with 502, or, on a keep-alive
client connection, with that connection closed without an answer (HAProxy's way of telling the client "this
request was not answered", as if the keep-alive connection had been closed under it); nothing else fails.

HAProxy logs (`<folder>/logs/haproxy.log`) only what is abnormal: failed and retried requests, and servers going
up, down or into maintenance.
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.io import read_json, write_json, write_text
from pipelines.serving.bluegreen import BACKEND_HOST as REPLICA_HOST  # replicas are reached through HAProxy only
from pipelines.serving.bluegreen import _free_port
from pipelines.serving.server import alive

log = logging.getLogger(__name__)

FLEET_DIR = ".fleet"  # under the project root, git-ignored like .bentoml/
STATE_FILE = "fleet.json"  # what the running supervisor serves: its pid, the URL, each replica
SCALE_FILE = "scale.json"  # `amaas fleet scale N` writes the count it wants; the running supervisor polls it
BACKEND = "replicas"
SLOT_PREFIX = "srv"
SLOTS = 32  # server slots in HAProxy's backend: the most replicas one fleet runs
POLL_S = 0.2
PARKED = "127.0.0.1:1"  # where an unused slot points (it is in maintenance: never connected to)
MARKER_ENV = "AMAAS_FLEET_REPLICA"  # inherited by every process of a replica start: found and stopped by it
SERVER_ID_ENV = "AMAAS_SERVER_ID"  # pipelines.state.limits.SERVER_ENV (not imported: it loads the limiter)
RESTART_BACKOFF_MAX_S = 30.0

DEFAULT_PORT = 3000  # HAProxy's port where no params.yaml says serve.port

ReplicaCommand = Callable[[int], list[str]]  # the replica's port -> its command line


class FleetError(RuntimeError):
    """HAProxy did not start, a replica never got ready, or another fleet runs in the same folder."""


def haproxy_binary() -> str | None:
    """HAProxy from Debian's package (/usr/sbin is not on every user's PATH), or None."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def haproxy_config(host: str, port: int, folder: Path, slots: int = SLOTS, server_timeout_s: float = 60,
                   drain_s: float = 30) -> str:
    """The configuration of a fleet's HAProxy: a frontend on host:port, one backend of `slots` server slots in
    maintenance (the runtime API on `<folder>/haproxy.sock` fills them), health checks on /readyz."""
    return f"""# written by `amaas fleet` (pipelines/serving/fleet.py); replicas come and go through the runtime API
global
    stats socket {folder / "haproxy.sock"} mode 600 level admin
    stats timeout 10s
    pidfile {folder / "haproxy.pid"}
    maxconn 4096
    log stderr format iso local0 info   # into <folder>/logs/haproxy.log
    # a soft stop (SIGUSR1) lets the requests in flight finish, at most this long
    hard-stop-after {int(drain_s)}s

defaults
    mode http
    log global
    option httplog
    option dontlog-normal       # only failed or retried requests, and servers going up or down
    option http-keep-alive
    timeout connect 1s          # loopback: a replica that does not accept within 1 s is not there
    timeout client 60s
    timeout server {int(server_timeout_s)}s         # the model's answer, with batching and a cold worker
    timeout http-keep-alive 10s
    timeout queue 10s
    timeout check 1s
    # resend only what no replica can have processed: a failed connection, or a 503 (draining, shed, state busy:
    # answered before predicting or logging). Not empty-response: a replica that died holding a request may have
    # logged it. On each retry, another replica (redispatch 1).
    retries 3
    option redispatch 1
    retry-on conn-failure 503
    # a retried request is resent from HAProxy's buffer: wait for the whole body first (bodies over tune.bufsize,
    # 16 kB by default, are then never retried)
    option http-buffer-request

frontend fleet
    bind {host}:{port}
    default_backend {BACKEND}

backend {BACKEND}
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fastinter 250ms downinter 1s fall 2 rise 1
    server-template {SLOT_PREFIX} 1-{slots} {PARKED} check disabled
"""


class RuntimeApi:
    """HAProxy's runtime API on a Unix socket: one command per connection."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def command(self, line: str, timeout_s: float = 5) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout_s)
            conn.connect(str(self.path))
            conn.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def set_addr(self, slot: int, port: int) -> None:
        self._checked(f"set server {BACKEND}/{SLOT_PREFIX}{slot} addr {REPLICA_HOST} port {port}")

    def set_state(self, slot: int, state: str) -> None:
        """ready (takes traffic once its health check passes), drain (no new requests), maint (out)."""
        self._checked(f"set server {BACKEND}/{SLOT_PREFIX}{slot} state {state}")

    def servers(self) -> dict[int, dict[str, str]]:
        """`show stat` of the backend's slots, by slot number: scur (requests on it now), status (UP, DOWN, DRAIN,
        MAINT), stot, ..."""
        rows = csv.DictReader(self.command("show stat").lstrip("# ").splitlines())
        return {int(row["svname"][len(SLOT_PREFIX):]): row for row in rows
                if row["pxname"] == BACKEND and row["svname"].startswith(SLOT_PREFIX)}

    def _checked(self, line: str) -> None:
        answer = self.command(line).strip()
        # success is an empty answer or a note of what changed ("no need to change the addr, port changed ...")
        if answer and "changed" not in answer:
            raise FleetError(f"HAProxy refused {line!r}: {answer}")


@dataclass(eq=False)  # compared by identity
class Replica:
    """One replica slot: its folder, and the process of its current start."""

    slot: int
    folder: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    state: str = "starting"  # starting, ready, restarting, draining, stopped
    starts: int = 0
    failures: int = 0  # starts in a row that died or never got ready (the restart backoff)
    marker: str = ""
    started_at: float = 0.0
    ready_at: float | None = None
    restart_after: float = 0.0
    ready: threading.Event = field(default_factory=threading.Event)

    def describe(self) -> dict[str, Any]:
        return {"slot": self.slot, "folder": str(self.folder), "port": self.port, "state": self.state,
                "pid": self.process.pid if self.process else None, "starts": self.starts}


class Fleet:
    """N replicas behind HAProxy on this machine, kept at N: a replica that dies is restarted.

    Use as a context manager (or `start()` ... `stop()`). `add()` and `remove()` may be called from any thread
    while requests run; every process is started by the supervisor's own thread, because a replica is tied to the
    thread that started it (it gets SIGTERM when that thread ends: `_die_with_parent`)."""

    def __init__(self, folder: Path, replicas: int, command: ReplicaCommand, *, host: str = "127.0.0.1",
                 port: int = 0, env: Mapping[str, str] | None = None, ready_timeout_s: float = 180,
                 drain_s: float = 30, server_timeout_s: float = 60, slots: int = SLOTS) -> None:
        if not 0 <= replicas <= slots:
            raise ValueError(f"replicas must be between 0 and {slots}, not {replicas}")
        self.folder, self.initial, self.command = folder.resolve(), replicas, command
        self.host, self.port = host, port or _free_port()
        self.env = dict(os.environ if env is None else env)
        self.ready_timeout_s, self.drain_s, self.server_timeout_s, self.slots = (
            ready_timeout_s, drain_s, server_timeout_s, slots)
        self.api = RuntimeApi(self.folder / "haproxy.sock")
        self.id = uuid.uuid4().hex[:8]
        self.haproxy: subprocess.Popen[bytes] | None = None
        self._replicas: dict[int, Replica] = {}
        self._lock = threading.RLock()
        self._pending: list[Replica] = []  # replicas to start, handed to the supervisor's thread
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- the caller's side ------------------------------------------------------------------------------------------
    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, wait: bool = True) -> Fleet:
        """Start HAProxy and the replicas; with `wait`, return once every replica takes traffic."""
        self._claim_folder()
        for _ in range(self.initial):
            self._reserve()
        self._thread = threading.Thread(target=self._supervise, name="fleet-supervisor", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self.stop()
            raise FleetError(f"the fleet did not start: {self._error}") from self._error
        if wait:
            try:
                self.wait_ready(list(self._replicas), self.ready_timeout_s)
            except BaseException:
                self.stop()
                raise
        return self

    def add(self, wait: bool = True) -> int:
        """Start one more replica in the lowest free slot; it takes traffic once its /readyz answers 200. Returns
        its slot (with `wait`, once HAProxy may send it requests)."""
        slot = self._reserve().slot
        if wait:
            self.wait_ready([slot], self.ready_timeout_s)
        return slot

    def remove(self, slot: int) -> None:
        """Take a replica out without losing a request: no new request goes to it, those it holds finish
        (drain_s at most), then it is stopped and its slot goes back to maintenance."""
        with self._lock:
            replica = self._replicas[slot]
            replica.state = "draining"  # the supervisor no longer restarts it
        self._write_state()
        with contextlib.suppress(FleetError, OSError):
            self.api.set_state(slot, "drain")
        deadline = time.monotonic() + self.drain_s
        while time.monotonic() < deadline:
            try:
                row = self.api.servers()[slot]
            except (OSError, KeyError):
                break
            if int(row["scur"] or 0) == 0 and int(row["qcur"] or 0) == 0:
                break
            time.sleep(0.05)
        else:
            log.warning("fleet: replica %d still held requests after %.0f s: stopping it anyway", slot, self.drain_s)
        with contextlib.suppress(FleetError, OSError):
            self.api.set_state(slot, "maint")
        self._stop_replica(replica)
        with self._lock:
            replica.state = "stopped"
            del self._replicas[slot]
        self._write_state()
        log.info("fleet: removed replica %d", slot)

    def scale(self, replicas: int) -> None:
        """Add or remove replicas (the newest first) until `replicas` run."""
        if not 0 <= replicas <= self.slots:
            raise ValueError(f"replicas must be between 0 and {self.slots}, not {replicas}")
        with self._lock:
            running = sorted(s for s, r in self._replicas.items() if r.state != "draining")
        if replicas > len(running):
            added = [self._reserve().slot for _ in range(replicas - len(running))]
            self.wait_ready(added, self.ready_timeout_s)
        for slot in reversed(running[replicas:]):
            self.remove(slot)

    def kill(self, slot: int, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to every process of a replica (a crash, for tests and drills); the supervisor restarts it."""
        with self._lock:
            replica = self._replicas[slot]
            replica.ready.clear()  # wait_ready() now waits for the restarted one
            marker = replica.marker
        for process in _marked(marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(process, sig)

    def replicas(self) -> dict[int, dict[str, Any]]:
        """Each replica as the supervisor sees it (slot -> port, state, pid, starts)."""
        with self._lock:
            return {slot: r.describe() for slot, r in self._replicas.items()}

    def wait_ready(self, slots: list[int], timeout_s: float) -> None:
        """Wait until each of `slots` is enabled in HAProxy (its replica answered /readyz 200)."""
        deadline = time.monotonic() + timeout_s
        for slot in slots:
            with self._lock:
                replica = self._replicas.get(slot)
            if replica is None:
                raise FleetError(f"replica {slot} is gone")
            while not replica.ready.wait(POLL_S):
                if self._error is not None or self._stopping.is_set():
                    raise FleetError(f"the fleet stopped while replica {slot} was starting: {self._error}")
                if time.monotonic() > deadline:
                    raise FleetError(f"replica {slot} was not ready within {timeout_s:.0f} s (its log: "
                                     f"{self._log_path(slot)})")

    def stop(self) -> None:
        """Stop taking requests, let those in flight finish (drain_s at most), stop every replica and HAProxy."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._shutdown()  # when the thread never ran (start failed early), or to be sure

    def serve_forever(self, should_stop: Callable[[], bool]) -> None:
        """Run until `should_stop()`, following `amaas fleet scale N` (the scale file) meanwhile."""
        handled = (_read(self.folder / SCALE_FILE) or {}).get("id")
        while not should_stop():
            if self._error is not None:
                raise FleetError(f"the fleet's supervisor failed: {self._error}")
            request = _read(self.folder / SCALE_FILE)
            if request and request.get("id") != handled:
                handled = request["id"]
                log.info("fleet: scaling to %d replicas", request["replicas"])
                try:
                    self.scale(int(request["replicas"]))
                except (FleetError, ValueError) as exc:
                    log.error("fleet: scaling to %s failed: %s", request["replicas"], exc)
            time.sleep(POLL_S)

    # -- the supervisor's thread ------------------------------------------------------------------------------------
    def _supervise(self) -> None:
        try:
            self._start_haproxy()
        except BaseException as exc:  # reported to start(), which stops what began
            self._error = exc
            self._started.set()
            return
        self._started.set()
        try:
            while not self._stopping.is_set():
                self._step()
                self._stopping.wait(POLL_S)
        except BaseException as exc:
            log.exception("fleet: the supervisor failed")
            self._error = exc
        finally:
            self._shutdown()  # from this thread: the processes it started outlive it by no more than this

    def _step(self) -> None:
        if self.haproxy is not None and (code := self.haproxy.poll()) is not None:
            raise FleetError(f"HAProxy exited with code {code}: {_tail(self.folder / 'logs' / 'haproxy.log')}")
        with self._lock:
            pending, self._pending = self._pending, []
            replicas = list(self._replicas.values())
        for replica in pending:
            with self._lock:
                if replica.state == "starting":  # not removed before it began
                    self._launch(replica)
        changed = bool(pending)
        now = time.monotonic()
        for replica in replicas:
            if replica.state in ("draining", "stopped") or replica in pending:
                continue
            if replica.state == "restarting":
                if now >= replica.restart_after:
                    with self._lock:  # not if remove() took it meanwhile: its new process would outlive it
                        if replica.state == "restarting":
                            self._launch(replica)
                            changed = True
                continue
            assert replica.process is not None
            code = replica.process.poll()
            late = replica.state == "starting" and now - replica.started_at > self.ready_timeout_s
            if code is not None or late:
                self._lost(replica, code)
                changed = True
            elif replica.state == "starting" and _ready(replica.port):
                with self._lock:  # remove() may have begun meanwhile: its drain must not be undone
                    if replica.state != "starting":
                        continue
                    self.api.set_state(replica.slot, "ready")  # HAProxy's health check takes over from here
                    replica.state, replica.ready_at, replica.failures = "ready", now, 0
                replica.ready.set()
                log.info("fleet: replica %d ready on port %d after %.1f s (start %d)", replica.slot, replica.port,
                         now - replica.started_at, replica.starts)
                changed = True
        if changed:
            self._write_state()

    def _lost(self, replica: Replica, code: int | None) -> None:
        """A replica's process exited (or never got ready): out of HAProxy now, restarted after a backoff."""
        with self._lock:
            if replica.state in ("draining", "stopped"):  # remove() or stop() is stopping it: not to be restarted
                return
            replica.state = "restarting"
        with contextlib.suppress(FleetError, OSError):
            self.api.set_state(replica.slot, "maint")
        replica.ready.clear()
        what = f"exited with code {code}" if code is not None else f"was not ready within {self.ready_timeout_s:.0f} s"
        self._stop_replica(replica, grace_s=0)
        replica.failures += 1
        delay = 0.0 if replica.failures == 1 else min(RESTART_BACKOFF_MAX_S, 2.0 ** (replica.failures - 1))
        replica.restart_after = time.monotonic() + delay
        log.warning("fleet: replica %d (pid %s, port %d) %s: restarting it in %.0f s", replica.slot,
                    replica.process.pid if replica.process else None, replica.port, what, delay)

    def _launch(self, replica: Replica) -> None:
        """Start (or restart) a replica's process on a free port and point its slot at it (still in maintenance)."""
        replica.port = _free_port()
        replica.starts += 1
        replica.marker = f"{self.id}/{replica.slot}/{replica.starts}"
        replica.folder.mkdir(parents=True, exist_ok=True)
        env = {**self.env, MARKER_ENV: replica.marker, SERVER_ID_ENV: f"fleet-{self.id}-{replica.slot}-"
               f"{replica.starts}"}
        replica.process = _spawn(self.command(replica.port), env, replica.folder, self._log_path(replica.slot))
        replica.state, replica.started_at = "starting", time.monotonic()
        self.api.set_addr(replica.slot, replica.port)
        log.info("fleet: replica %d starting on port %d (pid %d)", replica.slot, replica.port, replica.process.pid)

    def _start_haproxy(self) -> None:
        binary = haproxy_binary()
        if binary is None:
            raise FleetError("HAProxy is not installed (apt-get install haproxy)")
        config = self.folder / "haproxy.cfg"
        write_text(config, haproxy_config(self.host, self.port, self.folder, self.slots, self.server_timeout_s,
                                          self.drain_s))
        checked = subprocess.run([binary, "-c", "-q", "-f", str(config)], capture_output=True, text=True,
                                 check=False)
        if checked.returncode != 0:
            raise FleetError(f"HAProxy refused {config}: {checked.stdout}{checked.stderr}")
        with contextlib.suppress(FileNotFoundError):
            (self.folder / "haproxy.sock").unlink()  # left by a fleet that was killed
        self.haproxy = _spawn([binary, "-db", "-f", str(config)], self.env, self.folder,
                              self.folder / "logs" / "haproxy.log")
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                self.api.command("show info")
                break
            if self.haproxy.poll() is not None or time.monotonic() > deadline:
                raise FleetError(f"HAProxy did not start: {_tail(self.folder / 'logs' / 'haproxy.log')}")
            time.sleep(0.05)
        log.info("fleet: HAProxy (pid %d) on %s", self.haproxy.pid, self.url)

    def _shutdown(self) -> None:
        """HAProxy stops listening and finishes what it holds, then every replica gets SIGTERM (at once)."""
        if self.haproxy is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.haproxy.pid, signal.SIGUSR1)  # soft stop: no new connection, finish those open
            try:
                self.haproxy.wait(self.drain_s + 5)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait()
            self.haproxy = None
        with self._lock:
            replicas = list(self._replicas.values())
            for replica in replicas:
                replica.state = "stopped"
        for replica in replicas:
            if replica.process is not None and replica.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(replica.process.pid, signal.SIGTERM)
        for replica in replicas:
            self._stop_replica(replica)
        with self._lock:
            self._replicas.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.folder / STATE_FILE).unlink()

    # -- helpers ----------------------------------------------------------------------------------------------------
    def _reserve(self) -> Replica:
        """A new replica in the lowest free slot, in an empty folder; the supervisor's thread starts it."""
        with self._lock:
            if self._stopping.is_set():
                raise FleetError("the fleet is stopping")
            free = [s for s in range(1, self.slots + 1) if s not in self._replicas]
            if not free:
                raise FleetError(f"all {self.slots} slots are taken")
            replica = Replica(free[0], self.folder / f"replica-{free[0]}")
            shutil.rmtree(replica.folder, ignore_errors=True)  # a new replica shares no file with an old one
            self._replicas[replica.slot] = replica
            self._pending.append(replica)
        return replica

    def _stop_replica(self, replica: Replica, grace_s: float | None = None) -> None:
        """SIGTERM to the replica's process group (it drains), then SIGKILL to whatever of it is left."""
        process = replica.process
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(self.drain_s + 5 if grace_s is None else grace_s)
            except subprocess.TimeoutExpired:
                if grace_s != 0:
                    log.warning("fleet: replica %d did not stop: killing it", replica.slot)
        for pid in _marked(replica.marker):  # the server and workers `amaas serve` started, wherever they are
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def _claim_folder(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        other = _read(self.folder / STATE_FILE)
        if other and _supervisor_alive(other) and other.get("supervisor_pid") != os.getpid():
            raise FleetError(f"a fleet runs in {self.folder} already (pid {other['supervisor_pid']}, "
                             f"{other.get('url')}): stop it first, or `amaas fleet scale N` it")
        (self.folder / "logs").mkdir(exist_ok=True)

    def _log_path(self, slot: int) -> Path:
        return self.folder / "logs" / f"replica-{slot}.log"

    def _write_state(self) -> None:
        with self._lock:
            replicas = [r.describe() for r in sorted(self._replicas.values(), key=lambda r: r.slot)]
        with contextlib.suppress(OSError):
            write_json(self.folder / STATE_FILE, {
                "supervisor_pid": os.getpid(), "url": self.url, "socket": str(self.api.path),
                "replicas": replicas, "at": datetime.now(UTC).isoformat(timespec="seconds")})


def request_scale(folder: Path, replicas: int) -> dict[str, Any]:
    """Ask the fleet running in `folder` for `replicas` replicas (it polls the scale file); its state."""
    state = running_fleet(folder)
    if state is None:
        raise FleetError(f"no fleet runs in {folder}: start one with `amaas fleet --replicas N`")
    write_json(folder / SCALE_FILE, {"replicas": replicas, "id": uuid.uuid4().hex,
                                     "at": datetime.now(UTC).isoformat(timespec="seconds")})
    return state


def running_fleet(folder: Path) -> dict[str, Any] | None:
    """The state of the fleet running in `folder`, or None."""
    state = _read(folder / STATE_FILE)
    return state if state and _supervisor_alive(state) else None


def _supervisor_alive(state: dict[str, Any]) -> bool:
    pid = state.get("supervisor_pid")
    return isinstance(pid, int) and pid > 0 and alive(pid)  # os.kill(0, 0) would ask about our process group


def project_replica(root: Path, params: Path) -> ReplicaCommand:
    """Replicas of one project on this machine: `amaas --root ROOT --params PARAMS serve` (its keys, registry and
    prediction log are the project's files, shared through the disk)."""
    return lambda port: [*amaas_command(), "--root", str(root), "--params", str(params), "serve", "--host",
                         REPLICA_HOST, "--port", str(port)]


def prepare_project(root: Path, params: Path) -> str:
    """Build the champion's bento once, before project replicas start (each would build it at once otherwise, and
    all but one fail on the BentoML store); its tag."""
    from pipelines.config import Paths, load_settings
    from pipelines.registry import Registry, RegistryError
    from pipelines.serving.bento import ensure_bento

    paths = Paths(root)
    registry = Registry(paths.registry)
    if registry.champion is None:
        raise RegistryError("no champion to serve yet: run `amaas run` (or `dvc repro`) first")
    tag: str = ensure_bento(load_settings(params), paths, registry.champion_dir())["bento_tag"]
    return tag


def state_replica() -> ReplicaCommand:
    """Replicas that need nothing but their environment (AMAAS_STATE_URL, AMAAS_REDIS_URL, AMAAS_ARTIFACTS_URL):
    `amaas serve` in an empty folder, which is its root (`--root .`: not an $AMAAS_ROOT the supervisor inherited)."""
    return lambda port: [*amaas_command(), "--root", ".", "serve", "--host", REPLICA_HOST, "--port", str(port)]


def amaas_command() -> list[str]:
    """The `amaas` console script of this environment (or the module, where it has none)."""
    script = Path(sys.executable).parent / "amaas"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pipelines.cli"]


def _spawn(cmd: list[str], env: dict[str, str], cwd: Path, output: Path) -> subprocess.Popen[bytes]:
    """A process in its own process group, in `cwd`, output appended to `output`, gone when we are."""
    from pipelines.cli import _die_with_parent

    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("ab") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,  # noqa: S603
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)


def _marked(marker: str) -> list[int]:
    """The pids of the processes whose environment carries MARKER_ENV=marker (a replica start's processes)."""
    import psutil

    if not marker:
        return []
    found = []
    for process in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error):
            if process.environ().get(MARKER_ENV) == marker:
                found.append(process.pid)
    return found


def _ready(port: int) -> bool:
    conn = http.client.HTTPConnection(REPLICA_HOST, port, timeout=1)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()




def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = read_json(path)
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""
