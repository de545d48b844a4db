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

Size: one rule everywhere, the length of the wire text (ASCII: characters are bytes).
`encode` refuses a value whose wire text exceeds `MAX_BYTES` (it then travels as a
`digest`), `decode` refuses a longer text, and a frame that carries one value embeds
its wire text as JSON, not as a string (which would escape it again), so that a
reader's limit is `FRAME_BYTES`. A 2 Mi-character non-ASCII string (12 MiB as
`\\uXXXX` escapes) fits.

Guarantees: `decode` and `build` make nothing but the types above (a walk that calls
only their constructors), never execute code from their input, and raise
`PlainError` — never anything else — for malformed, too deep (recursive values end
there), too large or unhashable input, and for sets and dicts whose keys crowd one
hash value (distinct values with equal hashes make building them quadratic: 40k
ints that all hash to 0 would take minutes; `check_hashes`). `encode` raises
`PlainError` for values that are not plain or exceed the bounds.

This module imports only the standard library: the sandbox's harness loads it by
path (it may not import `xft`), to encode what the candidate returns.
"""

import collections
import hashlib
import json

MAX_DEPTH = 64  # nesting levels; deeper (or self-containing) values are refused
MAX_BYTES = 16 << 20  # wire text length of one value; larger outputs travel as a digest
FRAME_BYTES = MAX_BYTES + 4096  # a frame: one value's wire text embedded in a small JSON object
MAX_COLLISIONS = 64  # distinct values one set or dict may hold under one hash value
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
    """Wire text (str, ASCII) of a plain `value`; PlainError if it is not plain or its wire
    text is longer than `max_bytes`. (The budget counts raw sizes, a lower bound, to give
    up early on huge values; the escaped text is what is measured.)"""
    try:
        text = json.dumps(_tree(value, 0, _Budget(max_bytes)), separators=(",", ":"))
    except RecursionError:
        raise PlainError("nested too deeply") from None
    if len(text) > max_bytes:
        raise PlainError("too large")
    return text


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
    if tag == "s" or tag == "f":
        members = check_hashes([_build(x, depth + 1) for x in items])
        return set(members) if tag == "s" else frozenset(members)
    if tag in ("d", "C") and len(items) % 2 == 0:
        keys = check_hashes([_build(k, depth + 1) for k in items[::2]])
        d = dict(zip(keys, [_build(x, depth + 1) for x in items[1::2]]))
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
    if type(text) is not str or len(text) > max_bytes:
        raise PlainError("malformed or oversized wire value")
    try:
        node = json.loads(text)
    except (ValueError, RecursionError, MemoryError) as e:
        raise PlainError(f"malformed wire value ({type(e).__name__})") from None
    return build(node)


def build(node):
    """The plain value of a wire text already parsed by `json.loads` (e.g. embedded in a
    frame, whose reader bounded its size); PlainError for anything else."""
    try:
        return _build(node, 0)
    except PlainError:
        raise
    except (ValueError, TypeError, RecursionError, MemoryError) as e:  # unhashable keys, bad hex
        raise PlainError(f"malformed wire value ({type(e).__name__})") from None


def check_hashes(values):
    """`values` (a list), if a set or dict of them is cheap to build; else PlainError.

    Each insertion compares with every *distinct* earlier value of the same hash, so a
    group of n distinct values sharing a hash costs n² / 2 comparisons (ints that
    differ by multiples of 2**61 - 1, tuples solved for a hash). Honest results do not
    hold more than a few such values; equal values (duplicates in a list) are cheap and
    are not counted. Raises TypeError for unhashable values."""
    counts = collections.Counter(map(hash, values))
    if not counts or max(counts.values()) <= MAX_COLLISIONS:
        return values
    crowded = {h for h, n in counts.items() if n > MAX_COLLISIONS}
    distinct = collections.defaultdict(set)  # hash -> wire texts (str hashes are salted)
    for v in values:
        h = hash(v)
        if h in crowded:
            distinct[h].add(encode(v, max_bytes=1 << 62))
            if len(distinct[h]) > MAX_COLLISIONS:
                raise PlainError(f"more than {MAX_COLLISIONS} distinct values share one hash "
                                 "(a hash-collision attack?)")
    return values


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
