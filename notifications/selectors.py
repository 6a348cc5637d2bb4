"""Reads of a user's messages; each reads exactly one shard, the user's own.

Every query filters on ``to_uid``: a user can only ever read their own rows.
Guarded by tests/notifications/test_store.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from typing import Any

from django.db import connections
from django.db.models import Count

from connections.inbox import LoginView, Unsent
from connections.protocol import MsgType, PushTemplate

from .sharding import message_model, model_for_uid, shard_alias, uids_by_shard


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
    return [_unsent(row.to_uid, row.noce_ack, row.msg_type, row.from_uid, row.body) for row in rows]


def _unsent(to_uid: int, noce_ack: str, msg_type: int, from_uid: int, body: Any) -> Unsent:
    if isinstance(body, bytes | str):
        body = json.loads(body)
    return Unsent(
        noce_ack=noce_ack,
        frame=PushTemplate(MsgType(msg_type), from_uid=from_uid, body=body).render(to_uid, noce_ack),
        msg_type=int(msg_type),
    )


def logins_read(*, uids: Collection[int], replay_limit: int) -> dict[int, LoginView]:
    """Unread counts and unsent messages for a batch of logins: at most two statements per shard database.

    A reconnect storm logs thousands of users in within seconds. Read one by
    one, each login cost two queries and two database round trips on a
    thread that the next login queued behind (bench/README.md, storm). Here
    one UNION ALL of the batch's shard tables per database counts unread and
    unsent messages per user and type; a second reads the unsent rows of only
    the users that have any (most have none). A user with more unsent rows
    than the replay limit is read on its own, with the limit: rare, and a
    per-user limit inside the UNION (a window) cost a temporary table per shard.
    """
    wanted = sorted(set(uids))
    counts: dict[int, dict[str, int]] = {uid: {} for uid in wanted}
    unsent_n: dict[int, int] = dict.fromkeys(wanted, 0)
    for uid, msg_type, unread, unsent in _union_by_database(wanted, _counts_part):
        counts[uid][str(msg_type)] = unread
        unsent_n[uid] += int(unsent)
    few = [uid for uid, n in unsent_n.items() if 0 < n <= replay_limit]
    many = [uid for uid, n in unsent_n.items() if n > replay_limit] if replay_limit > 0 else []
    unsent: dict[int, list[tuple[int, Unsent]]] = {uid: [] for uid in wanted}
    for row_id, to_uid, noce_ack, msg_type, from_uid, body in _union_by_database(few, _unsent_part) if few else ():
        unsent[to_uid].append((row_id, _unsent(to_uid, noce_ack, msg_type, from_uid, body)))
    views = {}
    for uid in wanted:
        # Rows stored since the count may have come too: the limit holds all the same.
        rows = [u for _, u in sorted(unsent[uid], key=lambda r: r[0])][:replay_limit]
        views[uid] = LoginView(unread_counts=counts[uid], unsent=rows)
    for uid in many:
        views[uid] = LoginView(unread_counts=counts[uid], unsent=unsent_for_user(uid=uid, limit=replay_limit))
    return views


def _columns(connection: Any, shard: int, *names: str) -> tuple[str, ...]:
    meta = message_model(shard)._meta
    return (
        connection.ops.quote_name(meta.db_table),
        *(connection.ops.quote_name(meta.get_field(n).column) for n in names),
    )


def _counts_part(connection: Any, shard: int, uids: list[int]) -> tuple[str, list[Any]]:
    table, to_uid, kind, is_read, is_sent = _columns(connection, shard, "to_uid", "msg_type", "is_read", "is_sent")
    marks = ", ".join(["%s"] * len(uids))
    return (
        f"SELECT {to_uid}, {kind}, COUNT(*), SUM(CASE WHEN {is_sent} = %s THEN 1 ELSE 0 END) FROM {table}"  # noqa: S608 - quoted model names; values bound
        f" WHERE {to_uid} IN ({marks}) AND {is_read} = %s GROUP BY {to_uid}, {kind}",
        [False, *uids, False],
    )


def _unsent_part(connection: Any, shard: int, uids: list[int]) -> tuple[str, list[Any]]:
    table, pk, to_uid, ack, kind, sender, body, is_sent, is_read = _columns(
        connection, shard, "id", "to_uid", "noce_ack", "msg_type", "from_uid", "body", "is_sent", "is_read"
    )
    marks = ", ".join(["%s"] * len(uids))
    return (
        f"SELECT {pk}, {to_uid}, {ack}, {kind}, {sender}, {body} FROM {table}"  # noqa: S608 - as above
        f" WHERE {to_uid} IN ({marks}) AND {is_sent} = %s AND {is_read} = %s",
        [*uids, False, False],
    )


def _union_by_database(uids: list[int], part: Callable[..., tuple[str, list[Any]]], *args: Any) -> list[tuple]:
    """Run ``part`` for each shard the uids live in, one UNION ALL per database (within its parameter limit)."""
    by_alias: dict[str, list[tuple[int, list[int]]]] = {}
    for shard, shard_uids in sorted(uids_by_shard(uids).items()):
        by_alias.setdefault(shard_alias(shard), []).append((shard, shard_uids))
    rows: list[tuple] = []
    for alias, shards in by_alias.items():
        connection = connections[alias]
        for chunk in _within_params(shards, connection.features.max_query_params):
            pieces = [part(connection, shard, shard_uids, *args) for shard, shard_uids in chunk]
            with connection.cursor() as cursor:
                cursor.execute(" UNION ALL ".join(sql for sql, _ in pieces), [p for _, ps in pieces for p in ps])
                rows.extend(cursor.fetchall())
    return rows


def still_unread_of_type(*, uids: list[int], msg_type: int, excluding_prefix: str) -> set[int]:
    """Users who have an unread message of this type other than those whose noce_ack has the prefix.

    A job asks this for every batch of thousands of users: one statement per
    shard database (a SELECT per shard table, joined by UNION ALL), written
    out, because building 128 querysets per batch cost more than the queries.
    """
    return {uid for (uid,) in _union_by_database(uids, _unread_of_type_part, msg_type, excluding_prefix)}


def _unread_of_type_part(
    connection: Any, shard: int, uids: list[int], msg_type: int, excluding_prefix: str
) -> tuple[str, list[Any]]:
    table, to_uid, kind, is_read, ack = _columns(connection, shard, "to_uid", "msg_type", "is_read", "noce_ack")
    return (
        f"SELECT {to_uid} FROM {table} WHERE {to_uid} IN ({', '.join(['%s'] * len(uids))})"  # noqa: S608 - as above
        f" AND {kind} = %s AND {is_read} = %s AND NOT ({ack} {connection.operators['startswith'] % '%s'})",
        [*uids, msg_type, False, connection.ops.prep_for_like_query(excluding_prefix) + "%"],
    )


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
