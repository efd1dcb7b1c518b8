"""The preference cache's in-process copies of hot users (``service.cache``) against a real Redis server.

A hit is kept for ``local_ttl_s`` and never past the key's own expiry in Redis; this process's writes replace
it at once, another writer's are seen once ``local_ttl_s`` has passed; misses are never kept; 0 turns it off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from service.cache import Preference, PreferenceCache, _encode
from service.redis_server import EmbeddedRedis

LOCAL_TTL_S = 1.0


def _preference(text: str) -> Preference:
    return Preference(text=text, vector=np.full(4, float(len(text)), np.float32))


async def _with_cache(directory: Path, local_ttl_s: float, test: Callable[[PreferenceCache], Awaitable[None]]) -> None:
    server = EmbeddedRedis(directory)
    await server.start()
    cache = PreferenceCache(server.url, "v1", ttl_s=3600, local_ttl_s=local_ttl_s)
    try:
        await test(cache)
    finally:
        await cache.close()
        await server.close()


@pytest.fixture
def run_with_cache(tmp_path: Path) -> Callable[..., None]:
    def run(test: Callable[[PreferenceCache], Awaitable[None]], local_ttl_s: float = LOCAL_TTL_S) -> None:
        asyncio.run(_with_cache(tmp_path, local_ttl_s, test))

    return run


def test_a_hit_is_kept_until_local_ttl_then_another_writers_update_is_read(run_with_cache) -> None:
    async def test(cache: PreferenceCache) -> None:
        await cache.set("u1", _preference("old"))
        assert (await cache.get("u1")).text == "old"
        # another replica (or the refresh job) writes a new text straight into Redis
        await cache.client.hset(cache.key("u1"), mapping=_encode(_preference("new")))
        assert (await cache.get("u1")).text == "old", "within local_ttl_s the kept copy answers, no round trip"
        await asyncio.sleep(LOCAL_TTL_S + 0.05)
        assert (await cache.get("u1")).text == "new"

    run_with_cache(test)


def test_this_process_reads_its_own_write_at_once(run_with_cache) -> None:
    async def test(cache: PreferenceCache) -> None:
        await cache.set("u2", _preference("first"))
        assert (await cache.get("u2")).text == "first"
        await cache.set("u2", _preference("second"))
        got = await cache.get("u2")
        assert got.text == "second" and np.array_equal(got.vector, _preference("second").vector)

    run_with_cache(test)


def test_a_kept_copy_never_outlives_the_redis_key(run_with_cache) -> None:
    async def test(cache: PreferenceCache) -> None:
        key = cache.key("u3")
        await cache.client.hset(key, mapping=_encode(_preference("short-lived")))
        await cache.client.pexpire(key, 150)  # expires well before local_ttl_s
        assert (await cache.get("u3")).text == "short-lived"
        await asyncio.sleep(0.2)
        assert await cache.client.exists(key) == 0
        assert await cache.get("u3") is None, "the copy expired with the key, not local_ttl_s later"

    run_with_cache(test, local_ttl_s=5.0)


def test_a_miss_is_not_kept(run_with_cache) -> None:
    async def test(cache: PreferenceCache) -> None:
        assert await cache.get("u4") is None
        await cache.client.hset(cache.key("u4"), mapping=_encode(_preference("landed")))  # another replica's
        assert (await cache.get("u4")).text == "landed"

    run_with_cache(test, local_ttl_s=5.0)


def test_local_ttl_zero_reads_redis_every_time(run_with_cache) -> None:
    async def test(cache: PreferenceCache) -> None:
        await cache.set("u5", _preference("a"))
        assert (await cache.get("u5")).text == "a"
        await cache.client.hset(cache.key("u5"), mapping=_encode(_preference("b")))
        assert (await cache.get("u5")).text == "b"

    run_with_cache(test, local_ttl_s=0.0)


def test_a_kept_hit_costs_no_round_trip(run_with_cache) -> None:
    async def test(cache: PreferenceCache) -> None:
        await cache.set("u6", _preference("hot"))
        await cache.get("u6")
        before = (await cache.client.info("stats"))["total_commands_processed"]
        for _ in range(100):
            assert (await cache.get("u6")).text == "hot"
        after = (await cache.client.info("stats"))["total_commands_processed"]
        assert after - before == 1, "only the INFO call itself reached Redis"

    run_with_cache(test, local_ttl_s=60.0)
