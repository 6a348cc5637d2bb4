"""Round trips before a call: the database and Redis are checked at most once a second.

Observed from the servers themselves: MariaDB counts the pings of a session
(``Com_admin_commands``), and Redis tells another client the last command of
a connection (``CLIENT LIST ID``).
"""

from __future__ import annotations

import time

import pytest
import redis
from django.conf import settings
from django.db import DatabaseError, connections

from connections import bridge, bus
from pushsite.redis_client import get_redis
from tests.conftest import REAL_BACKENDS

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not REAL_BACKENDS, reason="needs MariaDB and Redis (the real configuration)"),
]


def _call(sql: str = "SHOW SESSION STATUS LIKE 'Com_admin_commands'") -> int:
    """One bridge call on this thread, as a database thread runs it; the session's pings so far."""
    trusted = bridge._before_call()
    try:
        with connections["default"].cursor() as cursor:
            cursor.execute(sql)
            return int(cursor.fetchone()[1])
    finally:
        bridge._after_call(trusted)


def test_a_connection_is_pinged_once_a_second_and_again_after_an_error():
    _call()  # connects, or is checked: either way it has just answered
    first = _call()
    assert _call() == first  # trusted: no ping before these calls
    assert _call() == first
    time.sleep(bridge.ANSWERED_WITHIN + 0.1)
    assert _call() == first + 1  # idle past the window: checked again
    assert _call() == first + 1

    with pytest.raises(DatabaseError):
        _call("SELECT no_such_column FROM no_such_table")
    # The error made Django check the connection after that call (one ping);
    # the next call does not trust it either and pings again before its query.
    assert _call() == first + 3
    assert _call() == first + 3


def test_redis_is_pinged_before_a_push_only_if_it_has_not_answered_within_a_second():
    client = get_redis()
    observer = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)

    def last_command(connection_id: int) -> str:
        return observer.client_list(client_id=[connection_id])[0]["cmd"]

    bus.redis_failed()
    connection_id = client.client_id()
    bus.check_available()
    assert last_command(connection_id) == "ping"

    connection_id = client.client_id()
    bus.check_available()  # it answered the ping just now
    assert last_command(connection_id) == "client|id"

    bus.redis_failed()  # an error anywhere: the next push checks first
    bus.check_available()
    assert last_command(connection_id) == "ping"

    connection_id = client.client_id()
    time.sleep(bus.ANSWERED_WITHIN + 0.1)
    bus.check_available()
    assert last_command(connection_id) == "ping"
    observer.close()
