"""Alerts when a promotion gate fails, drift is found or an Airflow task fails: always a log line, plus a
webhook and/or email.

The webhook gets a JSON POST {"kind", "message", "details", "project"} (Slack/Teams/PagerDuty bridges
take this shape or a small adapter). `$AMAAS_ALERT_WEBHOOK` overrides `alerts.webhook_url`, so a URL
with a token stays out of git. A failing channel is logged and never fails the pipeline stage.
"""

from __future__ import annotations

import json
import logging
import os
import smtplib
import urllib.request
from collections.abc import Mapping
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from pipelines.config import Paths, Settings, load_settings, webhook_problem
from pipelines.io import redacted_url

log = logging.getLogger(__name__)
WEBHOOK_ENV = "AMAAS_ALERT_WEBHOOK"
MAX_EXCEPTION_CHARS = 2000  # of a failed task's exception in its alert (the log URL has the rest)


def alert(settings: Settings, paths: Paths, kind: str, message: str, details: dict[str, Any]) -> dict[str, Any]:
    """Send an alert on every configured channel; return which ones took it."""
    log.warning("ALERT %s: %s", kind, message)
    cfg = settings.alerts
    body = {"kind": kind, "message": message, "details": details, "project": str(paths.root)}
    delivered: dict[str, Any] = {"log": True}
    url = os.environ.get(WEBHOOK_ENV) or cfg.webhook_url
    if url and (problem := webhook_problem(url)):  # $AMAAS_ALERT_WEBHOOK is not checked when params load
        log.error("alert webhook not used: %s (%s)", problem, WEBHOOK_ENV)
        delivered["webhook"] = False
    elif url:
        delivered["webhook"] = _post(url, body, cfg.timeout_s, cfg.retries)
    if cfg.email_to and cfg.smtp_host:
        delivered["email"] = _mail(cfg.smtp_host, cfg.smtp_port, cfg.email_from, cfg.email_to,
                                   f"[amaas] {kind}: {message}", json.dumps(body, indent=2, default=str))
    return delivered


def task_failed(context: Mapping[str, Any], params: Path, root: Path) -> dict[str, Any] | None:
    """A `task_failed` alert for an Airflow task context: the DAG, task, run, try, the exception and the task's
    log URL, through the channels of the settings in `params` (pipelines.runner.FailureAlert calls this).

    Never raises: an alert that cannot be sent is logged, and the task's own failure stays what Airflow
    reports."""
    try:
        details = _failure_details(context)
        message = (f"{details['dag_id']}.{details['task_id']} failed (try {details['try_number']}, run "
                   f"{details['run_id']}): {details['exception']}")
        return alert(load_settings(params), Paths(root), "task_failed", message, details)
    except Exception:
        log.exception("could not send the task-failure alert (check %s `alerts:`)", params)
        return None


def _failure_details(context: Mapping[str, Any]) -> dict[str, Any]:
    """What an operator needs to find the failure, from an Airflow task context (missing parts are None)."""
    ti = context.get("task_instance") or context.get("ti")
    dag = context.get("dag")
    exception = context.get("exception")
    try:
        log_url = getattr(ti, "log_url", None)
    except Exception:  # Airflow builds it from its config; a missing setting must not cost the alert
        log_url = None
    return {
        "dag_id": getattr(ti, "dag_id", None) or getattr(dag, "dag_id", None),
        "task_id": getattr(ti, "task_id", None),
        "run_id": context.get("run_id") or getattr(ti, "run_id", None),
        "try_number": getattr(ti, "try_number", None),
        "exception": None if exception is None else f"{type(exception).__name__}: {exception}"[:MAX_EXCEPTION_CHARS],
        "log_url": log_url,
    }


def _post(url: str, body: dict[str, Any], timeout_s: float, retries: int) -> bool:
    data = json.dumps(body, default=str).encode()
    for attempt in range(1, retries + 2):
        request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
        try:
            # bandit B310 is safe: the operator's own URL (alerts.webhook_url or $AMAAS_ALERT_WEBHOOK)
            with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310  # nosec B310
                if 200 <= response.status < 300:
                    return True
        except OSError as exc:
            log.warning("alert webhook attempt %d failed: %s", attempt, exc)
    log.error("alert webhook %s did not take the alert", redacted_url(url))
    return False


def _mail(host: str, port: int, sender: str, to: list[str], subject: str, text: str) -> bool:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, ", ".join(to), subject
    msg.set_content(text)
    try:
        with smtplib.SMTP(host, port, timeout=10) as smtp:
            smtp.send_message(msg)
        return True
    except OSError as exc:
        log.error("alert email via %s:%d failed: %s", host, port, exc)
        return False
