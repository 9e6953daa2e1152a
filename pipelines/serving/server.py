"""The process of one bento server (`python -m pipelines.serving.server serve BENTO ...`): `bentoml serve`, with
a Prometheus folder of its own.

BentoML's workers keep their request counts in Prometheus' multiprocess files, in one folder per BentoML home
(`<project>/.bentoml/prometheus_multiproc_dir`), and every server start empties that folder. Two servers of one
project (a blue-green backend and the next, `amaas serve` on two ports, a test beside a running server) wiped
each other's files: the running server went on counting into deleted files, and its /metrics lost every series
it had (the dashboards' request and error panels went blank). Here each server process counts in a folder of
its own, `<BentoML home>/amaas-metrics/<pid>`, removed when it ends; the folders of servers that were killed
are removed by the next start.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

METRICS_DIR = "amaas-metrics"


def alive(pid: int) -> bool:
    """Whether process `pid` exists (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def metrics_folder(home: Path, pid: int) -> Path:
    """The Prometheus multiprocess folder of server process `pid` (BentoML creates it empty), after removing
    those of server processes that are gone."""
    parent = home / METRICS_DIR
    parent.mkdir(parents=True, exist_ok=True)
    for folder in parent.iterdir():
        if folder.name.isdigit() and int(folder.name) != pid and not alive(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)
    return parent / str(pid)


def main(argv: list[str]) -> int:
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml_cli.cli import cli

    home = Path(os.environ.get("BENTOML_HOME") or BentoMLContainer.bentoml_home.get())
    folder = metrics_folder(home, os.getpid())
    BentoMLContainer.prometheus_multiproc_dir.set(str(folder))  # what `bentoml serve` empties and hands on
    try:
        cli.main(args=argv, prog_name="bentoml")  # exits (SystemExit) with the server's code
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
