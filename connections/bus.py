"""The fan-out bus: bus messages addressed to the server processes that hold their sockets.

With Redis every server process (a node, ``services.node_id()``) holds one
subscription (``Hub``) to two pub/sub channels: its own,
``<prefix>:node:<node id>``, and the broadcast channel ``<prefix>:fanout``.
A push is published only on the channels of the nodes that the users'
presence entries name (notifications/publish.py does the look-up and the
publish in one script call), so a node that holds none of a push's users
neither receives nor parses it, and the cost of a push does not grow with the
size of the cluster. A broadcast to every online user costs one Redis message
per node that holds any of them (per chunk of users), whatever the number of
sockets. Without Redis (embedded default, one process) a publish is handed to
the hubs of this process directly, by the same addressing.

A bus message is a dict; ``kind`` says what it carries:

* ``push``: ``{"kind": "push", "groups": [{"msg_type", "from_uid", "body",
  "to": [[uid, noce_ack], ...]}]}`` - stored notifications for some users.

* ``evict``: ``{"kind": "evict", "conn_ids": [...]}`` - sockets to kick
  (KICK 4001); sent to the nodes the connection ids name.

Pub/sub is at-most-once: a process that is not subscribed at that moment
misses the message, and a node that got a push for a socket it no longer
holds changes nothing. Nothing is lost by either: every pushed notification is
stored first, unsent, and goes out on the user's next login or periodic run.

Guarded by tests/notifications/test_delivery.py and tests/connections/test_bridge.py (the ping).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import redis
from django.conf import settings

from pushsite import metrics
from pushsite.errors import BackendUnavailable
from pushsite.redis_client import get_async_redis, get_redis, redis_configured

log = logging.getLogger(__name__)

# Hubs of this process that take embedded-mode publishes: loop -> (node, handler).
_local_handlers: dict[asyncio.AbstractEventLoop, tuple[str, Callable[[dict[str, Any]], None]]] = {}


def broadcast_channel() -> str:
    """The channel every server process subscribes to."""
    return f"{settings.PUSH_REDIS_PREFIX}:fanout"


def node_channel_prefix() -> str:
    return f"{settings.PUSH_REDIS_PREFIX}:node:"


def node_channel(node: str) -> str:
    """The channel only the server process ``node`` subscribes to."""
    return node_channel_prefix() + node


def node_of(conn_id: str) -> str:
    """The node a connection id belongs to (ids are ``<node>.<n>``)."""
    return conn_id.rpartition(".")[0]


def publish(message: dict[str, Any], *, nodes: Iterable[str] | None = None) -> int:
    """Send one bus message to these nodes (None: every server process); returns how many got it."""
    if nodes is None:
        if redis_configured():
            with redis_call():
                return get_redis().publish(broadcast_channel(), json.dumps(message, separators=(",", ":")))
        return _publish_local([(None, message)])
    return publish_addressed([(node, message) for node in set(nodes)])


def publish_addressed(addressed: Iterable[tuple[str, dict[str, Any]]]) -> int:
    """Send each message to its node only, in one Redis round trip; returns how many got one."""
    addressed = list(addressed)
    if not addressed:
        return 0
    if not redis_configured():
        return _publish_local(addressed)
    pipe = get_redis().pipeline(transaction=False)
    for node, message in addressed:
        pipe.publish(node_channel(node), json.dumps(message, separators=(",", ":")))
    with redis_call():
        return sum(pipe.execute())


def _publish_local(addressed: list[tuple[str | None, dict[str, Any]]]) -> int:
    """The embedded bus: hand each message to the hubs of this process it is addressed to (None: all)."""
    delivered = 0
    for loop, (node, handler) in list(_local_handlers.items()):
        if loop.is_closed():
            _local_handlers.pop(loop, None)
            continue
        for target, message in addressed:
            if target is None or target == node:
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
    node: str,
    handler: Callable[[dict[str, Any]], None],
    ready: asyncio.Event,
    resubscribed: Callable[[], None] | None = None,
) -> None:
    """Feed every bus message for ``node`` (and every broadcast) to handler until cancelled.

    Reconnects after failures; with Redis Sentinel the new connection goes to
    whichever server is the master now (pushsite/redis_client.py).
    ``resubscribed`` is called each time the subscription is back after a
    loss: Redis may have restarted, or failed over, and lost what it held.
    """
    loop = asyncio.get_running_loop()
    if not redis_configured():
        _local_handlers[loop] = (node, handler)
        ready.set()
        try:
            await asyncio.Event().wait()
        finally:
            _local_handlers.pop(loop, None)
        return
    mine = node_channel(node)
    confirmed = 0  # confirmations of this node's subscription, over every connection
    delay = 0.2
    while True:
        pubsub = get_async_redis().pubsub()
        try:
            await pubsub.subscribe(broadcast_channel(), mine)
            ready.set()
            async for item in pubsub.listen():
                kind = item.get("type")
                if kind == "subscribe":
                    # Every confirmation after the first is a subscription that
                    # came back: redis-py may reconnect inside listen() without
                    # raising, on the same server or, after a failover, another.
                    if item.get("channel") == mine:
                        confirmed += 1
                        delay = 0.2
                        if confirmed > 1 and resubscribed is not None:
                            resubscribed()
                    continue
                if kind != "message":
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
            log.warning("bus subscription lost (%s); resubscribing in %.1fs", error.__class__.__name__, delay)
        finally:
            with contextlib.suppress(redis.RedisError, OSError):
                await pubsub.aclose()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)
