"""The one way consumers reach the database and other blocking backends.

Every call runs in a small pool of database threads (each closes stale
connections around its call, as Channels' own bridge does), and backend
failures come out as ``BackendUnavailable`` so the consumer can answer 503 and
keep the socket. Django's health-check ping (``CONN_HEALTH_CHECKS``) runs at
most once a second per connection, not before every call: under load it was
one round trip of four per push (bench/README.md, latency). A connection that
failed is checked again before its next use. A pool rather than Channels' one thread-sensitive thread:
logins from thousands of sockets would otherwise queue behind each other. Because no ORM call happens
outside this module, the consumer may skip Channels' per-message
``aclose_old_connections`` (connections/consumers.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import redis
from asgiref.sync import SyncToAsync
from django.conf import settings
from django.db import DatabaseError, IntegrityError, connections

from pushsite import metrics
from pushsite.errors import BackendUnavailable

T = TypeVar("T")
THREAD_PREFIX = "pushsite-db"


def _db_threads() -> int:
    """``PUSH_DB_THREADS``: enough threads to overlap round trips; each holds its own connections.

    SQLite takes one writer at a time (and its shared in-memory test database
    fails rather than waits), so it gets one thread, like Channels' own bridge.
    """
    return 1 if settings.DATABASES["default"]["ENGINE"].endswith("sqlite3") else settings.PUSH_DB_THREADS


def _guarded(fn: Callable[..., T], kwargs: dict[str, Any]) -> T:
    try:
        return fn(**kwargs)
    except IntegrityError:
        raise
    except DatabaseError as error:
        metrics.backend_error("mysql")
        raise BackendUnavailable(f"database unavailable: {error.__class__.__name__}") from error
    except redis.RedisError as error:
        metrics.backend_error("redis")
        raise BackendUnavailable(f"redis unavailable: {error.__class__.__name__}") from error


ANSWERED_WITHIN = 1.0
_checked = threading.local()  # per database thread: alias -> when its connection last passed a check


class _Bridge(SyncToAsync):
    """``SyncToAsync`` with Django's connection hygiene around each call, as ``DatabaseSyncToAsync``.

    Django's ``close_old_connections`` (``close_if_unusable_or_obsolete`` per
    connection: age, autocommit, errors) runs before and after each call. In
    between, Django pings a connection before its first query of the call
    (``CONN_HEALTH_CHECKS``); here it does so at most once per
    ``ANSWERED_WITHIN`` seconds per connection: one that connected or passed
    the ping that recently is trusted without another.
    """

    def thread_handler(self, loop: Any, *args: Any, **kwargs: Any) -> Any:
        trusted = _before_call()
        try:
            return super().thread_handler(loop, *args, **kwargs)
        finally:
            _after_call(trusted)


def _before_call() -> set[str]:
    checked: dict[str, float] = _checked.__dict__
    now = time.monotonic()
    trusted = set()
    for connection in connections.all(initialized_only=True):
        connection.close_if_unusable_or_obsolete()
        recent = now - checked.get(connection.alias, float("-inf")) < ANSWERED_WITHIN
        if recent and connection.connection is not None:
            connection.health_check_done = True
            trusted.add(connection.alias)
    return trusted


def _after_call(trusted: set[str]) -> None:
    checked: dict[str, float] = _checked.__dict__
    now = time.monotonic()
    for connection in connections.all(initialized_only=True):
        if connection.errors_occurred or connection.connection is None:
            checked.pop(connection.alias, None)
        elif connection.alias not in trusted and connection.health_check_done:
            checked[connection.alias] = now  # it connected or passed the ping during this call
        connection.close_if_unusable_or_obsolete()


_run = _Bridge(
    _guarded,
    thread_sensitive=False,
    executor=ThreadPoolExecutor(max_workers=_db_threads(), thread_name_prefix=THREAD_PREFIX),
)


def close_request_connections(**kwargs: Any) -> None:
    """request_finished: close connections opened on a per-request thread.

    Under ASGI Django runs each sync view on a thread of its own; a persistent
    connection left there would never be used again. The bridge's own threads
    keep theirs.
    """
    if threading.current_thread().name.startswith(THREAD_PREFIX):
        return
    for connection in connections.all(initialized_only=True):
        # Inside a transaction that outlives the request (a test's), leave it.
        if not connection.in_atomic_block:
            connection.close()


async def call(fn: Callable[..., T], /, **kwargs: Any) -> T:
    """Run a blocking service or selector off the event loop."""
    return await _run(fn, kwargs)
