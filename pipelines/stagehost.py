"""Stage commands run from a preloaded process: a pipeline run pays Python's start and the libraries' imports
once, not once per stage.

Under `dvc repro` every stage is a command of its own (`amaas <stage>`), and each one starts Python and imports
what its stage needs: Great Expectations, Evidently, torch, LightGBM, XGBoost, scikit-learn. On a small table
that is most of the run (15-18 s of a 42 s pipeline of 5,000 rows on 2 cores). So the first stage command that
finds no host starts one in the background and runs its stage itself, as before; the host imports those
libraries once and listens on a Unix socket. Each later stage command hands the host its arguments, environment,
working folder, umask and standard streams; the host forks a process from its preloaded state to run the stage
exactly as the command would have (pipelines.cli.main), and the command waits for it and exits with its status.

What a user sees does not change: the stage's output and logs go to the command's own streams, its exit status
is the command's (a stage killed by a signal kills the command by the same signal), Ctrl-C and other signals
sent to the command reach the stage, and a command killed outright (SIGKILL) takes its stage down with it, so the
project lock is released as a killed stage process would release it. A stage never runs twice: the host runs it
only once the command has confirmed it is still waiting.

A host serves one interpreter, one copy of the code and one environment: its address is a digest of the Python
executable and its search path, the modification times of the project's code and of the installed packages'
folders, the user, and the environment (less the variables that differ from one stage command to the next and
are read when the stage runs: DVC's and Airflow's per-task ones, pytest's current test). So an edit to the code,
an upgraded package or a changed setting of the environment gets a new host, and an old one exits after
IDLE_S seconds with nothing to do (or LIFETIME_S in all). A host preloads with OMP_WAIT_POLICY=PASSIVE unless the
environment sets it: idle OpenMP threads sleep rather than spin, as compress needs to time models the way they
serve (pipelines.runner.serve_like_openmp) and as measured no slower for training on 2 cores.

AMAAS_STAGE_HOST=0 (or off, false, no) runs every stage command in a process of its own. So does a command run
with interpreter options (-X, -W, -O: a profiler's run, say), and everywhere but Linux (the socket is in Linux's
abstract namespace: nothing on disk to clean up, and only the user's own processes are served or trusted).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib
import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

SWITCH = "AMAAS_STAGE_HOST"
USAGE_ENV = "AMAAS_STAGE_USAGE"  # a file a stage command writes its stage process's resource use to (benchmarks)
OFF = frozenset({"0", "off", "false", "no"})
IDLE_S = 60.0  # a host with no stage running, and none asked for in this long, exits
LIFETIME_S = 3600.0  # a host takes no new stage after this long, so an old one never lingers
READY_WAIT_S = 120.0  # a command waits this long for the host to take its stage up (its preload), then runs it
# Variables that differ between the stage commands of one pipeline run and are read when the stage runs, not
# when a library is imported: left out of the host's digest (names, and prefixes ending in "_").
PER_COMMAND_ENV = ("PWD", "OLDPWD", "SHLVL", "_", USAGE_ENV, "DVC_", "AIRFLOW_CTX_", "PYTEST_")
# What the stages import, in the order they need it: validate's Great Expectations first, then the learners of
# train, evaluate and compress. The host takes a command between one module and the next, so a stage that comes
# during the preload waits only for what comes before it (a stage process imports what its host lacks).
# bentoml is not here: it reads its settings (BENTOML_HOME) when imported; only package needs it.
PRELOAD = ("pipelines.cli", "great_expectations", "pipelines.stages.collect", "pipelines.stages.validate",
           "pipelines.stages.prepare", "sklearn.metrics", "scipy.stats", "torch", "lightgbm", "xgboost",
           "pipelines.models.ensemble", "pipelines.models.gbm", "pipelines.models.mlp", "pipelines.bundle",
           "pipelines.metrics", "pipelines.stages.train", "pipelines.stages.evaluate", "pipelines.compression",
           "pipelines.stages.compress", "pipelines.explain")
# What report needs, imported by a successor forked from the host once PRELOAD is in: Evidently alone takes
# seconds to import, and a host busy with it could take no command meanwhile (train would wait for it). The host
# serves until its successor has imported these, then hands over to it and ends.
LATE_PRELOAD = ("evidently", "pipelines.stages.report", "pipelines.stages.package", "pipelines.stages.promote",
                "pipelines.stages.deploy")
CODE_ROOT = Path(__file__).resolve().parent
STREAMS = (0, 1, 2)
# messages from the host: ready, run it yourself, the stage's end; from the command: go, a signal
READY, INLINE, END, GO, SIGNAL = b"R", b"I", b"E", b"G", b"S"
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
PRELOADED: dict[str, Any] = {}  # the host's pid and what its preload cost: each stage's end reports them
_in_host = [False]  # True in a stage process the host forked: its command never delegates again


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    return (sys.platform == "linux" and environ.get(SWITCH, "1").strip().lower() not in OFF and not _in_host[0]
            and not (sys.warnoptions or sys._xoptions or sys.flags.optimize or sys.flags.dev_mode))


def digest(environ: Mapping[str, str]) -> str:
    """What a host must share with a command to run its stage: see the module's docstring."""
    h = hashlib.sha256()
    env = {k: v for k, v in environ.items()
           if not any(k == p or (p.endswith("_") and k.startswith(p)) for p in PER_COMMAND_ENV)}
    h.update(json.dumps([sys.executable, sys.version, sys.path, os.getuid(), sorted(env.items())]).encode())
    for folder in sys.path:  # a package installed or removed touches its folder
        if folder.endswith(("site-packages", "dist-packages")) and os.path.isdir(folder):
            h.update(f"{folder}:{os.stat(folder).st_mtime_ns}".encode())
    for path in sorted(CODE_ROOT.rglob("*.py")):
        st = path.stat()
        h.update(f"{path}:{st.st_mtime_ns}:{st.st_size}".encode())
    return h.hexdigest()[:40]


