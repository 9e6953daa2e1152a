"""Version what an orchestrator run produced with DVC: dvc.lock, the DVC cache and the remote.

`dvc repro` versions its own runs. An Airflow task calls the stage function directly (the same call),
so after the stages the DAG runs `dvc commit` (the outputs as they are now go into the cache and
dvc.lock) and `dvc push` (to the configured remote): a later `dvc repro` then skips what Airflow
already did, and `dvc pull` on another machine gets the same data and models.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class VersioningError(RuntimeError):
    """dvc commit or dvc push failed."""


def record(root: Path, stages: tuple[str, ...] = ()) -> dict[str, Any]:
    """`dvc commit` and `dvc push` the outputs of `stages` (all when empty) of the project at `root`."""
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        log.info("%s is not a DVC project (no .dvc/ or dvc.yaml): outputs are not versioned", root)
        return {"versioned": False, "reason": "not a DVC project"}
    dvc = str(Path(sys.executable).with_name("dvc"))
    for command in (["commit", "--force", *stages], ["push", *stages]):
        proc = subprocess.run([dvc, *command], cwd=root, capture_output=True, text=True)
        if proc.returncode != 0:
            raise VersioningError(f"`dvc {' '.join(command)}` failed in {root}: {proc.stderr.strip()[-2000:]}; "
                                  f"fix the DVC remote (`dvc remote list`) and rerun this task")
        log.info("dvc %s: %s", command[0], proc.stdout.strip().splitlines()[-1:] or "done")
    return {"versioned": True, "stages": list(stages) or "all"}
