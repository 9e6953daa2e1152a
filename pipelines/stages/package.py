"""package: save the challenger into the BentoML model store and build its bento."""

from __future__ import annotations

import logging
from typing import Any

from pipelines.config import Paths, Settings
from pipelines.contracts import Out, stage
from pipelines.io import write_json
from pipelines.serving.bento import ensure_bento, publish_bento

log = logging.getLogger(__name__)


@stage(
    params=("serve",),
    runtime=("state",),  # with an artifacts store, the bento goes there too (replicas fetch it)
    deps=("challenger",),
    extra_code=("bentos", "pipelines"),  # the bento carries this code: a change rebuilds it
    outs=(Out("package_record", cache=False),),
    atomic_outs=True,  # each written to a temp file or folder and renamed: DVC need not delete them first
    description="The challenger into the BentoML model store, and its bento",
)
def run(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Model `amaas:<version>` and bento `amaas_service:<version>-<code>` of the challenger (each built once)."""
    summary = ensure_bento(settings, paths, paths.challenger)
    summary |= publish_bento(settings, paths, paths.challenger, summary["bento_tag"])
    write_json(paths.package_record, summary)
    return summary


