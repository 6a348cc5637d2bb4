"""Redis clients built from ``REDIS_URL`` with explicit connection options.

redis-py's defaults (no connect timeout, small pools) turned a Redis outage
into hangs and "Too many connections" errors in measurements; every client of
ours is made here so the options are set once.
"""

from __future__ import annotations

import asyncio
import functools
import weakref

import redis
import redis.asyncio as aioredis
from django.conf import settings

_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=4)
def _sync_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=2,
        socket_timeout=2,
        socket_keepalive=True,
        health_check_interval=30,
        max_connections=64,
        decode_responses=True,
    )


def get_redis() -> redis.Redis:
    """The process's synchronous client (thread-safe pool)."""
    return _sync_client(settings.REDIS_URL)


def get_async_redis() -> aioredis.Redis:
    """A client bound to the running event loop (one per loop)."""
    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        client = aioredis.Redis.from_url(
            settings.REDIS_URL,
            socket_connect_timeout=2,
            socket_timeout=None,
            socket_keepalive=True,
            health_check_interval=30,
            decode_responses=True,
        )
        _async_clients[loop] = client
    return client


def redis_configured() -> bool:
    return bool(settings.REDIS_URL)
