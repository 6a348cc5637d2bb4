"""Login verification against the main site (PROTOCOL.md section 3).

Invariants:
* the main site is asked at most once per login key per cache period, per
  process at most once at a time (concurrent logins with one key share a call);
* a refusal (uid 0 or a refusing code) is ``LoginRefused``; the site down,
  slow or answering garbage is ``BackendUnavailable``, never a refusal;
* login keys are never stored in clear: cache keys hold their SHA-256;
* the cache look-ups of logins that wait together are one round trip (MGET),
  and so are their writes (``connections.batching``).

Guarded by tests/connections/test_auth.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import weakref

import httpx
from django.conf import settings
from django.core.cache import cache

from pushsite import metrics
from pushsite.errors import BackendUnavailable

from . import bridge, throttle
from .batching import batcher

log = logging.getLogger(__name__)

DEV_KEY = re.compile(r"^(?:dev-)?([1-9][0-9]{0,11})$")


class LoginRefused(Exception):
    """The main site does not know this login key."""


def dev_verifier_active() -> bool:
    """The built-in verifier stands in for the main site only in the local profile."""
    return not settings.PUSH_AUTH_VERIFY_URL and settings.PUSH_ENV == "local"


def dev_verify(login_key: str) -> int:
    """Development verifier: ``dev-<uid>`` or ``<uid>`` logs in as that uid."""
    match = DEV_KEY.match(login_key)
    return int(match.group(1)) if match else 0


def _cache_key(login_key: str) -> str:
    return "login:" + hashlib.sha256(login_key.encode()).hexdigest()


def _cache_get_many(*, keys: list[str]) -> dict[str, int]:
    return cache.get_many(keys)


def _cache_set_many(*, entries: list[tuple[str, int]]) -> None:
    for uids, ttl in (
        ({key: uid for key, uid in entries if uid}, settings.PUSH_LOGIN_CACHE_TTL),
        ({key: uid for key, uid in entries if not uid}, settings.PUSH_LOGIN_NEGATIVE_CACHE_TTL),
    ):
        if uids and ttl > 0:
            cache.set_many(uids, ttl)


async def _cache_lookups(keys: list[str]) -> list[int | None]:
    """A batch of logins' cache look-ups in one round trip (MGET); None where not cached."""
    try:
        found = await bridge.call(_cache_get_many, keys=list(dict.fromkeys(keys)))
    except BackendUnavailable:
        found = {}  # a cache outage must not stop logins; the site still answers
    return [found.get(key) for key in keys]


async def _cache_writes(entries: list[tuple[str, int]]) -> list[None]:
    """A batch of fresh answers cached in one round trip per TTL."""
    try:
        await bridge.call(_cache_set_many, entries=entries)
    except BackendUnavailable:
        log.warning("login cache unavailable; %d logins verified without caching", len(entries))
    return [None] * len(entries)


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()
_inflight: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Future[int]]] = (
    weakref.WeakKeyDictionary()
)


def _client() -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            headers={"User-Agent": "pushsite-login-verifier"},
        )
        _clients[loop] = client
    return client


async def close_http_client() -> None:
    """Close this loop's HTTP client (at shutdown and between tests)."""
    client = _clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.aclose()


async def ask_main_site(login_key: str) -> int:
    """One verify call; returns the uid (0: unknown)."""
    try:
        return await _ask_main_site(login_key)
    except BackendUnavailable:
        metrics.backend_error("verify")
        raise


async def _ask_main_site(login_key: str) -> int:
    params = {
        "timestamp": str(int(time.time())),
        "loginkey": login_key,
        "token": settings.PUSH_AUTH_VERIFY_TOKEN,
    }
    try:
        response = await _client().get(
            settings.PUSH_AUTH_VERIFY_URL, params=params, timeout=settings.PUSH_AUTH_VERIFY_TIMEOUT
        )
    except httpx.HTTPError as error:
        raise BackendUnavailable(f"login service unreachable: {error.__class__.__name__}") from error
    if response.status_code >= 500 or response.status_code == 429:
        raise BackendUnavailable(f"login service answered HTTP {response.status_code}")
    if response.status_code in (401, 403, 404):
        return 0
    try:
        answer = response.json()
        code = answer.get("code")
        uid = (answer.get("data") or {}).get("uid", 0) if code == 200 else 0
    except (ValueError, AttributeError):
        raise BackendUnavailable("login service answered something that is not the contract's JSON") from None
    if type(uid) is not int or uid < 0:
        raise BackendUnavailable("login service answered a uid that is not a non-negative integer")
    return uid


async def _verify_uncached(login_key: str) -> int:
    if not settings.PUSH_AUTH_VERIFY_URL:
        raise BackendUnavailable("no login verifier is configured (PUSH_AUTH_VERIFY_URL)")
    return await ask_main_site(login_key)


async def _verify_shared(key: str, login_key: str) -> int:
    """Verify, sharing one main-site call among concurrent logins with the same key."""
    inflight = _inflight.setdefault(asyncio.get_running_loop(), {})
    pending = inflight.get(key)
    if pending is not None:
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            if not pending.cancelled():
                raise  # we were cancelled ourselves
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    inflight[key] = future
    try:
        uid = await _verify_uncached(login_key)
    except asyncio.CancelledError:
        future.cancel()
        raise
    except Exception as error:
        future.set_exception(error)
        future.exception()  # retrieved here; each waiter re-raises it itself
        raise
    else:
        future.set_result(uid)
        return uid
    finally:
        inflight.pop(key, None)


async def verify_login(login_key: str, *, client: str = "") -> int:
    """The uid a login key belongs to; raises LoginRefused, LoginThrottled or BackendUnavailable."""
    if dev_verifier_active():
        uid = dev_verify(login_key)
        if not uid:
            raise LoginRefused
        return uid
    key = _cache_key(login_key)
    batch = settings.PUSH_LOGIN_BATCH
    cached = await batcher("login-cache-reads", _cache_lookups, max_batch=batch).submit(key)
    if cached is None:
        # Only what would reach the main site is throttled: a cached answer costs it nothing.
        throttle.logins.take(client)
        cached = await _verify_shared(key, login_key)
        if not cached:
            throttle.logins.charge_refusal(client)
        await batcher("login-cache-writes", _cache_writes, max_batch=batch).submit((key, cached))
    if not cached:
        raise LoginRefused
    return cached
