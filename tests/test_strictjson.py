"""pushsite/strictjson.py: duplicate keys and depth are refused; JSON otherwise reads as json.loads."""

from __future__ import annotations

import json

import pytest

from pushsite import strictjson


@pytest.mark.parametrize(
    ("text", "depth"),
    [("1", 0), ("{}", 1), ("[]", 1), ('{"a": [1, {"b": []}]}', 4), ('[[], [[[]]], {"x": {}}]', 4)],
)
def test_depth_of_counts_containers(text, depth):
    assert strictjson.depth_of(json.loads(text)) == depth


def test_the_depth_limit_is_inclusive(settings):
    settings.PUSH_MAX_JSON_DEPTH = 3
    assert strictjson.loads('{"a": {"b": {}}}') == {"a": {"b": {}}}
    with pytest.raises(strictjson.TooDeep, match="deeper than 3"):
        strictjson.loads('{"a": {"b": {"c": []}}}')


def test_a_duplicate_key_anywhere_is_refused():
    with pytest.raises(strictjson.DuplicateKey, match="'k'"):
        strictjson.loads('[{"x": {"k": 1, "k": 1}}]')


def test_refusals_are_value_errors_and_not_json_is_a_plain_value_error():
    assert issubclass(strictjson.JsonRefused, ValueError)
    with pytest.raises(json.JSONDecodeError) as caught:
        strictjson.loads("{nope")
    assert not isinstance(caught.value, strictjson.JsonRefused)
