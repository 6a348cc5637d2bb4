"""``REDIS_URL``: one Redis server, or a Redis Sentinel group, and what each Redis user needs from it.

Two forms (docs/protocol.md, configuration):

* ``redis://[:password@]host:port/<db>``: one server, as redis-py reads it;
* ``redis+sentinel://[:password@]host:port[,host:port...]/<master name>[/<db>][?sentinel_password=<pw>]``:
  the sentinels to ask, the name they monitor the master under, and the
  database number (default 0). The password is the master's (and its
  replicas'); the sentinels are asked with ``sentinel_password`` when it is
  given (a sentinel with ``requirepass``), without one otherwise.

Each part of pushsite that talks to Redis speaks Sentinel through its own
library (redis-py for the bus, presence and the login cache; channels-redis;
kombu for the Celery broker). This module turns the one URL into the form each
of them takes, so that settings and pushsite/redis_client.py agree. It does not
import Django (settings reads it at start-up), and redis-py only for the
options of a sentinel connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

SENTINEL_SCHEME = "redis+sentinel://"

# Asked of the sentinels themselves: a sentinel that does not answer must not
# hold up a look-up that another one could answer.
SENTINEL_SOCKET_OPTIONS = {"socket_connect_timeout": 1, "socket_timeout": 1}


@dataclass(frozen=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int
    password: str | None
    sentinel_password: str | None = None

    def sentinel_options(self, *, for_asyncio: bool = False) -> dict[str, Any]:
        """What a connection to a sentinel needs: short timeouts, no retries, and its password if it has one.

        No retries: redis-py's own default for a client retries a failed
        command three times with jittered backoff of up to 2, 4 and 8 s, so a
        sentinel that refuses (a wrong password) or does not answer held a
        push for up to 14 s. Whoever asks decides what to do about a failure
        (the API answers 503 at once; the bus resubscribes). ``for_asyncio`` picks
        the retry policy of redis-py's asyncio clients (channels-redis, ours).

        The password goes in a credential provider, not as ``password``:
        redis-py's "No master found" error spells out every keyword of the
        sentinels' connections, and that error reaches log lines.
        """
        from redis.backoff import NoBackoff

        if for_asyncio:
            from redis.asyncio.retry import Retry
        else:
            from redis.retry import Retry  # type: ignore[assignment]
        options: dict[str, Any] = {**SENTINEL_SOCKET_OPTIONS, "retry": Retry(NoBackoff(), 0)}
        if self.sentinel_password:
            from redis.credentials import UsernamePasswordCredentialProvider

            options["credential_provider"] = UsernamePasswordCredentialProvider(password=self.sentinel_password)
        return options

    def master_options(self) -> dict[str, Any]:
        """What a connection to the master needs besides its address."""
        return {"db": self.db, **({"password": self.password} if self.password else {})}

    def kombu_url(self) -> str:
        """kombu's form: one ``sentinel://`` URL per sentinel, separated by ``;``."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return ";".join(f"sentinel://{auth}{host}:{port}/{self.db}" for host, port in self.sentinels)


def parse_sentinel_url(url: str) -> SentinelURL | None:
    """The Sentinel form of ``url``, None for any other URL; ValueError if it is malformed."""
    if not url.startswith(SENTINEL_SCHEME):
        return None
    rest, _, query = url[len(SENTINEL_SCHEME) :].partition("?")
    location, _, path = rest.partition("/")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - {"sentinel_password"})
    if unknown:
        raise ValueError(f"REDIS_URL: unknown option {unknown[0]!r} (only sentinel_password is known)")
    password = None
    if "@" in location:
        auth, _, location = location.rpartition("@")
        _user, _, secret = auth.partition(":")
        password = unquote(secret) or None
    sentinels = []
    for part in location.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"REDIS_URL: a sentinel must be host:port, got {part!r}")
        sentinels.append((host.strip("[]"), int(port)))
    names = [segment for segment in path.split("/") if segment]
    if not names or len(names) > 2:
        raise ValueError("REDIS_URL: redis+sentinel:// needs /<master name>[/<db>] after the sentinels")
    master = unquote(names[0])
    db = names[1] if len(names) == 2 else "0"
    if not db.isdigit():
        raise ValueError(f"REDIS_URL: the database must be a number, got {db!r}")
    return SentinelURL(
        sentinels=tuple(sentinels),
        master=master,
        db=int(db),
        password=password,
        sentinel_password=options.get("sentinel_password") or None,
    )


def channel_layer_host(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """One entry of channels-redis' ``hosts`` for ``url``."""
    sentinel = parse_sentinel_url(url)
    if sentinel is None:
        return {"address": url, **options}
    return {
        "sentinels": list(sentinel.sentinels),
        "master_name": sentinel.master,
        "sentinel_kwargs": sentinel.sentinel_options(for_asyncio=True),
        **sentinel.master_options(),
        **options,
    }


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL and transport options for ``url``."""
    sentinel = parse_sentinel_url(url)
    if sentinel is None:
        return url, {}
    return sentinel.kombu_url(), {"master_name": sentinel.master, "sentinel_kwargs": sentinel.sentinel_options()}
