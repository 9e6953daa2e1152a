"""Lineage facts recorded with every model version: data hash and code commit."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pipelines.io import file_digest


def md5_of(path: Path) -> str:
    """The md5 DVC records for a file, so a model can be traced to a DVC data version."""
    return file_digest(path, "md5")


def git_commit(root: Path) -> str | None:
    """HEAD of the project's git repo, with '-dirty' when tracked files changed; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
