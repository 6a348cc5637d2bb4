"""Reads of a user's messages; each reads exactly one shard, the user's own.

Every query filters on ``to_uid``: a user can only ever read their own rows.
Guarded by tests/notifications/test_store.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db.models import Count

from connections.protocol import MsgType, PushTemplate

from .sharding import message_model, model_for_uid, uids_by_shard


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
    """Users who have an unread message of this type other than those whose noce_ack has the prefix."""
    by_shard = uids_by_shard(uids)
    found: set[int] = set()
    for shard, shard_uids in by_shard.items():
        found.update(
            message_model(shard)
            .objects.filter(to_uid__in=shard_uids, msg_type=msg_type, is_read=False)
            .exclude(noce_ack__startswith=excluding_prefix)
            .values_list("to_uid", flat=True)
        )
    return found