def address(key: str) -> bytes:
    return b"\0amaas-stagehost-" + key.encode()


def log_path(key: str) -> Path:
    """The host's own log: when it started, what its preload cost, each stage it ran, why it ended."""
    folder = Path(tempfile.gettempdir()) / f"amaas-stagehost-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(folder)  # a shared temp folder: only a folder of our own that nobody else may write to
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return Path(os.devnull)
    return folder / f"{key}.log"


# --- the command's side --------------------------------------------------------------------------------------

def delegate(stage: str, argv: list[str]) -> int | None:
    """Run the command of `stage`, `argv` (the arguments after the program's name), in the host: its exit status, or
    None where the command runs the stage itself (no host yet: one is started for the next command; host off)."""
    if not enabled():
        return None
    key = digest(os.environ)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address(key))
    except OSError:  # none listening: start one for the commands that follow
        sock.close()
        with contextlib.suppress(OSError):  # no host (an unwritable temp folder, say): the stage runs here anyway
            _start_host(key)
        return None
    with sock:
        if _peer_uid(sock) != os.getuid():  # only a host of our own user runs our stages
            return None
        return _run_in_host(sock, stage, argv)


def _start_host(key: str) -> None:
    """A host in the background, in a session of its own, with this command's search path (so it imports this
    copy of the code, wherever the command found it) and environment."""
    with open(log_path(key), "ab") as log, open(os.devnull, "rb") as null:
        subprocess.Popen([sys.executable, "-c", HOST_MAIN, key, json.dumps(sys.path), str(CODE_ROOT)],
                         stdin=null, stdout=log, stderr=log, cwd="/", start_new_session=True, close_fds=True,
                         env={**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})


