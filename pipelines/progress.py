"""Progress of long work: a bar in a terminal, a few plain log lines everywhere else.

`progress(items, "validate", total=n, unit="batch")` yields the items unchanged. When stderr is a terminal
(and $AMAAS_PROGRESS is not "0") it draws a tqdm bar there; otherwise (Airflow, CI, `dvc repro` with its
output piped, a test) it logs one INFO line when the work starts, at most one every `every_s` seconds while it
runs, and one when it ends (or is left early), so a log shows that a long step is moving without a line per item.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("pipelines.progress")
ENV = "AMAAS_PROGRESS"  # "0": never draw bars; "1": draw them even without a terminal


def bars_enabled() -> bool:
    """Whether progress is drawn as bars: on a terminal, unless $AMAAS_PROGRESS says otherwise."""
    setting = os.environ.get(ENV, "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    return sys.stderr.isatty()


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it", every_s: float = 30.0
             ) -> Iterator[T]:
    """`items`, with progress shown as a bar (a terminal) or as log lines (anything else)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if bars_enabled():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
        return
    of = f"/{total}" if total is not None else ""
    started = last = time.monotonic()
    log.info("%s: started (%s %s)", desc, total if total is not None else "?", unit)
    done = 0
    try:
        for item in items:
            yield item
            done += 1
            now = time.monotonic()
            if now - last >= every_s:
                last = now
                log.info("%s: %d%s %s, %.0f s", desc, done, of, unit, now - started)
    except GeneratorExit:  # the caller stopped early (an early stop, an error): the log still says where
        log.info("%s: stopped at %s %d%s in %.1f s", desc, unit, done + 1, of, time.monotonic() - started)
        raise
    log.info("%s: done, %d %s in %.1f s", desc, done, unit, time.monotonic() - started)
