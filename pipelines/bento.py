"""BentoML plumbing shared by package, serve and tests: store location and names."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipelines.config import Paths, Settings

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


def bento_args(settings: Settings, version: str) -> dict[str, Any]:
    """The arguments baked into a bento: the model and the serving settings that batching needs at import.
    (The label cut-off travels in the model bundle, chosen at training.)"""
    serve = settings.serve
    return {"model_tag": model_tag(version), "batching": serve.batching, "max_batch_size": serve.max_batch_size,
            "max_latency_ms": serve.max_latency_ms}


def bento_tag(version: str, args: dict[str, Any]) -> str:
    """`amaas_service:<model version>-<hash of the code and args it carries>`: a change of either builds anew."""
    digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode())
    for path in sorted([BENTOFILE, CODE_ROOT / "bentos" / "service.py", *(CODE_ROOT / "pipelines").rglob("*.py")]):
        digest.update(path.relative_to(CODE_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{SERVICE_NAME}:{version}-{digest.hexdigest()[:8]}"
