"""Abuse limits of one server process: login attempts and anonymous sockets.

Invariants:
* a login that would ask the main site takes a token from its client
  address's bucket and from the node's bucket first; with either empty it is
  refused (``LoginThrottled``, ERROR 429 with ``retry_after``) and the main
  site is not asked. A refused login takes one token more, so guessing costs
  double. Over any span of t seconds a node makes at most
  ``burst + rate * t`` verify calls, per address and in all;
* an address holds at most ``PUSH_MAX_ANONYMOUS_PER_ADDRESS`` sockets that
  are not logged in; past it a new socket gets KICK 429 and close 1008.

Addresses come from ``pushsite.clientaddr.scope_client``, so a forged
X-Forwarded-For from a peer that is not a trusted proxy changes nothing.
Everything here runs on the event loop thread: no locks.

Guarded by tests/connections/test_throttle.py and tests/connections/test_daphne_limits.py.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Any

from django.conf import settings

# Buckets of this many addresses at most; the least recently used go first (a
# dropped bucket is full again, but the node's bucket still holds the total).
MAX_TRACKED_ADDRESSES = 65536


class LoginThrottled(Exception):
    """Too many login attempts; ``retry_after`` seconds until the next may pass."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many login attempts; retry after {retry_after} s")
        self.retry_after = retry_after


class Bucket:
    """A token bucket: ``burst`` tokens, refilled at ``rate`` per second; may go into debt."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = float(burst)
        self.stamp = now

    def refill(self, rate: float, burst: float, now: float) -> None:
        self.tokens = min(float(burst), self.tokens + max(0.0, now - self.stamp) * rate)
        self.stamp = now

    def wait(self, rate: float) -> float:
        """Seconds until one token is there."""
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / rate if rate > 0 else math.inf


class LoginLimiter:
    """The per-address and per-node login buckets of this process."""

    def __init__(self) -> None:
        self.node: Bucket | None = None
        self.addresses: OrderedDict[str, Bucket] = OrderedDict()

    def _buckets(self, address: str, now: float) -> list[tuple[Bucket, float, float]]:
        node_rate, node_burst = settings.PUSH_LOGIN_RATE_PER_NODE, settings.PUSH_LOGIN_BURST_PER_NODE
        rate, burst = settings.PUSH_LOGIN_RATE_PER_ADDRESS, settings.PUSH_LOGIN_BURST_PER_ADDRESS
        if self.node is None:
            self.node = Bucket(node_burst, now)
        bucket = self.addresses.get(address)
        if bucket is None:
            bucket = self.addresses[address] = Bucket(burst, now)
            while len(self.addresses) > MAX_TRACKED_ADDRESSES:
                self.addresses.popitem(last=False)
        else:
            self.addresses.move_to_end(address)
        pairs = [(bucket, rate, burst), (self.node, node_rate, node_burst)]
        for item, item_rate, item_burst in pairs:
            item.refill(item_rate, item_burst, now)
        return pairs

    def take(self, address: str) -> None:
        """Take a token for one verify call, or raise LoginThrottled."""
        now = time.monotonic()
        pairs = self._buckets(address, now)
        wait = max(bucket.wait(rate) for bucket, rate, _ in pairs)
        if wait > 0:
            cap = settings.PUSH_LOGIN_RETRY_AFTER_MAX
            raise LoginThrottled(max(1, math.ceil(min(cap, wait))))
        for bucket, _, _ in pairs:
            bucket.tokens -= 1

    def charge_refusal(self, address: str) -> None:
        """A refused login costs one token more (the bucket may go into debt)."""
        for bucket, _, _ in self._buckets(address, time.monotonic()):
            bucket.tokens -= 1


logins = LoginLimiter()


class AnonymousSockets:
    """Sockets per client address that are open and not logged in."""

    def __init__(self) -> None:
        self.by_address: dict[str, set[Any]] = {}

    def enter(self, address: str, socket: Any, *, capped: bool = True) -> bool:
        """Count a socket as anonymous; False (not counted) if its address is at the cap."""
        sockets = self.by_address.setdefault(address, set())
        if capped and socket not in sockets and len(sockets) >= settings.PUSH_MAX_ANONYMOUS_PER_ADDRESS:
            if not sockets:
                del self.by_address[address]
            return False
        sockets.add(socket)
        return True

    def leave(self, address: str, socket: Any) -> None:
        sockets = self.by_address.get(address)
        if sockets is not None:
            sockets.discard(socket)
            if not sockets:
                del self.by_address[address]

    def count(self, address: str) -> int:
        return len(self.by_address.get(address, ()))


anonymous = AnonymousSockets()
