"""Redis preference cache (redis-py asyncio) and the cross-replica generation lock.

Keys are ``pref:{model_version}:{user_id}`` (a new model never reads an old model's cache): a hash
``{text: utf-8, vector: float32 little-endian bytes, dim}`` with a TTL. The lock that lets one replica
generate a user's preference while the others wait is ``lock:pref:{model_version}:{user_id}``,
taken with ``SET NX PX`` and released only by its owner (a compare-and-delete script), as in the Redis
docs' single-instance lock pattern.

Failure policy: every Redis error becomes :class:`CacheUnavailable`, which the pipeline turns into the
``cache_unavailable`` degraded flag; nothing here ever reaches the client. After an error the cache is
skipped for ``retry_after_s`` (a small circuit breaker), so an outage does not add a socket timeout to
every request; the first call after that window tries again, and a reconnect is automatic.

Hot users in process: a hit is kept here for ``local_ttl_s`` (1 s), never past the key's own expiry in
Redis (read with the hit, ``PTTL``), and replaced at once by this process's own writes; another process's
write to Redis is seen within ``local_ttl_s``. Under load the same users come back many times a second, and
a Redis round trip per request was a fifth of the API's GIL time (a socket write that wakes redis-server,
then the read), more than the retriever's forward pass. Misses are never kept: a user whose preference
another replica is generating is seen as soon as it lands. ``local_ttl_s=0`` turns this off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class CacheUnavailable(Exception):
    """Redis could not be reached or answered with an error (reported as ``cache_unavailable``)."""


@dataclass(frozen=True)
class Preference:
    """A user's preference text and its text-encoder vector (D,) float32."""

    text: str
    vector: np.ndarray


