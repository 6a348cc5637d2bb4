"""Where a user's messages live: the one place that maps a uid to its shard.

Invariants:
* ``shard_of(uid) == uid % SHARD_COUNT``; nothing else computes a shard;
* shard ``n`` is table ``user_push_msg_<n>`` on database alias
  ``shard_alias(n)``; the aliases come from ``PUSH_SHARD_DATABASES`` and split
  the 128 shards into contiguous ranges;
* shard models live in their own app registry, so migrations and content
  types never see them; ``manage.py init_push_tables`` creates their tables.

Guarded by tests/notifications/test_sharding.py.
"""

from __future__ import annotations

import functools

from django.apps.registry import Apps
from django.conf import settings
from django.db import models

SHARD_COUNT = 128
TABLE_PREFIX = "user_push_msg_"

# A registry of their own: 128 twin models must not reach makemigrations,
# content types or the admin index.
shard_apps = Apps()


def shard_of(uid: int) -> int:
    """The shard index of a uid."""
    return uid % SHARD_COUNT


def uids_by_shard(uids: list[int]) -> dict[int, list[int]]:
    """The uids grouped by their shard, so each shard is read with one query."""
    grouped: dict[int, list[int]] = {}
    for uid in uids:
        grouped.setdefault(shard_of(uid), []).append(uid)
    return grouped


def shard_table(shard: int) -> str:
    return f"{TABLE_PREFIX}{shard}"


def shard_alias(shard: int) -> str:
    """The database alias that holds a shard."""
    aliases = settings.PUSH_SHARD_DATABASES
    return aliases[shard * len(aliases) // SHARD_COUNT]


def shards_by_alias() -> dict[str, list[int]]:
    result: dict[str, list[int]] = {}
    for shard in range(SHARD_COUNT):
        result.setdefault(shard_alias(shard), []).append(shard)
    return result


@functools.cache
def message_model(shard: int) -> type[models.Model]:
    """The model class of one shard table."""
    if not 0 <= shard < SHARD_COUNT:
        raise ValueError(f"shard must be 0..{SHARD_COUNT - 1}, got {shard}")
    from .models import PushMessageBase

    # Meta must inherit the abstract base's, or the indexes are lost.
    meta = type(
        "Meta",
        (PushMessageBase.Meta,),
        {"db_table": shard_table(shard), "managed": False, "apps": shard_apps, "app_label": "notifications"},
    )
    return type(
        f"PushMessageShard{shard}",
        (PushMessageBase,),
        {"__module__": "notifications.models", "Meta": meta, "shard": shard},
    )


def model_for_uid(uid: int) -> type[models.Model]:
    return message_model(shard_of(uid))
