"""Reads of the uid<->connection relation."""

from __future__ import annotations

from collections.abc import Iterator

from .models import Connection, UserStatus


def online_uid_batches(*, batch_size: int, after: int = 0) -> Iterator[tuple[int, list[int]]]:
    """(last relation id, uids new to this walk) for online users, in relation id order.

    Walking by id with a cursor (not OFFSET) keeps each batch one index range
    scan, and lets a run cut off resume at the last id it finished.
    """
    seen: set[int] = set()
    cursor = after
    while True:
        rows = list(
            Connection.objects.filter(user_status=UserStatus.ONLINE, id__gt=cursor)
            .order_by("id")
            .values_list("id", "uid")[:batch_size]
        )
        if not rows:
            return
        cursor = rows[-1][0]
        fresh = list(dict.fromkeys(uid for _, uid in rows if uid not in seen))
        seen.update(fresh)
        yield cursor, fresh


def node_connections(*, node: str) -> list[tuple[int, str]]:
    """(uid, conn_id) of every relation row of one node, online or offline."""
    return list(Connection.objects.filter(node=node).values_list("uid", "conn_id"))


def online_counts() -> dict[str, dict[str, int]]:
    """Per node: distinct online users and sockets (online and offline rows)."""
    from django.db.models import Count, Q

    rows = Connection.objects.values("node").annotate(
        sockets=Count("id"),
        online_sockets=Count("id", filter=Q(user_status=UserStatus.ONLINE)),
        users=Count("uid", distinct=True, filter=Q(user_status=UserStatus.ONLINE)),
    )
    return {
        row["node"]: {"users": row["users"], "online_sockets": row["online_sockets"], "rows": row["sockets"]}
        for row in rows.order_by("node")
    }
