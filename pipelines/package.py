"""package: save the challenger into the BentoML model store and build its bento."""

from __future__ import annotations

import logging
import shutil
from typing import Any

from pipelines.bento import BENTOFILE, CODE_ROOT, bento_tag, model_tag, use_project_home
from pipelines.config import Paths, Settings
from pipelines.io import read_json, write_json

log = logging.getLogger(__name__)


def run(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Model `amaas:<version>` and bento `amaas_service:<version>`; both are skipped if already there."""
    use_project_home(paths)
    import bentoml

    metadata = read_json(paths.challenger / "metadata.json")
    version = metadata["version"]
    try:
        model = bentoml.models.get(model_tag(version))
    except bentoml.exceptions.NotFound:
        with bentoml.models.create(
            model_tag(version),
            labels={"ensemble": metadata["ensemble"], "data_md5": metadata["data_md5"]},
            metadata={k: metadata[k] for k in ("learners", "weights", "device", "git_commit", "seed")
                      if metadata[k] is not None},
        ) as model:
            shutil.copytree(paths.challenger, model.path, dirs_exist_ok=True)
    try:
        bento = bentoml.get(bento_tag(version))
    except bentoml.exceptions.NotFound:
        serve = settings.serve
        bento = bentoml.bentos.build_bentofile(
            str(BENTOFILE),
            build_ctx=str(CODE_ROOT),
            version=version,
            args={"model_tag": str(model.tag), "max_batch_size": serve.max_batch_size,
                  "max_latency_ms": serve.max_latency_ms, "threshold": settings.evaluate.threshold},
        )
    summary = {"version": version, "model_tag": str(model.tag), "bento_tag": str(bento.tag),
               "bentoml_home": str(paths.bentoml_home)}
    write_json(paths.root / "models" / "package.json", summary)
    log.info("packaged model %s into bento %s", model.tag, bento.tag)
    return summary
