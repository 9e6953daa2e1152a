"""What processes and hosts share, behind one interface with two backends, chosen once from the settings.

- One host (the default, `state.url` and $AMAAS_STATE_URL unset): the files and SQLite beside the project: the
  key store `.amaas/api_keys.json`, the limits `.amaas/limits.db`, the registry's `aliases.json` and
  `decisions.json`, the canary routing in params.yaml, the prediction log `logs/predictions/*.jsonl`.
- A fleet ($AMAAS_STATE_URL, a PostgreSQL URL): all of that in the database (pipelines/state/postgres.py), the
  per-key token buckets in Redis when $AMAAS_REDIS_URL is set (pipelines/state/redis_buckets.py), and the bentos
  in the artifacts store $AMAAS_ARTIFACTS_URL (pipelines/state/artifacts.py), so a replica needs nothing but its
  environment.

Callers ask `Shared` for keys, limits, the prediction log and the registry's store and never branch on which.
"""

from __future__ import annotations

from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING

from pipelines.config import Paths, Settings, StateConfig

if TYPE_CHECKING:
    from pipelines.state.keys import ApiKeys
    from pipelines.state.limits import SharedState
    from pipelines.state.postgres import Database, PgApiKeys, PgLimits, PgRegistry
    from pipelines.state.predlog import GroupCommit, PredictionRecord


class Shared:
    """The shared state of one project as this process reaches it."""

    def __init__(self, cfg: StateConfig, paths: Paths) -> None:
        self.cfg = cfg.resolved()
        self.paths = paths

    @property
    def fleet(self) -> bool:
        """Whether the state is in PostgreSQL (shared by replicas on any host) rather than beside the project."""
        return self.cfg.url is not None

    @cached_property
    def db(self) -> Database:
        from pipelines.state.postgres import Database

        assert self.cfg.url is not None, "one host: no state database"
        return Database(self.cfg.url)

    @cached_property
    def keys(self) -> ApiKeys | PgApiKeys:
        if self.fleet:
            from pipelines.state.postgres import PgApiKeys

            return PgApiKeys(self.db)
        from pipelines.state.keys import ApiKeys

        return ApiKeys(self.paths.api_keys)

    @cached_property
    def limits(self) -> SharedState | PgLimits:
        """Rate limits, quotas, usage, drain and reload flags."""
        if self.fleet:
            from pipelines.state.postgres import PgLimits

            buckets = None
            if self.cfg.redis_url:
                from pipelines.state.redis_buckets import RedisBuckets

                buckets = RedisBuckets(self.cfg.redis_url)
            from pipelines.state.postgres import Database

            assert self.cfg.url is not None
            return PgLimits(Database(self.cfg.url, durable=False), buckets)  # counters: no WAL flush per request
        from pipelines.state.limits import SharedState

        return SharedState.beside(self.paths.api_keys)

    def revoke(self, name: str) -> None:
        """Revoke key `name` and forget its usage (a new key of that name starts with a full bucket and quota)."""
        self.keys.revoke(name)
        self.limits.forget(name)

    def prediction_log(self) -> GroupCommit:
        """Where a server appends the answers it gives."""
        if self.fleet:
            from pipelines.state.postgres import PgPredictionLog

            return PgPredictionLog(self.db)
        from pipelines.state.predlog import PredictionLog

        return PredictionLog(self.paths.prediction_log)

    def predictions(self, since: datetime | None = None) -> list[PredictionRecord]:
        """Every logged prediction (of the whole fleet), oldest first; `since` filters in the database only (the
        callers filter their window themselves)."""
        if self.fleet:
            from pipelines.state.postgres import PgPredictionLog

            return PgPredictionLog(self.db).read(since)
        from pipelines.state.predlog import read_prediction_log

        return read_prediction_log(self.paths.prediction_log) if self.paths.prediction_log.is_dir() else []

    @property
    def prediction_log_name(self) -> str:
        """Where the log is, for messages."""
        return "the prediction_log table of the state database" if self.fleet else str(self.paths.prediction_log)

    @cached_property
    def registry_store(self) -> PgRegistry | None:
        """The registry's aliases and decisions in the database; None: the files under models/registry/."""
        if not self.fleet:
            return None
        from pipelines.state.postgres import PgRegistry

        return PgRegistry(self.db)

    def routing(self, configured: tuple[float, bool]) -> tuple[float, bool]:
        """(canary share, shadow) that servers apply: the fleet's published routing, else `configured` (params.yaml
        as the server reads it)."""
        if self.fleet:
            published = self.fleet_limits().routing()
            if published is not None:
                return published
        return configured

    def publish_routing(self, canary_share: float, shadow: bool) -> bool:
        """Make (canary share, shadow) the fleet's routing; False on one host (params.yaml is read directly)."""
        if not self.fleet:
            return False
        self.fleet_limits().publish_routing(canary_share, shadow)
        return True

    def fleet_limits(self) -> PgLimits:
        from pipelines.state.postgres import PgLimits

        limits = self.limits
        assert isinstance(limits, PgLimits)
        return limits


def shared(settings: Settings, paths: Paths) -> Shared:
    """The shared state that `settings` (their `state` section, with the environment's overrides) point at."""
    return Shared(settings.state, paths)