def _run_in_host(sock: socket.socket, stage: str, argv: list[str]) -> int | None:
    """The stage's exit status once it ran in the host; None where the host did not take it up (so the command
    runs it itself): it could not, it is still preloading after READY_WAIT_S, or anything failed before GO."""
    try:
        if not _offered(sock, stage, argv):
            return None
        previous = {sig: signal.signal(sig, lambda signum, _frame: _forward(sock, signum))
                    for sig in FORWARDED_SIGNALS}
        sock.sendall(GO)
    except OSError:  # a folder gone, the host gone, a timeout (TimeoutError): nothing ran
        return None
    try:
        end = _receive_all(sock, 1 + 4)  # END and the length of the JSON that follows
        ended = end[:1] == END and len(end) == 5
        result = json.loads(_receive_all(sock, struct.unpack("!I", end[1:])[0])) if ended else None
    except OSError:
        result = None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if result is None:
        print("amaas: error: the stage host went away before the stage ended", file=sys.stderr)
        return 1
    if target := os.environ.get(USAGE_ENV):
        Path(target).write_text(json.dumps({**result, "hosted": True}))
    if result["signal"]:  # die as the stage did, so whoever started the command sees the same
        signal.signal(result["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), result["signal"])
        return 128 + int(result["signal"])
    return int(result["code"])


def _offered(sock: socket.socket, stage: str, argv: list[str]) -> bool:
    """Hand the host the command (argv, folder, environment, umask, streams); whether it is ready to run it."""
    request = json.dumps({"stage": stage, "argv": [sys.argv[0], *argv], "cwd": os.getcwd(), "env": dict(os.environ),
                          "umask": _umask()}).encode()
    with _streams() as fds:
        socket.send_fds(sock, [struct.pack("!I", len(request))], fds)
    sock.sendall(request)
    sock.settimeout(READY_WAIT_S)  # the preload of what comes before this stage's libraries, at most
    answer = sock.recv(1)  # READY; INLINE: the host cannot run stages; nothing: it went away
    sock.settimeout(None)
    return answer == READY


def _forward(sock: socket.socket, signum: int) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(SIGNAL + bytes([signum]))


@contextlib.contextmanager
def _streams() -> Iterator[list[int]]:
    """The command's stdin, stdout and stderr; /dev/null for any it was started without."""
    opened: list[int] = []
    fds = []
    for fd in STREAMS:
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            opened.append(os.open(os.devnull, os.O_RDWR))
            fds.append(opened[-1])
    try:
        yield fds
    finally:
        for fd in opened:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _receive_all(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


# --- the host's side -----------------------------------------------------------------------------------------

HOST_MAIN = ("import json, sys; sys.path[:] = json.loads(sys.argv[2]); from pipelines import stagehost; "
             "sys.exit(stagehost.serve(sys.argv[1], sys.argv[3]))")


def serve(key: str, code_root: str) -> int:
    """Listen at the address of `key`, preload, and run each command's stage in a process forked for it, until
    idle. A second host for the same key finds the address taken and leaves at once."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(address(key))  # taken at once: commands that come during the preload wait for it
    except OSError:
        return 0
    listener.listen(64)
    refusal = None if Path(code_root) == CODE_ROOT else f"host imported {CODE_ROOT}, not the command's {code_root}"
    try:  # a supervisor waits on its stage through a pidfd (Linux 5.3)
        os.close(os.pidfd_open(os.getpid()))
    except OSError as exc:
        refusal = f"no pidfd here ({exc})"
    if refusal:
        _note(f"{refusal}: commands run their stages themselves")
    refusal = _Host(listener, refusal).run()
    if refusal is None and (log := log_path(key)) != Path(os.devnull):  # nothing went wrong: nothing to keep
        log.unlink(missing_ok=True)
    return 0


class _Host:
    """The host's loop: take commands, import PRELOAD between them, then fork the successor that imports
    LATE_PRELOAD and hand over to it once it has; end when idle (or, handed over, when its stages are done)."""

    def __init__(self, listener: socket.socket, refusal: str | None) -> None:
        self.listener, self.refusal = listener, refusal
        self.to_load = [] if refusal else list(PRELOAD)
        self.late = [] if refusal else list(LATE_PRELOAD)
        self.started = self.last = time.monotonic()
        self.wall, self.cpu, self.cpu_before = time.perf_counter(), time.process_time(), 0.0
        self.supervisors: set[int] = set()
        self.forked: set[int] = set()  # a successor: reaped, not waited for
        self.successor: int | None = None  # the read end of a pipe: a byte once the successor has its imports
        self.announce: int | None = None  # in a successor: that pipe's write end
        self.handed_over = False
        PRELOADED.update(host_pid=os.getpid(), preloaded=False)

    def run(self) -> str | None:
        while not self._done():
            if not self.to_load and self.late and self.successor is None and self.refusal is None:
                self._fork_successor()
            taking = self.announce is None  # a successor takes commands once it has its imports
            watched = [f for f in (self.listener.fileno() if taking else -1, self.successor)
                       if f is not None and f >= 0]
            ready = select.select(watched, [], [], 0 if self.to_load else 1.0)[0] if watched else []
            if self.successor is not None and self.successor in ready:
                if os.read(self.successor, 1):  # the successor has its imports: it takes the commands from now on
                    self.handed_over = True
                    self.listener.close()
                    _note(f"handed over to a successor after {time.monotonic() - self.started:.0f} s")
                os.close(self.successor)  # (nothing read: it died, and this host goes on without its imports)
                self.successor = None
            elif taking and self.listener.fileno() in ready:
                self.last = time.monotonic()
                if (pid := _take(self.listener, self.refusal)) is not None:
                    self.supervisors.add(pid)
            elif self.to_load:
                self._load(self.to_load.pop(0))
            elif not watched:
                time.sleep(1.0)
        if not self.handed_over:
            _note(f"exits after {time.monotonic() - self.started:.0f} s")
        return self.refusal

    def _done(self) -> bool:
        self.supervisors -= _reaped(self.supervisors)
        self.forked -= _reaped(self.forked)
        if self.handed_over:
            return not self.supervisors
        now = time.monotonic()
        if now - self.started > LIFETIME_S and self.listener.fileno() >= 0:
            self.listener.close()  # the next command starts a fresh host; this one finishes what it runs
        busy = self.supervisors or self.to_load or self.successor is not None
        return not busy and (now - self.last > IDLE_S or now - self.started > LIFETIME_S)

    def _fork_successor(self) -> None:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid:  # this host serves on; the successor is reaped with the supervisors
            os.close(write_end)
            self.successor, self.late = read_end, []
            self.forked.add(pid)
            return
        os.close(read_end)  # the successor: imports LATE_PRELOAD, then says so and serves
        self.to_load, self.late, self.announce, self.supervisors, self.forked = self.late, [], write_end, set(), set()
        self.cpu_before, self.cpu = PRELOADED.get("preload_cpu_s", 0.0), time.process_time()
        PRELOADED.update(host_pid=os.getpid())

    def _load(self, module: str) -> None:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken environment: commands run their stages themselves, as without a host
            self.refusal, self.to_load = f"preload failed: {exc!r}", []
        if self.to_load:
            return
        PRELOADED.update(preloaded=self.refusal is None, preload_s=round(time.perf_counter() - self.wall, 3),
                         preload_cpu_s=round(self.cpu_before + time.process_time() - self.cpu, 3))
        _note(self.refusal or f"preloaded in {PRELOADED['preload_s']:.2f} s ({PRELOADED['preload_cpu_s']:.2f} CPU "
                              f"s), {len(sys.modules)} modules")
        if self.announce is not None:  # a successor: take over, or leave it all to the host that forked it
            if self.refusal is None:
                os.write(self.announce, b"1")
            else:
                self.handed_over = True
                self.listener.close()
            os.close(self.announce)
            self.announce = None


def _take(listener: socket.socket, refusal: str | None) -> int | None:
    """Accept one command and fork the supervisor of its stage; the supervisor's pid (None: not our user's)."""
    conn, _ = listener.accept()
    with conn:
        if _peer_uid(conn) != os.getuid():
            return None
        pid = os.fork()
        if pid == 0:  # the supervisor of this command's stage
            listener.close()
            code = 1
            try:
                code = _supervise(conn, refusal)
            finally:
                os._exit(code)
    return pid


def _reaped(pids: set[int]) -> set[int]:
    done = set()
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0]:
                done.add(pid)
    return done


def _supervise(conn: socket.socket, refusal: str | None) -> int:
    """Run one command's stage in a process of its own: forward the command's signals to it, kill it if the
    command dies, and send the command its end (exit code or signal, CPU seconds, peak memory)."""
    header, fds, _flags, _addr = socket.recv_fds(conn, 4, len(STREAMS))
    if len(header) != 4 or len(fds) != len(STREAMS):
        return 1
    request = json.loads(_receive_all(conn, struct.unpack("!I", header)[0]))
    conn.sendall(INLINE if refusal else READY)
    if refusal or _receive_all(conn, 1) != GO:  # refused, or the command stopped waiting and runs it itself
        return 0
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run_stage(request, fds)
    with contextlib.suppress(OSError):  # here too (the stage does it first thing): signals may come before it runs
        os.setpgid(pid, pid)
    for fd in fds:
        os.close(fd)
    _note(f"pid {pid}: {' '.join(request['argv'][1:])}")
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if pidfd in ready:
            break
        try:
            message = conn.recv(2)
        except OSError:
            message = b""
        if message[:1] == SIGNAL and len(message) == 2:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, message[1])
        elif not message:  # the command is gone (killed): so is its stage, and whatever the stage started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            poller.unregister(conn)
    _, status, usage = os.wait4(pid, 0)
    end = json.dumps({"code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                      "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                      "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024,
                      "host": PRELOADED}).encode()
    with contextlib.suppress(OSError):
        conn.sendall(END + struct.pack("!I", len(end)) + end)
    return 0


def _run_stage(request: dict[str, Any], fds: list[int]) -> NoReturn:
    """In the forked stage process: become the command (its streams, folder, umask, environment, argv) and run
    it as pipelines.cli would, then exit with its status."""
    os.setpgid(0, 0)  # a group of its own: a signal forwarded to the stage reaches what it started too
    with contextlib.suppress(OSError):  # what top and ps -o comm show: the stage, not the host's command line
        Path("/proc/self/comm").write_text(f"amaas {request['stage']}"[:15])
    for target, fd in zip(STREAMS, fds, strict=True):
        os.dup2(fd, target)
    for fd in set(fds) - set(STREAMS):
        os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = request["argv"]
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=stream.isatty())  # type: ignore[union-attr]
    _in_host[0] = True
    code: Any = 1
    try:
        from pipelines.cli import main

        code = main(request["argv"][1:])
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:
        traceback.print_exc()
        _finish()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback, exit status 1
        traceback.print_exc()
        code = 1
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    _finish()
    os._exit(code or 0)


def _finish() -> None:
    """What the interpreter does at exit that matters here: its exit hooks (logging's flush among them)."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _note(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [{os.getpid()}] {message}", file=sys.stderr, flush=True)


