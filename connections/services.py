"""Writes to the uid<->connection relation and the node liveness marks.

Invariants:
* a relation row and its presence entry are written and removed together, and
  a node writes its online rows' entries again after Redis comes back;
* a node's rows are removed only when its liveness mark is older than
  ``PUSH_NODE_DEAD_AFTER`` and only rows not touched since then, so a node
  that comes back and logs a user in is never reaped by a slow peer.

Guarded by tests/connections/test_relation.py and tests/faults/test_redis_restart.py.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from pushsite.errors import BackendUnavailable

from . import bus
from .inbox import LoginView, inbox
from .models import Connection, Node, UserStatus
from .presence import presence
from .protocol import ClientType

# Rows of this node id older than this were left by an earlier process.
PROCESS_STARTED_AT = timezone.now()


@functools.cache
def _generated_node_id() -> str:
    host = socket.gethostname().split(".")[0][:32]
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def node_id() -> str:
    """This process's node id: PUSH_NODE_ID, else host-pid-random."""
    return settings.PUSH_NODE_ID or _generated_node_id()


def node_heartbeat(*, node: str) -> None:
    """Refresh this node's liveness mark."""
    now = timezone.now()
    updated = Node.objects.filter(node_id=node).update(heartbeat_at=now)
    if not updated:
        Node.objects.update_or_create(
            node_id=node,
            defaults={
                "hostname": socket.gethostname()[:255],
                "pid": os.getpid(),
                "started_at": now,
                "heartbeat_at": now,
            },
        )


def node_start(*, node: str) -> int:
    """Mark a node alive and clear what an earlier process with its id left behind.

    A node restarted under the same PUSH_NODE_ID (a systemd instance, say)
    heartbeats at once, so the reaper would never see its old rows as dead.
    """
    node_heartbeat(node=node)
    rows = Connection.objects.filter(node=node, login_time__lt=PROCESS_STARTED_AT)
    pairs = list(rows.values_list("uid", "conn_id"))
    if pairs:
        rows.delete()
        presence().remove(pairs)
    return len(pairs)


def node_reap_dead(*, dead_after: int | None = None) -> int:
    """Delete relation rows of nodes whose liveness mark went stale; return how many."""
    if dead_after is None:
        dead_after = settings.PUSH_NODE_DEAD_AFTER
    cutoff = timezone.now() - timedelta(seconds=dead_after)
    removed = 0
    for dead in Node.objects.filter(heartbeat_at__lt=cutoff).values_list("node_id", flat=True):
        rows = Connection.objects.filter(node=dead, update_time__lt=cutoff)
        pairs = list(rows.values_list("uid", "conn_id"))
        if pairs:
            rows.delete()
            presence().remove(pairs)
            removed += len(pairs)
        if not Connection.objects.filter(node=dead).exists():
            Node.objects.filter(node_id=dead, heartbeat_at__lt=cutoff).delete()
    return removed


def node_leave(*, node: str) -> int:
    """Remove every row of a node that is shutting down (or was found dead)."""
    rows = Connection.objects.filter(node=node)
    pairs = list(rows.values_list("uid", "conn_id"))
    rows.delete()
    presence().remove(pairs)
    Node.objects.filter(node_id=node).delete()
    return len(pairs)


@dataclass(frozen=True, slots=True)
class LoginRequest:
    """A verified socket that logs in as uid."""

    uid: int
    conn_id: str
    node: str
    client_type: ClientType


def connection_login(*, uid: int, conn_id: str, node: str, client_type: ClientType) -> Connection:
    """Record that a socket logged in as uid."""
    connections_login(logins=[LoginRequest(uid=uid, conn_id=conn_id, node=node, client_type=client_type)])
    return Connection.objects.get(conn_id=conn_id)


_UPSERT_FIELDS = ["uid", "node", "user_status", "client_type", "login_time", "update_time"]


def connections_login(*, logins: list[LoginRequest]) -> None:
    """Record a batch of logins: one multi-row upsert, then one presence pipeline.

    A socket that logged out and in again already has its (offline) row, so
    the statement updates on a conn_id conflict rather than fails.
    """
    if not logins:
        return
    now = timezone.now()
    rows = [
        Connection(
            uid=login.uid,
            conn_id=login.conn_id,
            node=login.node,
            user_status=UserStatus.ONLINE,
            client_type=int(login.client_type),
            login_time=now,
            update_time=now,
        )
        for login in logins
    ]
    features = transaction.get_connection(Connection.objects.db).features
    # MySQL's ON DUPLICATE KEY UPDATE names no target: Django refuses one there.
    target = ["conn_id"] if features.supports_update_conflicts_with_target else None
    Connection.objects.bulk_create(rows, update_conflicts=True, unique_fields=target, update_fields=_UPSERT_FIELDS)
    presence().add_many(
        [
            (
                login.uid,
                login.conn_id,
                presence_info(node=login.node, client_type=int(login.client_type), login_time=now),
            )
            for login in logins
        ]
    )


