"""The one way consumers reach the database and other blocking backends.

Every call runs in Channels' database thread (which closes stale connections
around it), and backend failures come out as ``BackendUnavailable`` so the
consumer can answer 503 and keep the socket. Because no ORM call happens
outside this module, the consumer may skip Channels' per-message
``aclose_old_connections`` (connections/consumers.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import redis
from channels.db import database_sync_to_async
from django.db import DatabaseError, IntegrityError

from pushsite.errors import BackendUnavailable

T = TypeVar("T")


def _guarded(fn: Callable[..., T], kwargs: dict[str, Any]) -> T:
    try:
        return fn(**kwargs)
    except IntegrityError:
        raise
    except DatabaseError as error:
        raise BackendUnavailable(f"database unavailable: {error.__class__.__name__}") from error
    except redis.RedisError as error:
        raise BackendUnavailable(f"redis unavailable: {error.__class__.__name__}") from error


_run = database_sync_to_async(_guarded)


async def call(fn: Callable[..., T], /, **kwargs: Any) -> T:
    """Run a blocking service or selector off the event loop."""
    return await _run(fn, kwargs)
