"""deploy: put the champion into service, and check that the live service really answers with it.

The champion's bento (model + this code) is built if it is missing. A running `amaas serve` follows the
registry on its own (within serve.reload_interval_s); with `deploy.endpoint` set, this stage polls that
server's GET /models until it serves the champion. If it never does within `deploy.timeout_s`, the
registry goes back to the previous champion (`deploy.rollback_on_failure`), an alert goes out and the
stage fails, so a broken release is never left half in place. models/deployment.json says what is live.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any

from pipelines.alerts import alert
from pipelines.config import Paths, Settings, experiment_name
from pipelines.contracts import Out, stage
from pipelines.io import read_json, write_json
from pipelines.registry import Registry, RegistryError, rollback
from pipelines.serving.bento import ensure_bento

log = logging.getLogger(__name__)


class DeployError(RuntimeError):
    """The live service did not take up the champion."""


@stage(
    params=("deploy", "serve"),
    runtime=("alerts",),
    deps=("registry_aliases",),
    # persist: an experiment (`dvc exp run`) leaves the record of what is live as it is
    outs=(Out("deployment", cache=False, persist=True),),
    description="Put the champion into service and check that the live endpoint answers with it",
)
def run(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Build the champion's bento if needed; with an endpoint, wait until it serves the champion.

    Under `dvc exp run` nothing is deployed and models/deployment.json is left as it is (written only if
    there is none yet, saying so): an experiment never changes what is live."""
    experiment = experiment_name()
    if experiment:
        log.info("experiment %s: nothing deployed", experiment)
        if not paths.deployment.is_file():
            write_json(paths.deployment, {"champion": None, "verified": False,
                                          "reason": f"experiment {experiment}: nothing deployed"})
        return {"experiment": experiment, "deployed": False}
    registry = Registry(paths.registry)
    champion = registry.champion
    if champion is None:
        raise RegistryError("no champion to deploy: run the pipeline up to `amaas promote` first")
    bento = ensure_bento(settings, paths, registry.version_dir(champion))["bento_tag"]
    record = paths.deployment
    before = read_json(record).get("champion") if record.is_file() else None
    summary: dict[str, Any] = {"champion": champion, "bento_tag": bento, "endpoint": settings.deploy.endpoint,
                               "verified": False}
    if settings.deploy.endpoint:
        served = wait_until_served(settings.deploy.endpoint, champion, settings.deploy.timeout_s)
        if served.get("champion") != champion:
            _fail(settings, paths, registry, champion, served, new_release=before != champion)
        summary |= {"verified": True, "served": served}
    write_json(record, summary)
    log.info("deployed champion %s (bento %s)%s", champion, bento,
             f", live at {settings.deploy.endpoint}" if summary["verified"] else "")
    return summary


def wait_until_served(endpoint: str, version: str, timeout_s: float) -> dict[str, Any]:
    """Poll GET <endpoint>/models until the champion there is `version`; return the last answer."""
    deadline = time.monotonic() + timeout_s
    served: dict[str, Any] = {}
    while True:
        try:
            # bandit B310 is safe: the endpoint is the operator's own `amaas serve` (params.yaml deploy.endpoint)
            with urllib.request.urlopen(f"{endpoint.rstrip('/')}/models", timeout=5) as response:  # nosec B310
                served = json.loads(response.read())
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
            served = {"error": str(exc)}
        if served.get("champion") == version or time.monotonic() > deadline:
            return served
        time.sleep(0.5)


def _fail(settings: Settings, paths: Paths, registry: Registry, champion: str, served: dict[str, Any],
          new_release: bool) -> None:
    message = (f"{settings.deploy.endpoint} did not serve champion {champion} within {settings.deploy.timeout_s} s "
               f"(it answered {served})")
    history = registry.aliases()["champion_history"]
    # roll back a new release only: a server that is down for the champion already live is not the model's fault
    if settings.deploy.rollback_on_failure and new_release and history:
        previous = rollback(paths, reason=f"deploy failed: {message}")
        message += f"; the registry is back on {previous}"
    alert(settings, paths, "deploy_failed", message, {"champion": champion, "served": served})
    raise DeployError(message + ": check the server's log, then rerun `amaas deploy`")
