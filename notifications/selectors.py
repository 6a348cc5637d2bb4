"""Reads of a user's messages; each reads exactly one shard, the user's own.

Every query filters on ``to_uid``: a user can only ever read their own rows.
Guarded by tests/notifications/test_store.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db import connections
from django.db.models import Count

from connections.protocol import MsgType, PushTemplate

from .sharding import message_model, model_for_uid, shard_alias, uids_by_shard


@dataclass(frozen=True, slots=True)
class Unsent:
    noce_ack: str
    frame: str


def unread_counts(*, uid: int) -> dict[str, int]:
    """Unread messages per msg_type, keys as strings (JSON object keys)."""
    rows = (
        model_for_uid(uid)
        .objects.filter(to_uid=uid, is_read=False)
        .values("msg_type")
        .annotate(n=Count("id"))
        .order_by()
    )
    return {str(row["msg_type"]): row["n"] for row in rows}


def message_item(row: Any) -> dict[str, Any]:
    """A stored message as a client sees it in an ``unread`` reply."""
    return {
        "noce_ack": row.noce_ack,
        "msg_type": row.msg_type,
        "uid": row.from_uid,
        "body": {**row.body, "to_uid": row.to_uid},
        "is_sent": row.is_sent,
        "create_time": int(row.create_time.timestamp() * 1000),
    }


def unread_for_user(*, uid: int, limit: int, msg_type: int | None = None) -> dict[str, Any]:
    """Unread messages newest first, and the counts per type."""
    rows = model_for_uid(uid).objects.filter(to_uid=uid, is_read=False)
    if msg_type is not None:
        rows = rows.filter(msg_type=msg_type)
    items = [message_item(row) for row in rows.order_by("-create_time", "-id")[:limit]]
    return {"items": items, "counts": unread_counts(uid=uid)}


def unsent_for_user(*, uid: int, limit: int) -> list[Unsent]:
    """Messages never handed to a socket, oldest first, as ready frames."""
    rows = model_for_uid(uid).objects.filter(to_uid=uid, is_sent=False, is_read=False).order_by("id")[:limit]
    return [
        Unsent(
            noce_ack=row.noce_ack,
            frame=PushTemplate(MsgType(row.msg_type), from_uid=row.from_uid, body=row.body).render(
                row.to_uid, row.noce_ack
            ),
        )
        for row in rows
    ]


def still_unread_of_type(*, uids: list[int], msg_type: int, excluding_prefix: str) -> set[int]:
    """Users who have an unread message of this type other than those whose noce_ack has the prefix.

    A job asks this for every batch of thousands of users: one statement per
    shard database (a SELECT per shard table, joined by UNION ALL), written
    out, because building 128 querysets per batch cost more than the queries.
    """
    by_alias: dict[str, list[tuple[int, list[int]]]] = {}
    for shard, shard_uids in uids_by_shard(uids).items():
        by_alias.setdefault(shard_alias(shard), []).append((shard, shard_uids))
    found: set[int] = set()
    for alias, shards in by_alias.items():
        connection = connections[alias]
        for chunk in _within_params(shards, connection.features.max_query_params):
            sql, params = _unread_union(connection, chunk, msg_type, excluding_prefix)
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                found.update(uid for (uid,) in cursor.fetchall())
    return found


def _unread_union(
    connection: Any, shards: list[tuple[int, list[int]]], msg_type: int, excluding_prefix: str
) -> tuple[str, list[Any]]:
    """The UNION ALL of one database's shard tables; only quoted names are put in the text."""
    qn = connection.ops.quote_name
    parts, params = [], []
    for shard, shard_uids in shards:
        meta = message_model(shard)._meta
        to_uid, kind, is_read, ack = (
            qn(meta.get_field(n).column) for n in ("to_uid", "msg_type", "is_read", "noce_ack")
        )
        parts.append(
            f"SELECT {to_uid} FROM {qn(meta.db_table)} WHERE {to_uid} IN ({', '.join(['%s'] * len(shard_uids))})"  # noqa: S608
            f" AND {kind} = %s AND {is_read} = %s AND NOT ({ack} {connection.operators['startswith'] % '%s'})"
        )
        params += [*shard_uids, msg_type, False, connection.ops.prep_for_like_query(excluding_prefix) + "%"]
    return " UNION ALL ".join(parts), params


def _within_params(shards: list[tuple[int, list[int]]], limit: int | None) -> list[list[tuple[int, list[int]]]]:
    """Shards grouped so that no statement passes the backend's limit of parameters."""
    chunks: list[list[tuple[int, list[int]]]] = [[]]
    used = 0
    for shard, shard_uids in shards:
        params = len(shard_uids) + 3
        if limit is not None and chunks[-1] and used + params > limit:
            chunks.append([])
            used = 0
        chunks[-1].append((shard, shard_uids))
        used += params
    return chunks
