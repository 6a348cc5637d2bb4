"""Helpers for reading what the push API stored (the ``api`` fixture is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async

from notifications.sharding import model_for_uid


@database_sync_to_async
def stored_rows(uid: int, **filters: Any) -> list[Any]:
    """The rows of a uid in its shard table, oldest first."""
    return list(model_for_uid(uid).objects.filter(to_uid=uid, **filters).order_by("id"))


@pytest.fixture
def rows() -> Callable[..., Any]:
    return stored_rows
