"""deploy: put the champion into service, and check that the live service really answers with it.

The champion's bento (model + this code) is built if it is missing. A running `amaas serve` follows the
registry on its own (within serve.reload_interval_s); with `deploy.endpoint` set, this stage polls that
server's GET /models until it serves the champion. If it never does within `deploy.timeout_s`, the
registry goes back to the previous champion (`deploy.rollback_on_failure`), an alert goes out and the
stage fails, so a broken release is never left half in place. models/deployment.json says what is live.

With the blue-green strategy (serve.strategy, or `--strategy blue-green`) the running blue-green `amaas serve`
of this project starts the champion's bento beside the old one, smoke-tests it and switches its front
(pipelines/serving/bluegreen.py); a failure leaves the old one serving and fails the same way.
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
from pipelines.contracts import Option, Out, stage
from pipelines.io import read_json, write_json
from pipelines.registry import Registry, RegistryError, rollback
from pipelines.serving.bento import ensure_bento, publish_bento
from pipelines.serving.bluegreen import request_deploy, running_server, smoke_row
from pipelines.state import shared

log = logging.getLogger(__name__)
STRATEGIES = ("hot", "blue-green")


class DeployError(RuntimeError):
    """The live service did not take up the champion."""


@stage(
    params=("deploy", "serve"),
    runtime=("alerts", "state"),
    deps=("registry_aliases",),
    # persist: an experiment (`dvc exp run`) leaves the record of what is live as it is
    outs=(Out("deployment", cache=False, persist=True),),
    options=(Option("--strategy", metavar="|".join(STRATEGIES),
                    help="hot: wait until deploy.endpoint serves the champion; blue-green: have this project's "
                         "blue-green server start it beside the old one and switch (default: serve.strategy)"),),
    description="Put the champion into service and check that the live endpoint answers with it",
)
def run(settings: Settings, paths: Paths, strategy: str | None = None) -> dict[str, Any]:
    """Build the champion's bento if needed; with an endpoint, wait until it serves the champion (hot), or have
    the blue-green server switch to it.

    Under `dvc exp run` nothing is deployed and models/deployment.json is left as it is (written only if
    there is none yet, saying so): an experiment never changes what is live."""
    experiment = experiment_name()
    if experiment:
        log.info("experiment %s: nothing deployed", experiment)
        if not paths.deployment.is_file():
            write_json(paths.deployment, {"champion": None, "verified": False,
                                          "reason": f"experiment {experiment}: nothing deployed"})
        return {"experiment": experiment, "deployed": False}
    strategy = strategy or settings.serve.strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    registry = Registry.of(paths, settings)
    champion = registry.champion
    if champion is None:
        raise RegistryError("no champion to deploy: run the pipeline up to `amaas promote` first")
    bento = ensure_bento(settings, paths, registry.champion_dir())["bento_tag"]
    publish_bento(settings, paths, registry.champion_dir(), bento)  # a fleet's replicas load the champion from there
    shared(settings, paths).publish_routing(settings.serve.canary_share, settings.serve.shadow)
    record = paths.deployment
    before = read_json(record).get("champion") if record.is_file() else None
    summary: dict[str, Any] = {"champion": champion, "bento_tag": bento, "strategy": strategy,
                               "endpoint": settings.deploy.endpoint, "verified": False}
    if strategy == "blue-green":
        summary |= _blue_green(settings, paths, registry, champion, bento, new_release=before != champion)
    elif settings.deploy.endpoint:
        served = wait_until_served(settings.deploy.endpoint, champion, settings.deploy.timeout_s)
        if served.get("champion") != champion:
            _fail(settings, paths, registry, champion, served, new_release=before != champion,
                  message=f"{settings.deploy.endpoint} did not serve champion {champion} within "
                          f"{settings.deploy.timeout_s} s (it answered {served})")
        summary |= {"verified": True, "served": served}
    write_json(record, summary)
    blue_green = strategy == "blue-green" and summary["verified"]
    live = summary["served"]["url"] if blue_green else settings.deploy.endpoint
    log.info("deployed champion %s (bento %s)%s", champion, bento, f", live at {live}" if summary["verified"] else "")
    return summary


def wait_until_served(endpoint: str, version: str, timeout_s: float) -> dict[str, Any]:
    """Poll GET <endpoint>/models until the champion there is `version`; return the last answer."""
    if not endpoint.lower().startswith(("http://", "https://")):  # settings check it too (DeployConfig)
        raise DeployError(f"deploy.endpoint {endpoint!r} is not an http(s) URL: write http://host:port in params.yaml")
    deadline = time.monotonic() + timeout_s
    served: dict[str, Any] = {}
    while True:
        try:
            # only http(s) reaches here (checked above): no file:// or other handlers of urlopen
            with urllib.request.urlopen(f"{endpoint.rstrip('/')}/models", timeout=5) as response:  # nosec B310
                served = json.loads(response.read())
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
            served = {"error": str(exc)}
        if served.get("champion") == version or time.monotonic() > deadline:
            return served
        time.sleep(0.5)


def _blue_green(settings: Settings, paths: Paths, registry: Registry, champion: str, bento: str,
                new_release: bool) -> dict[str, Any]:
    """Have this project's blue-green server switch to `bento`; without one running, the next `amaas serve`
    starts it."""
    if running_server(paths) is None:
        log.info("no blue-green server of this project is running: the next `amaas serve` starts %s", bento)
        return {"reason": "no blue-green server was running: the next `amaas serve` starts this champion"}
    result = request_deploy(paths, champion, bento, smoke_row(paths, champion), settings.deploy.timeout_s,
                            settings.serve.blue_green.drain_s)
    if not result["ok"]:
        live = result.get("active") or {}
        _fail(settings, paths, registry, champion, result, new_release=new_release,
              message=f"blue-green deploy of champion {champion} ({bento}) failed: {result['reason']}; "
                      f"{live.get('color', 'the old backend')} ({live.get('champion')}) keeps serving")
    return {"verified": True, "served": result["active"]}


def _fail(settings: Settings, paths: Paths, registry: Registry, champion: str, served: dict[str, Any],
          new_release: bool, message: str) -> None:
    history = registry.aliases()["champion_history"]
    # roll back a new release only: a server that is down for the champion already live is not the model's fault
    if settings.deploy.rollback_on_failure and new_release and history:
        previous = rollback(registry, reason=f"deploy failed: {message}")
        message += f"; the registry is back on {previous}"
    alert(settings, paths, "deploy_failed", message, {"champion": champion, "served": served})
    raise DeployError(message + ": check the server's log, then rerun `amaas deploy`")
