"""The fan-out bus: one message per publish, received once by every server process.

With Redis this is one pub/sub channel, ``<prefix>:fanout``, and each process
holds exactly one subscription to it (``Hub``); a broadcast to every online
user therefore costs one Redis message per process, whatever the number of
sockets. Without Redis (embedded default, one process) a publish is handed to
the hubs of this process directly.

A bus message is a dict; ``kind`` says what it carries:

* ``push``: ``{"kind": "push", "groups": [{"msg_type", "from_uid", "body",
  "to": [[uid, noce_ack], ...]}]}`` - stored notifications for some users.

Pub/sub is at-most-once: a process that is not subscribed at that moment
misses the message. Nothing is lost by that: every pushed notification is
stored first, unsent, and goes out on the user's next login or periodic run.

Guarded by tests/notifications/test_delivery.py and tests/connections/test_bridge.py (the ping).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from django.conf import settings

from pushsite import metrics
from pushsite.errors import BackendUnavailable
from pushsite.redis_client import get_async_redis, get_redis, redis_configured

log = logging.getLogger(__name__)

# Hubs of this process that take embedded-mode publishes: loop -> handler.
_local_handlers: dict[asyncio.AbstractEventLoop, Callable[[dict[str, Any]], None]] = {}


def channel_name() -> str:
    return f"{settings.PUSH_REDIS_PREFIX}:fanout"


def publish(message: dict[str, Any]) -> int:
    """Send one bus message to every server process; returns how many got it."""
    if redis_configured():
        with redis_call():
            return get_redis().publish(channel_name(), json.dumps(message, separators=(",", ":")))
    delivered = 0
    for loop, handler in list(_local_handlers.items()):
        if loop.is_closed():
            _local_handlers.pop(loop, None)
            continue
        loop.call_soon_threadsafe(_received, handler, message)
        delivered += 1
    return delivered


def _received(handler: Callable[[dict[str, Any]], None], message: dict[str, Any]) -> None:
    metrics.BUS_MESSAGES.inc()
    handler(message)


# When this process last had an answer from Redis to a publish or a ping.
ANSWERED_WITHIN = 1.0
_answered_at = float("-inf")


def redis_failed() -> None:
    """Forget Redis' last answer: the next push pings it first."""
    global _answered_at
    _answered_at = float("-inf")


@contextlib.contextmanager
def redis_call() -> Iterator[None]:
    """Around a Redis call of this process: a RedisError is BackendUnavailable; an answer is remembered."""
    global _answered_at
    try:
        yield
    except redis.RedisError as error:
        redis_failed()
        metrics.backend_error("redis")
        raise BackendUnavailable(f"redis unavailable: {error.__class__.__name__}") from error
    _answered_at = time.monotonic()


def check_available() -> None:
    """Raise BackendUnavailable unless a publish can go out now.

    A PING, unless Redis answered a publish or a ping of this process within
    ``ANSWERED_WITHIN`` seconds: under load it was one round trip of four per
    push (bench/README.md, latency). If Redis died within that second, the push
    is stored and answered with ``sent`` 0, as when it dies between the
    INSERT and the publish, and goes out at the next login or periodic run.
    """
    if redis_configured() and time.monotonic() - _answered_at >= ANSWERED_WITHIN:
        with redis_call():
            get_redis().ping()


async def subscribe(
    handler: Callable[[dict[str, Any]], None],
    ready: asyncio.Event,
    resubscribed: Callable[[], None] | None = None,
) -> None:
    """Feed every bus message to handler until cancelled; reconnects after failures.

    ``resubscribed`` is called each time the subscription is back after a
    loss: Redis may have restarted and lost what it held.
    """
    loop = asyncio.get_running_loop()
    if not redis_configured():
        _local_handlers[loop] = handler
        ready.set()
        try:
            await asyncio.Event().wait()
        finally:
            _local_handlers.pop(loop, None)
        return
    delay = 0.2
    lost = False
    while True:
        pubsub = get_async_redis().pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel_name())
            ready.set()
            delay = 0.2
            if lost and resubscribed is not None:
                resubscribed()
            lost = False
            async for item in pubsub.listen():
                if item.get("type") != "message":
                    continue
                try:
                    message = json.loads(item["data"])
                except ValueError:
                    log.error("dropped a bus message that is not JSON")
                    continue
                metrics.BUS_MESSAGES.inc()
                handler(message)
        except asyncio.CancelledError:
            raise
        except (redis.RedisError, OSError) as error:
            lost = True
            log.warning("bus subscription lost (%s); resubscribing in %.1fs", error.__class__.__name__, delay)
        finally:
            with contextlib.suppress(redis.RedisError, OSError):
                await pubsub.aclose()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)
