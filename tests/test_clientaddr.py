"""pushsite/clientaddr.py: forwarded headers are believed only from trusted proxies."""

from __future__ import annotations

import pytest
from django.test import override_settings

from pushsite.clientaddr import is_loopback, resolve, scope_client


def test_an_untrusted_peer_is_the_client_whatever_it_forwards():
    assert resolve("203.0.113.9", ["127.0.0.1"]) == "203.0.113.9"
    assert resolve("203.0.113.9", ["<script>x</script>"]) == "203.0.113.9"


def test_a_trusted_proxy_names_the_client_it_saw():
    assert resolve("127.0.0.1", ["198.51.100.7"]) == "198.51.100.7"


def test_a_client_cannot_forge_hops_in_front_of_the_proxy():
    # nginx appends the peer it saw: the client's own header is to the left.
    assert resolve("127.0.0.1", ["10.9.9.9, 198.51.100.7"]) == "198.51.100.7"
    assert resolve("127.0.0.1", ["127.0.0.1", "198.51.100.7"]) == "198.51.100.7"


def test_trusted_hops_are_skipped_from_the_right():
    with override_settings(PUSH_TRUSTED_PROXIES=["127.0.0.0/8", "10.0.0.0/8"]):
        assert resolve("127.0.0.1", ["198.51.100.7, 10.1.2.3"]) == "198.51.100.7"


def test_garbage_stops_the_walk_at_the_last_vouched_hop():
    assert resolve("127.0.0.1", ["<script>x</script>"]) == "127.0.0.1"
    assert resolve("127.0.0.1", ["198.51.100.7, nonsense"]) == "127.0.0.1"


def test_without_a_header_the_peer_is_the_client():
    assert resolve("127.0.0.1", []) == "127.0.0.1"
    assert resolve("", []) == ""


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True), ("198.51.100.7", False), ("x", False)],
)
def test_loopback(address, loopback):
    assert is_loopback(address) is loopback


def test_scope_client_reads_the_asgi_scope():
    scope = {"client": ("127.0.0.1", 5555), "headers": [(b"x-forwarded-for", b"198.51.100.7")]}
    assert scope_client(scope) == "198.51.100.7"
    assert scope_client({"client": ("198.51.100.8", 1), "headers": scope["headers"]}) == "198.51.100.8"
    assert scope_client({}) == ""