class PreferenceCache:
    """Get/set preferences and take per-user generation locks in Redis, never raising RedisError."""

    def __init__(
        self,
        url: str,
        version: str,
        ttl_s: int,
        timeout_s: float = 0.25,
        retry_after_s: float = 1.0,
        local_ttl_s: float = 1.0,
        local_size: int = 65536,
    ):
        self.url = url
        self.version = version
        self.ttl_ms = int(ttl_s * 1000)
        self.retry_after_s = retry_after_s
        self.local_ttl_s = local_ttl_s  # a hit is served from this process this long at most (0: never)
        self.local_size = local_size
        self._local: dict[str, tuple[float, Preference]] = {}  # user -> (time.monotonic() it expires, preference)
        self.client: aioredis.Redis = aioredis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # one quick retry on a fresh connection: a restarted server leaves stale pooled sockets
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
            health_check_interval=30,
            decode_responses=False,
        )
        self._down_until = 0.0
        self._release = self.client.register_script(_RELEASE)

    # ---- keys ---------------------------------------------------------------------------------------

    def key(self, user_id: str) -> str:
        return f"pref:{self.version}:{user_id}"

    def lock_key(self, user_id: str) -> str:
        return f"lock:{self.key(user_id)}"

    # ---- circuit breaker ----------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False while the cache is being skipped after an error."""
        return time.monotonic() >= self._down_until

    def _check(self) -> None:
        if not self.available:
            raise CacheUnavailable("redis skipped after a recent error")

    def _failed(self, op: str, error: Exception) -> CacheUnavailable:
        self._down_until = time.monotonic() + self.retry_after_s
        log.warning("redis %s failed: %s: %s", op, type(error).__name__, error)
        return CacheUnavailable(f"redis {op} failed: {type(error).__name__}")

    # ---- operations ---------------------------------------------------------------------------------

    async def ping(self) -> bool:
        """A real round trip (ignores the breaker); success closes the breaker."""
        try:
            ok = bool(await self.client.ping())
        except (RedisError, OSError) as e:
            self._failed("ping", e)
            return False
        self._down_until = 0.0
        return ok

    async def get(self, user_id: str) -> Preference | None:
        local = self._local.get(user_id)
        if local is not None:
            if local[0] > time.monotonic():
                return local[1]
            del self._local[user_id]
        self._check()
        key = self.key(user_id)
        try:
            if self.local_ttl_s > 0:  # the key's expiry with it, in one round trip
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.hgetall(key)
                    pipe.pttl(key)
                    fields, ttl_ms = await pipe.execute()
            else:
                fields, ttl_ms = await self.client.hgetall(key), -1  # type: ignore[misc]
        except (RedisError, OSError) as e:
            raise self._failed("get", e) from None
        if not fields:
            return None
        try:
            preference = _decode(fields)
        except (KeyError, ValueError) as e:
            log.warning("dropping malformed cache entry %s: %s", key, e)
            return None
        self._keep(user_id, preference, ttl_ms / 1000 if ttl_ms >= 0 else None)
        return preference

    def _keep(self, user_id: str, preference: Preference, expires_in_s: float | None) -> None:
        """Keep a hit in process for ``local_ttl_s``, or until the Redis key expires if sooner (None: no expiry)."""
        if self.local_ttl_s <= 0:
            return
        now = time.monotonic()
        if len(self._local) >= self.local_size:  # drop the expired ones, or all of them when none is
            self._local = {u: kept for u, kept in self._local.items() if kept[0] > now}
            if len(self._local) >= self.local_size:
                self._local.clear()
        lasts = self.local_ttl_s if expires_in_s is None else min(self.local_ttl_s, expires_in_s)
        self._local[user_id] = (now + lasts, preference)

    async def set(self, user_id: str, preference: Preference) -> None:
        await self.set_many([(user_id, preference)])

    async def set_many(self, items: Iterable[tuple[str, Preference]], chunk: int = 500) -> int:
        """Store preferences with the TTL, pipelined; returns how many were written."""
        self._check()
        written = 0
        batch: list[tuple[str, Preference]] = []
        try:
            for item in items:
                batch.append(item)
                if len(batch) == chunk:
                    written += await self._write(batch)
                    batch = []
            if batch:
                written += await self._write(batch)
        except (RedisError, OSError) as e:
            raise self._failed("set", e) from None
        return written

    async def _write(self, batch: list[tuple[str, Preference]]) -> int:
        async with self.client.pipeline(transaction=False) as pipe:
            for user_id, preference in batch:
                key = self.key(user_id)
                pipe.hset(key, mapping=_encode(preference))
                pipe.pexpire(key, self.ttl_ms)
            await pipe.execute()
        for user_id, preference in batch:  # this process reads what it wrote, not an older kept copy
            if user_id in self._local:
                self._keep(user_id, preference, self.ttl_ms / 1000)
        return len(batch)

    async def acquire_lock(self, user_id: str, token: str, ttl_ms: int) -> bool:
        """``SET NX PX``: True if this caller now owns the user's generation lock."""
        self._check()
        try:
            return bool(await self.client.set(self.lock_key(user_id), token, nx=True, px=ttl_ms))
        except (RedisError, OSError) as e:
            raise self._failed("lock", e) from None

    async def release_lock(self, user_id: str, token: str) -> None:
        """Delete the lock if (and only if) ``token`` still owns it; errors are logged, not raised."""
        try:
            await self._release(keys=[self.lock_key(user_id)], args=[token])
        except (RedisError, OSError) as e:
            self._failed("unlock", e)

    async def lock_held(self, user_id: str) -> bool:
        self._check()
        try:
            return bool(await self.client.exists(self.lock_key(user_id)))
        except (RedisError, OSError) as e:
            raise self._failed("lock check", e) from None

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except (RedisError, OSError) as e:
            log.warning("closing the redis client: %s", e)


def _encode(preference: Preference) -> dict[Any, Any]:
    vector = np.ascontiguousarray(preference.vector, dtype="<f4").reshape(-1)
    return {"text": preference.text.encode("utf-8"), "vector": vector.tobytes(), "dim": str(len(vector)).encode()}


def _decode(fields: dict[Any, Any]) -> Preference:
    raw = fields[b"vector"]
    dim = int(fields[b"dim"])
    if len(raw) != 4 * dim:
        raise ValueError(f"vector has {len(raw)} bytes, expected {4 * dim}")
    vector = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    return Preference(text=fields[b"text"].decode("utf-8"), vector=vector)
