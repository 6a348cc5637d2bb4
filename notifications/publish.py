"""The one function that hands stored notifications to live sockets.

Everything that pushes (the API, jobs, periodic runs, admin resends) calls
``publish_stored`` after its rows are committed. With ``PUSH_FANOUT=hub`` (the
default) a publish is one bus message per chunk of recipients and per node
that holds any of them, sent on that node's own bus channel (connections/bus.py);
the node encodes the shared body once and writes the frame to its local
sockets. A node that holds none of a push's users never sees it. With ``PUSH_FANOUT=layer`` it is the stock
Channels path: one ``group_send`` per user, kept to measure against.

Only users the presence index shows online are published to, and only to the
nodes its entries name: a user who logs in a moment later reads the same rows
as unsent at login, because the rows were committed before the presence
check. A publish whose messages share type, sender and body (a push through
the API) makes the presence look-up and the per-node publishes in one Redis
script, which cuts each node's bus message down to its own online targets
just as the two-step path does; a larger such publish (a job's batch) makes
one script call per chunk of ``BUS_CHUNK`` users.

Guarded by tests/notifications/test_delivery.py.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import redis
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings

from connections import bus
from connections.groups import user_group
from connections.presence import online_key, presence
from connections.protocol import PushTemplate
from pushsite.redis_client import get_redis, redis_configured

from .store import NewMessage

BUS_CHUNK = 2000


def publish_stored(*, messages: Sequence[NewMessage]) -> int:
    """Publish stored messages to their users' live sockets; returns how many were online."""
    if not messages:
        return 0
    if settings.PUSH_FANOUT != "layer" and redis_configured():
        groups = _groups(messages)
        if len(groups) == 1:
            # A job's batch is one group of thousands: one script call per bus
            # chunk, not one EXISTS per user built and parsed in Python (that
            # was a fifth of a broadcast's time, bench/README.md, storage).
            targets = groups[0].pop("to")
            return sum(
                _publish_one_group({**groups[0], "to": targets[start : start + BUS_CHUNK]})
                for start in range(0, len(targets), BUS_CHUNK)
            )
    nodes = presence().nodes(list(dict.fromkeys(m.to_uid for m in messages)))
    live = [m for m in messages if m.to_uid in nodes]
    if not live:
        return 0
    if settings.PUSH_FANOUT == "layer":
        _publish_through_layer(live)
        return len(live)
    per_node: dict[str, list[NewMessage]] = {}
    for m in live:
        for node in nodes[m.to_uid]:
            per_node.setdefault(node, []).append(m)
    bus.publish_addressed(
        (node, {"kind": "push", "groups": _groups(mine[start : start + BUS_CHUNK])})
        for node, mine in per_node.items()
        for start in range(0, len(mine), BUS_CHUNK)
    )
    return len(live)


# Presence look-up and node-addressed publish in one Redis round trip. Each
# online key's values name its nodes ("<node> <client_type> <epoch>"); each
# node gets one bus message cut from the JSON pieces of its own online targets,
# so it is what the two-step path would publish to it. KEYS: presence keys;
# ARGV: node channel prefix, head, tail, then one "[uid,noce_ack]" per key.
# Returns how many keys were online.
_PUBLISH_ONLINE = """
local parts, order = {}, {}
local online = 0
for i, key in ipairs(KEYS) do
  local infos = redis.call('HVALS', key)
  if #infos > 0 then
    online = online + 1
    local seen = {}
    for _, info in ipairs(infos) do
      local node = string.match(info, '^(%S+)')
      if node and not seen[node] then
        seen[node] = true
        local mine = parts[node]
        if mine == nil then
          mine = {}
          parts[node] = mine
          order[#order + 1] = node
        end
        mine[#mine + 1] = ARGV[i + 3]
      end
    end
  end
end
for _, node in ipairs(order) do
  redis.call('PUBLISH', ARGV[1] .. node, ARGV[2] .. table.concat(parts[node], ',') .. ARGV[3])
end
return online
"""


@functools.lru_cache(maxsize=4)
def _publish_online_script(client: redis.Redis) -> Any:
    return client.register_script(_PUBLISH_ONLINE)


def _publish_one_group(group: dict[str, Any]) -> int:
    """A publish whose messages share type, sender and body: one round trip to Redis, one bus message per node.

    Single-user pushes through the API are the common case; the two-step path
    (presence pipeline, then PUBLISH) cost them a second round trip, and every
    round trip is a GIL hand-off on the server (bench/README.md, latency).
    """
    targets = group.pop("to")
    encoded = json.dumps({"kind": "push", "groups": [{**group, "to": []}]}, separators=(",", ":"))
    head, tail = encoded[: -len("]}]}")], "]}]}"
    client = get_redis()
    with bus.redis_call():
        return _publish_online_script(client)(
            keys=[online_key(uid) for uid, _ack in targets],
            # '[uid,"ack"]' as json.dumps of the pair writes it; a str alone takes
            # json's C fast path, the pair its slow general one.
            args=[bus.node_channel_prefix(), head, tail, *(f"[{int(uid)},{json.dumps(ack)}]" for uid, ack in targets)],
            client=client,
        )


def _groups(messages: Sequence[NewMessage]) -> list[dict[str, Any]]:
    """Messages that share type, sender and body travel as one group."""
    groups: dict[tuple[int, int, int], dict[str, Any]] = {}
    for m in messages:
        key = (int(m.msg_type), m.from_uid, id(m.body))
        group = groups.get(key)
        if group is None:
            group = groups[key] = {"msg_type": int(m.msg_type), "from_uid": m.from_uid, "body": m.body, "to": []}
        group["to"].append([m.to_uid, m.noce_ack])
    return list(groups.values())


def _publish_through_layer(messages: Sequence[NewMessage]) -> None:
    async_to_sync(_group_send_each)(messages)


async def _group_send_each(messages: Sequence[NewMessage]) -> None:
    layer = get_channel_layer()
    for m in messages:
        text = PushTemplate(m.msg_type, from_uid=m.from_uid, body=m.body).render(m.to_uid, m.noce_ack)
        await layer.group_send(
            user_group(m.to_uid),
            {"type": "push.frame", "text": text, "noce_ack": m.noce_ack, "msg_type": int(m.msg_type)},
        )
