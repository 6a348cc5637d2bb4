"""The fast uid -> live connections look-up (PROTOCOL.md section 4).

With Redis: one hash per uid, ``<prefix>:online:<uid>``, field = connection
id, value = "<node> <client_type> <login epoch s>". Without Redis (embedded
default, one process) the same shape lives in a dict. The relation table stays
the source of truth; this index is rebuilt from it by node reaping and logins.
"""

from __future__ import annotations

import threading

from django.conf import settings

from pushsite.redis_client import get_redis, redis_configured


def online_key(uid: int) -> str:
    return f"{settings.PUSH_REDIS_PREFIX}:online:{uid}"


def _nodes_of(infos: list[str] | tuple[str, ...]) -> set[str]:
    """The nodes named by presence values ("<node> <client_type> <epoch>")."""
    return {info.split(" ", 1)[0] for info in infos}


class _LocalPresence:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[int, dict[str, str]] = {}

    def add(self, uid: int, conn_id: str, info: str) -> None:
        with self._lock:
            self._data.setdefault(uid, {})[conn_id] = info

    def add_many(self, entries: list[tuple[int, str, str]]) -> None:
        with self._lock:
            for uid, conn_id, info in entries:
                self._data.setdefault(uid, {})[conn_id] = info

    def remove(self, pairs: list[tuple[int, str]]) -> None:
        with self._lock:
            for uid, conn_id in pairs:
                conns = self._data.get(uid)
                if conns is not None:
                    conns.pop(conn_id, None)
                    if not conns:
                        del self._data[uid]

    def connections(self, uid: int) -> dict[str, str]:
        with self._lock:
            return dict(self._data.get(uid, {}))

    def counts(self, uids: list[int]) -> dict[int, int]:
        with self._lock:
            return {uid: len(self._data.get(uid, ())) for uid in uids}

    def online(self, uids: list[int]) -> set[int]:
        with self._lock:
            return {uid for uid in uids if self._data.get(uid)}

    def nodes(self, uids: list[int]) -> dict[int, set[str]]:
        """The nodes holding each online uid's sockets; offline uids are left out."""
        with self._lock:
            return {uid: _nodes_of(tuple(conns.values())) for uid in uids if (conns := self._data.get(uid))}


class _RedisPresence:
    def add(self, uid: int, conn_id: str, info: str) -> None:
        get_redis().hset(online_key(uid), conn_id, info)

    def add_many(self, entries: list[tuple[int, str, str]]) -> None:
        if not entries:
            return
        pipe = get_redis().pipeline(transaction=False)
        for uid, conn_id, info in entries:
            pipe.hset(online_key(uid), conn_id, info)
        pipe.execute()

    def remove(self, pairs: list[tuple[int, str]]) -> None:
        if not pairs:
            return
        pipe = get_redis().pipeline(transaction=False)
        for uid, conn_id in pairs:
            pipe.hdel(online_key(uid), conn_id)
        pipe.execute()

    def connections(self, uid: int) -> dict[str, str]:
        return get_redis().hgetall(online_key(uid))

    def counts(self, uids: list[int]) -> dict[int, int]:
        """Live connections per uid, in one round trip."""
        if not uids:
            return {}
        pipe = get_redis().pipeline(transaction=False)
        for uid in uids:
            pipe.hlen(online_key(uid))
        return dict(zip(uids, pipe.execute(), strict=True))

    def online(self, uids: list[int]) -> set[int]:
        if not uids:
            return set()
        pipe = get_redis().pipeline(transaction=False)
        for uid in uids:
            pipe.exists(online_key(uid))
        return {uid for uid, found in zip(uids, pipe.execute(), strict=True) if found}

    def nodes(self, uids: list[int]) -> dict[int, set[str]]:
        """The nodes holding each online uid's sockets, in one round trip; offline uids are left out."""
        if not uids:
            return {}
        pipe = get_redis().pipeline(transaction=False)
        for uid in uids:
            pipe.hvals(online_key(uid))
        return {uid: _nodes_of(infos) for uid, infos in zip(uids, pipe.execute(), strict=True) if infos}


_local = _LocalPresence()
_redis = _RedisPresence()


def presence() -> _LocalPresence | _RedisPresence:
    """The index for the current configuration."""
    return _redis if redis_configured() else _local
