"""A throwaway project for a benchmark: the given params.yaml, its own folder, the stages already run."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from pipelines.runner import STAGES, run_stage


@contextlib.contextmanager
def trained_project(params_file: str, prefix: str, stages: tuple[str, ...] = STAGES,
                    overrides: dict[str, Any] | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield (root, params) of a temporary project after running `stages` on it; removed afterwards.
    `overrides` are merged into the params, section by section."""
    params = yaml.safe_load(Path(params_file).read_text())
    params["validate"]["expectations_file"] = None  # this project's own expectations file is not there
    _merge(params, overrides or {})
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        root = Path(tmp)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        for stage in stages:
            run_stage(stage, root / "params.yaml", root)
        yield root, params


def _merge(params: dict[str, Any], overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(params.get(key), dict):
            _merge(params[key], value)
        else:
            params[key] = value
