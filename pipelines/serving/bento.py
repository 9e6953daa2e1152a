"""BentoML plumbing shared by package, serve and tests: store location and names."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipelines.config import Paths, Settings
from pipelines.io import read_json
from pipelines.registry import MONITORING_DIR
from pipelines.state import shared
from pipelines.state.artifacts import put_bento

log = logging.getLogger(__name__)
MODEL_NAME = "amaas"
SERVICE_NAME = "amaas_service"
CODE_ROOT = Path(__file__).resolve().parents[2]  # holds bentos/ and pipelines/: the bento build context
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


def ensure_bento(settings: Settings, paths: Paths, bundle_dir: Path) -> dict[str, Any]:
    """The model in the BentoML store and a bento of it with the current code, built if missing."""
    use_project_home(paths)
    import bentoml

    metadata = read_json(bundle_dir / "metadata.json")
    version = metadata["version"]
    try:
        model = bentoml.models.get(model_tag(version))
    except bentoml.exceptions.NotFound:
        with bentoml.models.create(
            model_tag(version),
            labels={"ensemble": metadata["ensemble"], "data_md5": metadata["data_md5"]},
            metadata={k: metadata[k] for k in ("learners", "weights", "device", "git_commit", "seed")
                      if metadata.get(k) is not None},
        ) as model:
            shutil.copytree(bundle_dir, model.path, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(MONITORING_DIR))  # the server needs the model only
    args = bento_args(settings, version)
    tag = bento_tag(version, args)
    try:
        bento = bentoml.get(tag)
    except bentoml.exceptions.NotFound:
        with tempfile.TemporaryDirectory(prefix="amaas-bento-") as tmp:
            context = build_context(Path(tmp))
            bento = bentoml.bentos.build_bentofile(str(context / BENTOFILE.relative_to(CODE_ROOT)),
                                                   build_ctx=str(context), version=tag.split(":", 1)[1], args=args)
        log.info("packaged model %s into bento %s", model.tag, bento.tag)
    return {"version": version, "model_tag": str(model.tag), "bento_tag": str(bento.tag),
            "bentoml_home": str(paths.bentoml_home)}


def publish_bento(settings: Settings, paths: Paths, bundle_dir: Path, bento_tag: str) -> dict[str, Any]:
    """With an artifacts store (state.artifacts_url), put bento `bento_tag` of the bundle there and, with a state
    database, record it as its version's bento, which replicas fetch when it becomes champion: {"artifact": where}
    or {} on one host."""
    store = shared(settings, paths)
    if store.cfg.artifacts_url is None:
        return {}
    where = put_bento(store.cfg.artifacts_url, bento_tag)
    if store.registry_store is not None:
        metadata = read_json(bundle_dir / "metadata.json")
        store.registry_store.put_version(str(metadata["version"]), metadata, bento_tag)
    return {"artifact": where}


def build_context(folder: Path) -> Path:
    """A copy of just what the bento carries, to build from.

    BentoML walks its whole build context before filtering, so building from the repository would walk
    .venv, and a store inside it (.bentoml/, where `make run` keeps it) would copy itself into itself."""
    for part in ("bentos", "pipelines"):
        shutil.copytree(CODE_ROOT / part, folder / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(CODE_ROOT / "params.yaml", folder / "params.yaml")
    return folder
