"""The two places where the gateway replaces a method of BentoML's internals (pipelines/serving/gateway.py:
bound_metric_labels, cancelled_timeouts) are pinned to the code they replace: a BentoML upgrade that changes that
code fails here, loudly, naming what to recheck, instead of breaking serving silently (Hardening II, item 14).
Their behaviour is tested too: what each patch promises."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from typing import Any

import pytest
from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware
from bentoml._internal.server.http.traffic import TimeoutMiddleware

from pipelines.serving.gateway import bound_metric_labels, cancelled_timeouts

# sha256 of the replaced methods' source in bentoml 1.4.40 (pyproject.toml's pin), as reviewed for the patches
REVIEWED = {"RunnerTrafficMetricsMiddleware.__call__": "b7dc25ae0208d7b2",
            "TimeoutMiddleware.__call__": "fd8b9e3da28ed2b4"}


def _original(cls: type) -> Any:
    method = cls.__call__  # type: ignore[operator]
    return getattr(method, "_amaas_original", method)


@pytest.mark.parametrize("cls", [RunnerTrafficMetricsMiddleware, TimeoutMiddleware], ids=lambda c: c.__name__)
def test_the_replaced_bentoml_code_is_the_reviewed_code(cls):
    bound_metric_labels()
    cancelled_timeouts()
    name = f"{cls.__name__}.__call__"
    digest = hashlib.sha256(inspect.getsource(_original(cls)).encode()).hexdigest()[:16]
    assert digest == REVIEWED[name], (
        f"BentoML's {name} changed (a BentoML upgrade?): recheck the patch of it in pipelines/serving/gateway.py "
        f"against the new code, then update REVIEWED here")
    assert list(inspect.signature(_original(cls)).parameters) == ["self", "scope", "receive", "send"]
    assert cls.__call__ is not _original(cls)  # the patch is in place


def _run(middleware: Any, path: str = "/predict") -> tuple[list[dict[str, Any]], bool]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def go() -> bool:
        await middleware({"type": "http", "path": path, "method": "POST", "headers": []}, receive, send)
        loop = asyncio.get_running_loop()
        return any(not h.cancelled() for h in getattr(loop, "_scheduled", []))  # a timer left behind

    return sent, asyncio.run(go())


def test_a_request_that_is_over_leaves_no_timer_and_a_slow_one_gets_504():
    cancelled_timeouts()

    async def fast(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def slow(scope, receive, send):
        await asyncio.sleep(5)

    sent, timer_left = _run(TimeoutMiddleware(fast, timeout=30))
    assert sent[0]["status"] == 200 and not timer_left
    sent, _ = _run(TimeoutMiddleware(slow, timeout=0.2))
    assert sent[0]["status"] == 504


def test_an_unknown_path_is_404_before_bentoml_labels_a_metric_by_it():
    bound_metric_labels()
    reached: list[str] = []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    sent, _ = _run(RunnerTrafficMetricsMiddleware(app), path="/no/such/path")
    assert sent[0]["status"] == 404 and reached == []
