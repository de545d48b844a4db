"""Plain data on the wire: the only form in which values leave the sandbox.

A value is *plain* when it is built from exact built-in types only: `None`, `bool`,
`int`, `float` (nan and infinities included), `complex`, `str`, `bytes`, `list`,
`tuple`, `dict`, `set`, `frozenset` — plus `collections.Counter`, because an MBPP+
reference solution (Mbpp/88) returns one. Subclasses (a `bool` is not an `int` here,
a namedtuple is not a tuple), numpy scalars and every other object are refused.

Wire form: JSON text in which every array is a tagged container (`["l", ...]` a
list, `["t", ...]` a tuple, `["s", ...]` a set, `["f", ...]` a frozenset,
`["d", k, v, ...]` a dict, `["C", k, v, ...]` a Counter, `["c", re, im]` a complex,
`["b", hex]` bytes, `["i", hex]` an int beyond 64 bits) and scalars are JSON's own.

Guarantees: `decode` builds nothing but the types above (it runs `json.loads` and a
walk that calls only their constructors), never executes code from its input, and
raises `PlainError` — never anything else — for malformed, too deep (recursive
values end there), too large or unhashable input. `encode` raises `PlainError` for
values that are not plain or exceed the bounds.

This module imports only the standard library: the sandbox's harness loads it by
path (it may not import `xft`), to encode what the candidate returns.
"""

import collections
import hashlib
import json

MAX_DEPTH = 64  # nesting levels; deeper (or self-containing) values are refused
MAX_BYTES = 8 << 20  # wire size of one value; larger outputs travel as a digest
_INT64 = 1 << 63


class PlainError(ValueError):
    """A value is not plain data, or a wire text does not decode to plain data."""


class _Budget:
    """Counts wire bytes spent while encoding, so a huge value fails fast."""

    def __init__(self, limit):
        self.left = limit

    def spend(self, n):
        self.left -= n
        if self.left < 0:
            raise PlainError("too large")


def _tree(v, depth, budget):
    t = type(v)
    budget.spend(8)
    if v is None or t is bool or t is float:
        return v
    if t is int:
        return v if -_INT64 <= v < _INT64 else ["i", _spend(budget, format(v, "x"))]
    if t is str:
        return _spend(budget, v)
    if depth >= MAX_DEPTH:
        raise PlainError(f"nested deeper than {MAX_DEPTH} levels (a recursive value?)")
    if t is list or t is tuple or t is set or t is frozenset:
        tag = {list: "l", tuple: "t", set: "s", frozenset: "f"}[t]
        flat = _flat(v, budget)
        return [tag, *(flat if flat is not None else (_tree(x, depth + 1, budget) for x in v))]
    if t is dict or t is collections.Counter:
        out = ["d" if t is dict else "C"]
        for k, x in v.items():
            out += (_tree(k, depth + 1, budget), _tree(x, depth + 1, budget))
        return out
    if t is complex:
        return ["c", v.real, v.imag]
    if t is bytes:
        return ["b", _spend(budget, v.hex())]
    raise PlainError(f"not plain data: {t.__module__}.{t.__qualname__}")


_FLAT = {int, float, str, bool, type(None)}


def _flat(v, budget):
    """`v`'s items as they go on the wire when they need no per-item work (scalars, no
    strs mixed with other types, ints only alone and within 64 bits): the common large
    outputs, recognised at C speed. None otherwise."""
    types = set(map(type, v))
    if not types <= _FLAT or (int in types or str in types) and len(types) > 1:
        return None
    if int in types and not (-_INT64 <= min(v) and max(v) < _INT64):
        return None
    budget.spend(8 * len(v) + (sum(map(len, v)) if str in types else 0))
    return v


def _spend(budget, s):
    budget.spend(len(s))
    return s


def encode(value, max_bytes=MAX_BYTES):
    """Wire text (str) of a plain `value`; PlainError if it is not plain or too large."""
    try:
        return json.dumps(_tree(value, 0, _Budget(max_bytes)), separators=(",", ":"))
    except RecursionError:
        raise PlainError("nested too deeply") from None


def _build(node, depth):
    t = type(node)
    if node is None or t is bool or t is int or t is float or t is str:
        return node
    if t is not list or not node or depth >= MAX_DEPTH:
        raise PlainError("malformed wire value")
    tag, items = node[0], node[1:]
    if set(map(type, items)) <= _FLAT:  # scalars only (checked at C speed): nothing to build
        if tag == "l":
            return items
        if tag == "t":
            return tuple(items)
    if tag == "l":
        return [_build(x, depth + 1) for x in items]
    if tag == "t":
        return tuple(_build(x, depth + 1) for x in items)
    if tag == "s":
        return {_build(x, depth + 1) for x in items}
    if tag == "f":
        return frozenset(_build(x, depth + 1) for x in items)
    if tag in ("d", "C") and len(items) % 2 == 0:
        pairs = zip(items[::2], items[1::2])
        d = {_build(k, depth + 1): _build(x, depth + 1) for k, x in pairs}
        return d if tag == "d" else collections.Counter(d)
    if tag == "c" and len(items) == 2 and all(type(x) in (int, float) for x in items):
        return complex(items[0], items[1])
    if tag == "b" and len(items) == 1 and type(items[0]) is str:
        return bytes.fromhex(items[0])
    if tag == "i" and len(items) == 1 and type(items[0]) is str:
        return int(items[0], 16)
    raise PlainError("malformed wire value")


def decode(text, max_bytes=MAX_BYTES):
    """The plain value of a wire text; PlainError for anything else."""
    if type(text) is not str or len(text) > max_bytes + 64:
        raise PlainError("malformed or oversized wire value")
    try:
        return _build(json.loads(text), 0)
    except PlainError:
        raise
    except (ValueError, TypeError, RecursionError, MemoryError) as e:  # bad JSON, unhashable keys
        raise PlainError(f"malformed wire value ({type(e).__name__})") from None


def digest(value):
    """SHA-256 (hex) standing for a value too large for the wire: its type name and `repr`,
    the top-level sequence in chunks (so no second copy of a huge output is built).
    Equal digests mean equal type and `repr`: an exact comparison without tolerance."""
    h = hashlib.sha256(type(value).__name__.encode())
    if type(value) in (list, tuple):
        for i in range(0, len(value), 4096):
            h.update(repr(value[i:i + 4096]).encode("utf-8", "surrogatepass"))
    else:
        h.update(repr(value).encode("utf-8", "surrogatepass"))
    return h.hexdigest()