def presence_info(*, node: str, client_type: int, login_time: datetime) -> str:
    """The presence entry's value (docs/protocol.md section 8)."""
    return f"{node} {client_type} {int(login_time.timestamp())}"


def node_presence_restore(*, node: str) -> int:
    """Write the presence entries of this node's online rows again; returns how many.

    A Redis restarted empty has forgotten every entry while the sockets stay
    open, and a publish skips users without one. The relation table is the
    source of truth. A socket that closes or logs out meanwhile changes its row
    before its entry, so the second read finds and removes an entry written
    back for a row that is gone.
    """
    online = Connection.objects.filter(node=node, user_status=UserStatus.ONLINE)
    rows = list(online.values_list("uid", "conn_id", "client_type", "login_time"))
    presence().add_many(
        [(uid, conn_id, presence_info(node=node, client_type=ct, login_time=at)) for uid, conn_id, ct, at in rows]
    )
    kept = set(online.filter(conn_id__in=[conn_id for _, conn_id, _, _ in rows]).values_list("conn_id", flat=True))
    gone = [(uid, conn_id) for uid, conn_id, _, _ in rows if conn_id not in kept]
    presence().remove(gone)
    return len(rows) - len(gone)


def connection_logout(*, uid: int, conn_id: str) -> None:
    """Mark a socket's relation offline; the socket stays open, anonymous."""
    Connection.objects.filter(conn_id=conn_id).update(user_status=UserStatus.OFFLINE, update_time=timezone.now())
    presence().remove([(uid, conn_id)])


def connection_close(*, uid: int, conn_id: str) -> None:
    """Forget a socket that closed."""
    connections_close(pairs=[(uid, conn_id)])


def connections_close(*, pairs: list[tuple[int, str]]) -> None:
    """Forget a batch of closed sockets: one DELETE, one presence pipeline."""
    Connection.objects.filter(conn_id__in=[conn_id for _, conn_id in pairs]).delete()
    presence().remove(pairs)


class TooManySockets(Exception):
    """The user holds PUSH_MAX_SOCKETS_PER_USER sockets already."""


def oldest_sockets(uid: int, n: int) -> list[str]:
    """The conn_ids of a user's ``n`` oldest logged-in sockets, across nodes (by login time, then number)."""

    def age(item: tuple[str, str]) -> tuple[int, str, int]:
        conn_id, info = item
        node, _, number = conn_id.rpartition(".")
        parts = info.split()
        login_time = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
        return (login_time, node, int(number) if number.isdigit() else 0)

    return [conn_id for conn_id, _ in sorted(presence().connections(uid).items(), key=age)[:n]]


def sockets_evict(*, conn_ids: list[str]) -> None:
    """Tell the nodes that hold these sockets to kick them (KICK 4001); their own close removes their rows."""
    if conn_ids:
        # Without the bus the new login still stands; the user is over the limit until a socket closes.
        with contextlib.suppress(BackendUnavailable):
            bus.publish({"kind": "evict", "conn_ids": conn_ids}, nodes={bus.node_of(c) for c in conn_ids})


def sessions_login(*, logins: list[LoginRequest]) -> list[LoginView | TooManySockets]:
    """Log a batch of verified sockets in; for each, what it is shown, or why it was refused.

    One presence pipeline counts the users' sockets, one upsert writes the
    accepted rows, one pipeline their presence entries, and the inbox reads
    the whole batch's counts and unsent messages together. A user over
    PUSH_MAX_SOCKETS_PER_USER keeps the new sockets; the oldest are evicted.
    """
    limit = settings.PUSH_MAX_SOCKETS_PER_USER
    held = presence().counts(list(dict.fromkeys(login.uid for login in logins)))
    accepted: list[LoginRequest] = list(logins)
    results: list[LoginView | TooManySockets | None] = [None] * len(logins)
    for login in logins:
        held[login.uid] += 1
    connections_login(logins=accepted)
    # A user over the limit loses the oldest sockets, not the newest: whoever
    # holds a user's key cannot fill the slots and lock the real user out.
    over = {uid: count - limit for uid, count in held.items() if count > limit}
    if over:
        sockets_evict(conn_ids=[conn_id for uid, excess in over.items() for conn_id in oldest_sockets(uid, excess)])
    try:
        views = inbox().logins_read(
            uids={login.uid for login in accepted}, replay_limit=settings.PUSH_LOGIN_REPLAY_LIMIT
        )
    except Exception:
        # Each login is told it failed; none may keep a row or presence entry
        # (the sockets retry the removal themselves if this one fails too).
        with contextlib.suppress(Exception):
            connections_close(pairs=[(login.uid, login.conn_id) for login in accepted])
        raise
    return [views[login.uid] if result is None else result for login, result in zip(logins, results, strict=True)]
