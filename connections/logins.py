"""The login pipeline: verified sockets logged in by the batch, and admission control.

Every deploy or network blip brings a node's clients back at once. Per login
the session writes a relation row and a presence entry and reads the unread
counts and the unsent replay; done one login at a time, each was its own
database round trip on a thread that the next login queued behind
(bench/README.md, storm). Here the logins waiting together go as one batch:
one bridge call, inside it one presence pipeline, one multi-row upsert and
the inbox's batched reads (``services.sessions_login``). Login-key look-ups are
batched the same way (``connections.auth``), and so are the relation
clean-ups of sockets that close together (a network blip closes them all).

Admission control: when logins wait longer than ``PUSH_LOGIN_MAX_WAIT``
seconds for their answer (in the batch being written or waiting for the next),
a new socket is told at once to come back later
(KICK 503 with ``retry_after``, close 1013) instead of queueing until its
client gives up; ``retry_after`` is the time the backlog needs to drain at
the measured rate, within ``1..PUSH_LOGIN_RETRY_AFTER_MAX``.

Invariants:
* a refused or failed login writes no row and no presence entry (a batch that
  failed as a whole is reported to each of its logins, which clean up as one);
* one batch of logins is in the database at a time, so the database threads
  stay free for acks, sent marks and housekeeping.

Guarded by tests/connections/test_logins.py.
"""

from __future__ import annotations

import asyncio
import gc
import math

from django.conf import settings

from . import bridge, services
from .batching import Batcher, batcher, loop_batchers
from .inbox import LoginView
from .services import LoginRequest, TooManySockets

SESSIONS = "login-sessions"
CLOSES = "session-closes"


async def _sessions(batch: list[LoginRequest]) -> list[LoginView | TooManySockets]:
    if len(batch) >= STORM_BATCH:
        _relax_gc_for_the_storm()
    return await bridge.call(services.sessions_login, logins=batch)


# A batch this large means a storm. Python's collector then runs its young
# generation every 700 new objects, and each run walks the sockets' objects
# that survived: +30 % logins/s at 5,000 sockets with a higher threshold
# (bench/README.md, storm). Kept high only while the storm lasts, and never
# over an operator's own PUSH_GC_THRESHOLD: a permanently high one let memory
# drift under churn (bench/soak.py).
STORM_BATCH = 8
STORM_GC_THRESHOLD = (50_000, 20, 20)
STORM_CALM_AFTER = 5.0
_calm: asyncio.TimerHandle | None = None
_normal_gc: tuple[int, int, int] | None = None


def _relax_gc_for_the_storm() -> None:
    global _calm, _normal_gc
    if settings.PUSH_GC_THRESHOLD:
        return
    if _normal_gc is None:
        _normal_gc = gc.get_threshold()
        gc.set_threshold(*STORM_GC_THRESHOLD)
    if _calm is not None:
        _calm.cancel()
    _calm = asyncio.get_running_loop().call_later(STORM_CALM_AFTER, _storm_over)


def _storm_over() -> None:
    global _calm, _normal_gc
    if _normal_gc is not None:
        gc.set_threshold(*_normal_gc)
    _calm = _normal_gc = None


def _session_batcher() -> Batcher[LoginRequest, LoginView]:
    return batcher(SESSIONS, _sessions, max_batch=settings.PUSH_LOGIN_BATCH)


async def session_login(request: LoginRequest) -> LoginView:
    """Log one verified socket in with whatever logins wait beside it; raises TooManySockets or BackendUnavailable."""
    return await _session_batcher().submit(request)


async def _closes(batch: list[tuple[int, str]]) -> list[None]:
    await bridge.call(services.connections_close, pairs=batch)
    return [None] * len(batch)


async def session_close(uid: int, conn_id: str) -> None:
    """Remove a closed socket's row and presence entry with the others closing now; may raise BackendUnavailable."""
    await batcher(CLOSES, _closes, max_batch=settings.PUSH_LOGIN_BATCH).submit((uid, conn_id))


def retry_after() -> int | None:
    """Seconds a new socket should wait before it logs in, or None when logins are answered in time."""
    batchers = [b for b in loop_batchers() if b.name != CLOSES]
    if not batchers or max(b.oldest_wait() for b in batchers) <= settings.PUSH_LOGIN_MAX_WAIT:
        return None
    drain = max(len(b) / max(b.rate, 1.0) for b in batchers)
    return max(1, min(settings.PUSH_LOGIN_RETRY_AFTER_MAX, math.ceil(drain)))
