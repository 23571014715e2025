"""mediator.json_codec writes the standard library's JSON text: the same text for every JSON value without
floats, the same numbers for floats (orjson writes 1e-05 as 0.00001)."""

import datetime
import json
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from mediator import json_codec


# Any text (lone surrogates, control characters, DEL, non-ASCII), any integer (beyond 64 bits too), floats
# as JSON documents carry them.
def _documents(scalars):
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


documents = _documents(st.none() | st.booleans() | st.integers() | st.text())
with_floats = _documents(st.none() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text())


@given(documents)
def test_dumps_is_the_standard_librarys_text(value):
    written = json_codec.dumps(value)
    assert json.loads(written) == value
    if _has_surrogate(value) or _has_big_int(value):
        # Refused by orjson: the standard library's text, non-ASCII escaped (always valid UTF-8).
        assert written == json.dumps(value, separators=(",", ":")).encode("ascii")
    else:
        assert written == json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


@given(documents)
def test_dumps_ascii_is_the_standard_librarys_text(value):
    assert json_codec.dumps_ascii(value) == json.dumps(value, separators=(",", ":"), default=str)


@given(with_floats)
def test_floats_keep_their_value(value):
    assert json.loads(json_codec.dumps(value)) == value
    assert json.loads(json_codec.dumps_ascii(value)) == value
    assert json_codec.dumps_ascii(value).isascii()


def test_refused_by_orjson_still_written():
    assert json_codec.dumps({"a": "\ud800", "n": 2**70}) == b'{"a":"\\ud800","n":1180591620717411303424}'
    assert json_codec.dumps_ascii({1: "é\x7f"}) == '{"1":"\\u00e9\\u007f"}'


def test_dumps_ascii_hands_datetimes_and_dataclasses_to_default():
    @dataclass
    class Point:
        x: int

    value = {"at": datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC), "p": Point(1)}
    assert json_codec.dumps_ascii(value) == json.dumps(value, separators=(",", ":"), default=str)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)


def _has_big_int(value):
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not -2**63 <= value < 2**64
    if isinstance(value, list):
        return any(_has_big_int(item) for item in value)
    if isinstance(value, dict):
        return any(_has_big_int(item) for item in value.values())
    return False


def _has_surrogate(value):
    return any(any("\ud800" <= c <= "\udfff" for c in s) for s in _strings(value))
