"""The one JSON reader of the edge: WebSocket frames and push API bodies.

Invariants:
* an object with a key given twice is refused (``DuplicateKey``), never read
  as "the last one wins";
* a document nested deeper than ``PUSH_MAX_JSON_DEPTH`` (the outer object is
  depth 1) is refused (``TooDeep``), so the database never sees a body its
  JSON column refuses (MariaDB's JSON_VALID check fails from depth 32 on).

Guarded by tests/test_strictjson.py, tests/connections/test_protocol.py,
tests/notifications/test_api.py and tests/fuzz/test_fuzz.py.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings


class JsonRefused(ValueError):
    """The text is JSON this service does not take; the message says why."""


class DuplicateKey(JsonRefused):
    pass


class TooDeep(JsonRefused):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(f"duplicate key {key[:40]!r}")
            seen.add(key)
    return result


def depth_of(value: Any) -> int:
    """Nesting depth of a parsed value: a scalar is 0, ``{}`` and ``[]`` are 1."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def loads(text: str | bytes) -> Any:
    """Parse JSON; ValueError if it is not JSON, JsonRefused if it is JSON we refuse."""
    limit = settings.PUSH_MAX_JSON_DEPTH
    try:
        data = json.loads(text, object_pairs_hook=_pairs)
    except RecursionError:
        raise TooDeep(f"JSON nested deeper than {limit} levels") from None
    if depth_of(data) > limit:
        raise TooDeep(f"JSON nested deeper than {limit} levels")
    return data
