"""Per-key token buckets in Redis ($AMAAS_REDIS_URL): one Lua script refills and takes a token atomically on the
Redis server's clock (TIME), so any number of replicas and workers together admit what one bucket allows, and no
worker's clock skews it. The script also counts each key's requests and refusals (usage)."""

from __future__ import annotations

from typing import Any

import redis

from pipelines.state.limits import Limit, StateBusy

PREFIX = "amaas:bucket:"
TIMEOUT_S = 1.0  # a check that waits longer answers 503
# KEYS[1]: the bucket; ARGV: rps (0: no rate limit), burst. Returns {admitted 0|1, tokens left as text}.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rps, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(state[1]) or burst
local updated = tonumber(state[2]) or now
if rps > 0 then
  tokens = math.min(burst, tokens + math.max(0, now - updated) * rps)
else
  tokens = burst
end
local admitted = 0
if tokens >= 1 then
  tokens = tokens - 1
  admitted = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now))
redis.call('HINCRBY', KEYS[1], 'requests', 1)
if admitted == 0 then redis.call('HINCRBY', KEYS[1], 'limited', 1) end
return {admitted, tostring(tokens)}
"""


class RedisBuckets:
    """The token buckets of all keys, in one Redis database."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        self._take: Any = self.client.register_script(TAKE)

    def take(self, name: str, limit: Limit) -> tuple[float, bool]:
        """Refill key `name`'s bucket to now and take one token: (tokens left, whether one was taken)."""
        try:
            admitted, tokens = self._take(keys=[PREFIX + name], args=[limit.rps or 0, limit.burst])
        except redis.RedisError as exc:
            raise StateBusy(f"the rate-limit store (Redis) is unavailable ({str(exc)[:200]})") from exc
        return float(tokens), bool(admitted)

    def counts(self) -> dict[str, tuple[int, int]]:
        """Each key's (requests, refused) counted here."""
        try:
            names = sorted(self.client.scan_iter(match=PREFIX + "*", count=1000))
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.hmget(name, "requests", "limited")
            found = pipe.execute()
        except redis.RedisError as exc:
            raise StateBusy(f"the rate-limit store (Redis) is unavailable ({str(exc)[:200]})") from exc
        return {name.decode()[len(PREFIX):]: (int(requests or 0), int(limited or 0))
                for name, (requests, limited) in zip(names, found, strict=True)}

    def forget(self, name: str) -> None:
        """Drop key `name`'s bucket and counts (the key was revoked)."""
        try:
            self.client.delete(PREFIX + name)
        except redis.RedisError as exc:
            raise StateBusy(f"the rate-limit store (Redis) is unavailable ({str(exc)[:200]})") from exc
