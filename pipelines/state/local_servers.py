"""Throwaway PostgreSQL and Redis servers on 127.0.0.1, from Debian's `postgresql` and `redis-server` packages:
for trying a fleet on one machine (`amaas fleet --local-state`), the tests and the benchmarks. Nothing is kept:
the data folders are removed when the servers stop. Production points $AMAAS_STATE_URL and $AMAAS_REDIS_URL at
servers of its own."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

START_TIMEOUT_S = 60.0


class ServerMissing(RuntimeError):
    """A server program is not installed."""


def binary(name: str, package: str, also: str | None = None) -> str:
    """The path of program `name` (or the newest match of the glob `also`); ServerMissing names the package."""
    found = shutil.which(name)
    if found is None and also:
        found = next(iter(sorted(glob.glob(also))[-1:]), None)
    if found is None:
        raise ServerMissing(f"{name} not found: install Debian's {package} package (apt-get install {package})")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait(ready: Callable[[], bool], server: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.2)


def _stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@contextlib.contextmanager
def postgres(durable: bool = False) -> Iterator[str]:
    """A PostgreSQL server of its own; yields its URL (user postgres, trust on 127.0.0.1). `durable` False turns
    fsync off (tests); True keeps PostgreSQL's defaults (benchmarks that measure what a commit costs)."""
    bin_dir = Path(binary("initdb", "postgresql", also="/usr/lib/postgresql/*/bin/initdb")).parent
    # initdb and postgres refuse to run as root: run them as the postgres user the Debian package creates, in a
    # folder of /tmp that user can reach
    data = Path(tempfile.mkdtemp(prefix="amaas-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(data, "postgres")
    port = free_port()
    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E",
                        "UTF8"], check=True, capture_output=True)
        server = subprocess.Popen([*as_user, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k",
                                   str(data), "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200",
                                   *([] if durable else ["-c", "fsync=off"])],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import psycopg

        def accepts_logins() -> bool:
            try:
                psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                                connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                return False

        try:
            _wait(accepts_logins, server, "PostgreSQL")
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        finally:
            _stop(server)
    finally:
        shutil.rmtree(data, ignore_errors=True)


@contextlib.contextmanager
def redis() -> Iterator[str]:
    """A Redis server of its own, nothing persisted; yields its URL."""
    program = binary("redis-server", "redis-server")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="amaas-redis-") as folder:
        server = subprocess.Popen([program, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                   "no", "--dir", folder], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def pongs() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    return conn.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        try:
            _wait(pongs, server, "Redis")
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            _stop(server)
