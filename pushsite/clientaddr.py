"""The address of the client behind a request: the one function that decides it.

A request that came through a proxy carries the client in ``X-Forwarded-For``
(nginx appends the peer it saw). That header is believed only when the peer
that sent the request is a trusted proxy, ``PUSH_TRUSTED_PROXIES`` (CIDRs,
default loopback): otherwise anyone could claim any address, and every rule
that reads the address (the metrics access rule, the login and socket limits,
log lines) would be decided by the client. Walking the header from the right,
trusted proxies are skipped and the first address that is not one is the
client; a value that is not an IP address stops the walk and the last trusted
hop is taken, so a forged header can never name a client the peer did not.

daphne and uvicorn run without their own proxy-header handling
(``--proxy-headers`` off), so ``scope["client"]`` is always the real peer.

Guarded by tests/test_clientaddr.py and tests/deploy/test_nginx.py.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from typing import Any

from django.conf import settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=8)
def _networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs if cidr.strip())


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    value = value.strip()
    if value.startswith("[") and "]" in value:  # [v6]:port
        value = value[1 : value.index("]")]
    elif value.count(":") == 1:  # v4:port
        value = value.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def is_trusted(address: str) -> bool:
    """Whether a peer address is one of PUSH_TRUSTED_PROXIES."""
    ip = _ip(address)
    return ip is not None and any(ip in net for net in _networks(tuple(settings.PUSH_TRUSTED_PROXIES)))


def is_loopback(address: str) -> bool:
    ip = _ip(address)
    return ip is not None and ip.is_loopback


def resolve(peer: str, forwarded_for: Iterable[str]) -> str:
    """The client address from the peer and the X-Forwarded-For values, in arrival order."""
    if not peer or not is_trusted(peer):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    client = peer
    for hop in reversed(hops):
        ip = _ip(hop)
        if ip is None:
            break  # garbage: keep the last hop a trusted proxy vouched for
        client = str(ip)
        if not is_trusted(client):
            break
    return client


def scope_client(scope: dict[str, Any]) -> str:
    """The client address of an ASGI scope (HTTP or WebSocket)."""
    peer = scope.get("client") or ("", 0)
    forwarded = [value.decode("latin-1") for name, value in scope.get("headers", ()) if name == b"x-forwarded-for"]
    return resolve(str(peer[0] or ""), forwarded)


def request_client(request: Any) -> str:
    """The client address of a Django request (ASGI or WSGI)."""
    scope = getattr(request, "scope", None)
    if scope is not None:
        return scope_client(scope)
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    return resolve(request.META.get("REMOTE_ADDR", ""), [forwarded] if forwarded else [])
