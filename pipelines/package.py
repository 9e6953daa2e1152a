"""package: save the challenger into the BentoML model store and build its bento."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipelines.bento import BENTOFILE, CODE_ROOT, bento_args, bento_tag, model_tag, use_project_home
from pipelines.config import Paths, Settings
from pipelines.io import read_json, write_json
from pipelines.registry import MONITORING_DIR

log = logging.getLogger(__name__)


def run(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Model `amaas:<version>` and bento `amaas_service:<version>-<code>` of the challenger (each built once)."""
    summary = ensure_bento(settings, paths, paths.challenger)
    write_json(paths.root / "models" / "package.json", summary)
    return summary


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


def build_context(folder: Path) -> Path:
    """A copy of just what the bento carries, to build from.

    BentoML walks its whole build context before filtering, so building from the repository would walk
    .venv, and a store inside it (.bentoml/, where `make run` keeps it) would copy itself into itself."""
    for part in ("bentos", "pipelines"):
        shutil.copytree(CODE_ROOT / part, folder / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(CODE_ROOT / "params.yaml", folder / "params.yaml")
    return folder
