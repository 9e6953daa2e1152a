"""Alerts when a promotion gate fails or drift is found: always a log line, plus a webhook and/or email.

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
from email.message import EmailMessage
from typing import Any

from pipelines.config import Paths, Settings

log = logging.getLogger(__name__)
WEBHOOK_ENV = "AMAAS_ALERT_WEBHOOK"


def alert(settings: Settings, paths: Paths, kind: str, message: str, details: dict[str, Any]) -> dict[str, Any]:
    """Send an alert on every configured channel; return which ones took it."""
    log.warning("ALERT %s: %s", kind, message)
    cfg = settings.alerts
    body = {"kind": kind, "message": message, "details": details, "project": str(paths.root)}
    delivered: dict[str, Any] = {"log": True}
    url = os.environ.get(WEBHOOK_ENV) or cfg.webhook_url
    if url:
        delivered["webhook"] = _post(url, body, cfg.timeout_s, cfg.retries)
    if cfg.email_to and cfg.smtp_host:
        delivered["email"] = _mail(cfg.smtp_host, cfg.smtp_port, cfg.email_from, cfg.email_to,
                                   f"[amaas] {kind}: {message}", json.dumps(body, indent=2, default=str))
    return delivered


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
    log.error("alert webhook %s did not take the alert", url.split("?")[0])
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
