"""BentoML plumbing shared by package, serve and tests: store location and names."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipelines.config import Paths

MODEL_NAME = "amaas"
SERVICE_NAME = "amaas_service"
CODE_ROOT = Path(__file__).resolve().parent.parent  # holds bentos/ and pipelines/: the bento build context
BENTOFILE = CODE_ROOT / "bentos" / "bentofile.yaml"


def use_project_home(paths: Paths) -> Path:
    """Point BentoML's store at <root>/.bentoml; must happen before bentoml is imported."""
    home = paths.bentoml_home
    current = os.environ.get("BENTOML_HOME")
    if "bentoml" in sys.modules and current and Path(current).resolve() != home.resolve():
        raise RuntimeError(f"bentoml is already using store {current}; cannot switch to {home} in this process")
    home.mkdir(parents=True, exist_ok=True)
    os.environ["BENTOML_HOME"] = str(home)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")  # no usage analytics from a pipeline run
    return home


def model_tag(version: str) -> str:
    return f"{MODEL_NAME}:{version}"


def bento_tag(version: str) -> str:
    return f"{SERVICE_NAME}:{version}"
