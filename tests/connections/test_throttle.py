"""connections/throttle.py on its own: bucket arithmetic and the anonymous-socket count."""

from __future__ import annotations

import pytest

from connections.throttle import AnonymousSockets, LoginLimiter, LoginThrottled


@pytest.fixture
def limits(settings):
    settings.PUSH_LOGIN_BURST_PER_ADDRESS = 4
    settings.PUSH_LOGIN_RATE_PER_ADDRESS = 0.001
    settings.PUSH_LOGIN_BURST_PER_NODE = 100
    settings.PUSH_LOGIN_RATE_PER_NODE = 0.001
    settings.PUSH_LOGIN_RETRY_AFTER_MAX = 30
    return settings


def test_an_address_gets_its_burst_then_429_with_the_capped_wait(limits):
    limiter = LoginLimiter()
    for _ in range(4):
        limiter.take("192.0.2.1")
    with pytest.raises(LoginThrottled) as caught:
        limiter.take("192.0.2.1")
    assert caught.value.retry_after == 30
    limiter.take("192.0.2.2")  # another address has its own bucket


def test_a_refusal_costs_double(limits):
    limiter = LoginLimiter()
    for _ in range(2):
        limiter.take("192.0.2.1")
        limiter.charge_refusal("192.0.2.1")
    with pytest.raises(LoginThrottled):
        limiter.take("192.0.2.1")


def test_the_node_bucket_holds_all_addresses_together(limits):
    limits.PUSH_LOGIN_BURST_PER_NODE = 5
    limiter = LoginLimiter()
    for n in range(5):
        limiter.take(f"192.0.2.{n}")
    with pytest.raises(LoginThrottled):
        limiter.take("192.0.2.99")


def test_a_zero_rate_does_not_overflow_the_wait(limits):
    limits.PUSH_LOGIN_RATE_PER_ADDRESS = 0
    limits.PUSH_LOGIN_BURST_PER_ADDRESS = 1
    limiter = LoginLimiter()
    limiter.take("192.0.2.1")
    with pytest.raises(LoginThrottled) as caught:
        limiter.take("192.0.2.1")
    assert caught.value.retry_after == 30


def test_anonymous_sockets_are_capped_per_address_and_forgotten_when_gone(settings):
    settings.PUSH_MAX_ANONYMOUS_PER_ADDRESS = 2
    sockets = AnonymousSockets()
    a, b, c = object(), object(), object()
    assert sockets.enter("192.0.2.1", a) and sockets.enter("192.0.2.1", b)
    assert not sockets.enter("192.0.2.1", c)
    assert sockets.enter("192.0.2.2", c)
    sockets.leave("192.0.2.1", a)
    assert sockets.enter("192.0.2.1", c)
    assert sockets.enter("192.0.2.1", a, capped=False) and sockets.count("192.0.2.1") == 3
    for s in (a, b, c):
        sockets.leave("192.0.2.1", s)
    sockets.leave("192.0.2.2", c)
    assert sockets.by_address == {}
