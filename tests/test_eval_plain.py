"""The plain-data codec: exact round trips for plain values, refusals for everything else."""

from __future__ import annotations

import collections
import math

import pytest

from xft.eval import plain

PLAIN = [None, True, False, 0, -1, 2**63 - 1, -2**63, 2**63, -2**200, 1.5, -0.0, math.inf, -math.inf,
         1 + 2j, complex(math.nan, 0), "", "héllo", "\ud800", b"", b"\x00\xff", [], (), set(), frozenset(), {},
         [1, 2, 3], [1.0, 2.5], ["a", "b"], [True, None, 1.5], [1, "a"], [1, 2**64], (1, ("a", [None])),
         {1, "a", (2, 3)}, frozenset({(1, 2)}), {"a": [1], 2: {3}, (4, 5): None}, {True: 1, 1.5: b"x"},
         collections.Counter("aab"), [[[[]]]], ((),)]


@pytest.mark.parametrize("value", PLAIN, ids=repr)
def test_round_trip_is_exact(value):
    back = plain.decode(plain.encode(value))
    assert type(back) is type(value) and repr(back) == repr(value)


def test_nan_round_trips():
    assert math.isnan(plain.decode(plain.encode(math.nan)))


class _Int(int):
    pass


class _Eq:
    def __eq__(self, other):
        return True


@pytest.mark.parametrize("value", [_Int(1), [_Int(1)], {_Int(1)}, (1, [_Int(2)]), _Eq(), [_Eq()], {"a": _Eq()},
                                   collections.OrderedDict(a=1), bytearray(b"x"), range(3), (x for x in []),
                                   print, type], ids=repr)
def test_not_plain_is_refused(value):
    with pytest.raises(plain.PlainError, match="not plain data"):
        plain.encode(value)


def test_recursive_and_deep_values_are_refused():
    loop: list = []
    loop.append(loop)
    deep: list = []
    for _ in range(plain.MAX_DEPTH + 1):
        deep = [deep]
    for value in (loop, deep):
        with pytest.raises(plain.PlainError, match="deeper"):
            plain.encode(value)


@pytest.mark.parametrize("value", ["x" * (plain.MAX_BYTES + 1), [0] * (plain.MAX_BYTES // 8 + 1),
                                   [[0]] * (plain.MAX_BYTES // 8), 2 ** (8 * plain.MAX_BYTES)],
                         ids=["str", "flat list", "nested list", "int"])
def test_oversized_values_are_refused(value):
    with pytest.raises(plain.PlainError, match="too large"):
        plain.encode(value)


@pytest.mark.parametrize("text", ['{}', '{"a": 1}', '["x"]', '[]', '["l", {}]', '["t", {"a": [1]}]', '["s", ["l"]]',
                                  '["d", 1]', '["c", "a", 1]', '["b", "zz"]', '["i", 5]', "nope", "1" * 5000,
                                  "[" * 100000 + "]" * 100000, '["l"' + ', ["l"' * 200 + "]" * 201, b"[1]", None,
                                  "x" * (plain.MAX_BYTES + 100)], ids=lambda t: repr(t)[:30])
def test_malformed_wire_text_is_a_plain_error(text):
    with pytest.raises(plain.PlainError):
        plain.decode(text)


def test_digest_is_exact():
    big = [("a", "b")] * 10000
    assert plain.digest(big) == plain.digest([("a", "b")] * 10000)
    assert plain.digest(big) != plain.digest([["a", "b"]] * 10000)  # type matters
    assert plain.digest([1] * 5000) != plain.digest([True] * 5000)  # no cross-type equality


def test_one_size_rule_for_encoder_and_decoder():
    """Size is the wire text's length, escapes included: what the encoder sends, the decoder takes."""
    fits = "é" * (2 << 20)  # 2 Mi characters, 12 MiB as \u00e9 escapes
    assert plain.decode(plain.encode(fits)) == fits
    edge = "\\" * ((plain.MAX_BYTES - 2) // 2)  # each backslash escaped to two characters
    assert len(plain.encode(edge)) == plain.MAX_BYTES and plain.decode(plain.encode(edge)) == edge
    with pytest.raises(plain.PlainError, match="too large"):
        plain.encode(edge + "\\")
    with pytest.raises(plain.PlainError):
        plain.decode(plain.encode(edge) + " ")


def test_sets_and_dicts_crowding_one_hash_are_refused():
    crowded = [k * (2**61 - 1) for k in range(1, plain.MAX_COLLISIONS + 2)]  # distinct, all hash 0
    for wire in (plain.encode(set(crowded)), plain.encode(dict.fromkeys(crowded))):
        with pytest.raises(plain.PlainError, match="share one hash"):
            plain.decode(wire)
    assert plain.decode(plain.encode(set(crowded[:-1]))) == set(crowded[:-1])  # at the limit: accepted
