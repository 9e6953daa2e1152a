"""The Dask cluster that training and batch scoring use when params.yaml names one.

`scale.dask_scheduler`: null (this process only), "local" (a LocalCluster of `scale.dask_workers`
worker processes on this machine, the embedded default for tests), or a scheduler address such as
tcp://dask-scheduler:8786. Learners ask `current_client()` at fit time, the way they ask
`resolve_device()`; the address is never saved with a model, so where it trained does not change it
on disk beyond what the distributed algorithm itself changes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import pandas as pd

_client: ContextVar[Any | None] = ContextVar("dask_client", default=None)


@contextlib.contextmanager
def dask_cluster(address: str | None, workers: int) -> Iterator[Any | None]:
    """Connect to (or, for "local", start) the cluster; yield its client, or None without one."""
    if address is None:
        yield None
        return
    from distributed import Client, LocalCluster

    cluster = None
    if address == "local":
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    try:
        with Client(cluster or address) as client:
            token = _client.set(client)
            try:
                yield client
            finally:
                _client.reset(token)
    finally:
        if cluster is not None:
            cluster.close()


def current_client() -> Any | None:
    return _client.get()


def describe(client: Any | None) -> str:
    if client is None:
        return "this process"
    return f"dask {client.scheduler.address} ({len(client.scheduler_info()['workers'])} workers)"


def partitioned(client: Any, *frames: pd.DataFrame | pd.Series) -> list[Any]:
    """Dask collections with one partition per worker, split at the same rows for every frame."""
    import dask.dataframe as dd

    parts = max(len(client.scheduler_info()["workers"]), 1)
    size = math.ceil(len(frames[0]) / parts)
    return [dd.from_pandas(f, chunksize=size, sort=False) for f in frames]
