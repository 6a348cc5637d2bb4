"""Redis clients built from ``REDIS_URL`` with explicit connection options.

redis-py's defaults (no connect timeout, small pools) turned a Redis outage
into hangs and "Too many connections" errors in measurements; every client of
ours is made here so the options are set once.

With a ``redis+sentinel://`` URL (pushsite/redis_url.py) each client asks the
sentinels for the master whenever it opens a connection, so after a failover
the next connection goes to the new master; until the sentinels have promoted
one, a call fails with a RedisError (a 503 to the API), never a hang.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel
import redis.sentinel
from django.conf import settings

from .redis_url import SentinelURL, parse_sentinel_url

_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = weakref.WeakKeyDictionary()


_SYNC_OPTIONS = {
    "socket_connect_timeout": 2,
    "socket_timeout": 2,
    "socket_keepalive": True,
    "health_check_interval": 30,
    "max_connections": 64,
    "decode_responses": True,
}
_ASYNC_OPTIONS = {
    "socket_connect_timeout": 2,
    "socket_timeout": None,
    "socket_keepalive": True,
    "health_check_interval": 30,
    "decode_responses": True,
}


def _sentinels(sentinel: SentinelURL, *, for_asyncio: bool = False) -> Any:
    """A manager of the URL's sentinels, synchronous or for asyncio clients."""
    manager = redis.asyncio.sentinel.Sentinel if for_asyncio else redis.sentinel.Sentinel
    return manager(list(sentinel.sentinels), sentinel_kwargs=sentinel.sentinel_options(for_asyncio=for_asyncio))


@functools.lru_cache(maxsize=4)
def redis_client_for(url: str) -> redis.Redis:
    """A synchronous client (thread-safe pool, one per URL) for either form of Redis URL."""
    sentinel = parse_sentinel_url(url)
    if sentinel is None:
        return redis.Redis.from_url(url, **_SYNC_OPTIONS)
    return _sentinels(sentinel).master_for(sentinel.master, **sentinel.master_options(), **_SYNC_OPTIONS)


def get_redis() -> redis.Redis:
    """The process's synchronous client (thread-safe pool)."""
    return redis_client_for(settings.REDIS_URL)


def get_async_redis() -> aioredis.Redis:
    """A client bound to the running event loop (one per loop)."""
    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        sentinel = parse_sentinel_url(settings.REDIS_URL)
        if sentinel is None:
            client = aioredis.Redis.from_url(settings.REDIS_URL, **_ASYNC_OPTIONS)
        else:
            manager = _sentinels(sentinel, for_asyncio=True)
            client = manager.master_for(sentinel.master, **sentinel.master_options(), **_ASYNC_OPTIONS)
        _async_clients[loop] = client
    return client


class CachePool(redis.ConnectionPool):
    """The pool class of Django's Redis cache (settings.CACHES): either form of ``REDIS_URL``.

    Django builds its pool with ``pool_class.from_url(LOCATION, **OPTIONS)``;
    for a Sentinel URL this returns a sentinel-managed pool instead.
    """

    @classmethod
    def from_url(cls, url: str, **options):  # type: ignore[override]
        sentinel = parse_sentinel_url(url)
        if sentinel is None:
            return redis.ConnectionPool.from_url(url, **options)
        return redis.sentinel.SentinelConnectionPool(
            sentinel.master, _sentinels(sentinel), **sentinel.master_options(), **options
        )


def redis_configured() -> bool:
    return bool(settings.REDIS_URL)
