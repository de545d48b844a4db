"""MiniCode's primitives: the small operations every problem is built from.

A primitive knows three things: the Python it renders to, the English phrases
that describe it (several paraphrases each), and which constants it takes.
Families (`families.py`) compose primitives into whole functions.

Expressions are rendered with precedence levels so compositions come out as a
person would write them, with parentheses only where Python needs them:
    4 atom/call/subscript, 3 unary minus, 2 `* // %`, 1 `+ -`.
"""

from __future__ import annotations

from dataclasses import dataclass

ATOM, UNARY, MUL, ADD = 4, 3, 2, 1


@dataclass(frozen=True)
class Expr:
    """Rendered Python expression and its precedence level."""

    code: str
    level: int


def _wrap(e: Expr, min_level: int) -> str:
    """`e` as an operand that needs at least `min_level` precedence."""
    return e.code if e.level >= min_level else f"({e.code})"


# --- integer predicates: filters, conditions, loop guards -------------------------------
# name -> (code with {v} and {k}, adjectives, plural nouns, constants)
PREDICATES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], tuple]] = {
    "even": ("{v} % 2 == 0", ("even",), ("even numbers", "even values"), (None,)),
    "odd": ("{v} % 2 == 1", ("odd",), ("odd numbers", "odd values"), (None,)),
    "pos": ("{v} > 0", ("positive",), ("positive numbers", "numbers above zero"), (None,)),
    "neg": ("{v} < 0", ("negative",), ("negative numbers", "numbers below zero"), (None,)),
    "nonzero": ("{v} != 0", ("nonzero", "not equal to zero"),
                ("nonzero numbers", "numbers that are not zero"), (None,)),
    "gt": ("{v} > {k}", ("greater than {k}", "larger than {k}"),
           ("numbers greater than {k}", "values larger than {k}"), tuple(range(1, 10))),
    "lt": ("{v} < {k}", ("less than {k}", "smaller than {k}"),
           ("numbers less than {k}", "values smaller than {k}"), tuple(range(1, 10))),
    "div": ("{v} % {k} == 0", ("divisible by {k}", "a multiple of {k}"),
            ("multiples of {k}", "numbers divisible by {k}"), tuple(range(3, 10))),
}


def predicate(name: str, k, v: str) -> str:
    """Python condition `name(k)` on variable `v`, e.g. `x % 3 == 0`."""
    return PREDICATES[name][0].format(v=v, k=k)


def predicate_adjs(name: str, k) -> list[str]:
    """Adjective paraphrases: "even", "greater than 3", ..."""
    return [a.format(k=k) for a in PREDICATES[name][1]]


def predicate_nouns(name: str, k) -> list[str]:
    """Plural-noun paraphrases: "even numbers", "multiples of 3", ..."""
    return [n.format(k=k) for n in PREDICATES[name][2]]


# --- integer maps: element-wise list maps, scalar arithmetic, loop terms ----------------
# name -> (participle paraphrases that fit "each element ... {phrase}" and "it is {phrase}", constants)
MAPS: dict[str, tuple[tuple[str, ...], tuple]] = {
    "mul": (("multiplied by {k}", "scaled by {k}"), tuple(range(2, 10))),
    "add": (("increased by {k}", "incremented by {k}"), tuple(range(1, 10))),
    "sub": (("decreased by {k}", "reduced by {k}"), tuple(range(1, 10))),
    "fdiv": (("floor-divided by {k}", "integer-divided by {k}"), tuple(range(2, 10))),
    "mod": (("taken modulo {k}", "reduced modulo {k}"), tuple(range(2, 10))),
    "square": (("squared", "multiplied by itself"), (None,)),
    "neg": (("negated", "sign-flipped"), (None,)),
    "abs": (("converted to absolute value", "turned into absolute value"), (None,)),
}
_BINARY_MAPS = {"mul": ("*", MUL), "add": ("+", ADD), "sub": ("-", ADD), "fdiv": ("//", MUL), "mod": ("%", MUL)}


def apply_map(name: str, k, e: Expr) -> Expr:
    """The expression `name(k)` applied to `e`, e.g. mul 3 on `x + 1` -> `(x + 1) * 3`."""
    if name in _BINARY_MAPS:
        op, level = _BINARY_MAPS[name]
        return Expr(f"{_wrap(e, level)} {op} {k}", level)
    if name == "square":
        operand = _wrap(e, ATOM)
        return Expr(f"{operand} * {operand}", MUL)
    if name == "neg":
        return Expr(f"-{_wrap(e, UNARY)}", UNARY)
    if name == "abs":
        return Expr(f"abs({e.code})", ATOM)
    raise KeyError(name)


def map_phrases(name: str, k) -> list[str]:
    """Participle paraphrases: "multiplied by 3", "squared", ..."""
    return [p.format(k=k) for p in MAPS[name][0]]


# --- string transforms (str -> str) ------------------------------------------------------
_REPLACE_PAIRS = tuple((a, b) for a in "aeost" for b in "aeiox" if a != b)
# name -> (code with {e} and {k}, precedence of the result, paraphrases, constants)
STRINGS: dict[str, tuple[str, int, tuple[str, ...], tuple]] = {
    "upper": ("{e}.upper()", ATOM, ("converted to uppercase", "written in capital letters"), (None,)),
    "lower": ("{e}.lower()", ATOM, ("converted to lowercase", "written in small letters"), (None,)),
    "reverse": ("{e}[::-1]", ATOM, ("reversed", "written backwards"), (None,)),
    "swapcase": ("{e}.swapcase()", ATOM, ("with the case of every letter swapped",
                                          "with uppercase and lowercase letters swapped"), (None,)),
    "first": ("{e}[:{k}]", ATOM, ("cut down to its first {k} characters",
                                  "truncated to the first {k} characters"), tuple(range(1, 6))),
    "last": ("{e}[-{k}:]", ATOM, ("cut down to its last {k} characters",
                                  "keeping only the last {k} characters"), tuple(range(1, 6))),
    "drop": ("{e}[{k}:]", ATOM, ("without its first {k} characters",
                                 "with the first {k} characters removed"), tuple(range(1, 6))),
    "replace": ("{e}.replace('{a}', '{b}')", ATOM, ("with every '{a}' replaced by '{b}'",
                                                   "with each '{a}' changed to '{b}'"), _REPLACE_PAIRS),
    "repeat": ("{e} * {k}", MUL, ("repeated {k} times", "concatenated with itself {k} times"), (2, 3, 4)),
}


def apply_string(name: str, k, e: Expr) -> Expr:
    """The string transform `name(k)` applied to `e`, e.g. reverse on `s.upper()` -> `s.upper()[::-1]`."""
    code, level, _, _ = STRINGS[name]
    a, b = k if isinstance(k, tuple) else (None, None)
    # Postfix operations (methods, slices) need an atom on their left; `* k` needs level >= MUL.
    operand = _wrap(e, ATOM if level == ATOM else MUL)
    return Expr(code.format(e=operand, k=k, a=a, b=b), level)


def string_phrases(name: str, k) -> list[str]:
    """Paraphrases: "reversed", "with every 'a' replaced by 'o'", ..."""
    a, b = k if isinstance(k, tuple) else (None, None)
    return [p.format(k=k, a=a, b=b) for p in STRINGS[name][2]]


# --- two-argument integer operations ------------------------------------------------------
# name -> (code with {a} {b}, precedence, noun-phrase paraphrases)
BINARY: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "add": ("{a} + {b}", ADD, ("the sum of {a} and {b}", "{a} plus {b}")),
    "sub": ("{a} - {b}", ADD, ("{a} minus {b}", "the difference {a} minus {b}")),
    "mul": ("{a} * {b}", MUL, ("the product of {a} and {b}", "{a} times {b}")),
    "max": ("max({a}, {b})", ATOM, ("the larger of {a} and {b}", "the maximum of {a} and {b}")),
    "min": ("min({a}, {b})", ATOM, ("the smaller of {a} and {b}", "the minimum of {a} and {b}")),
    "absdiff": ("abs({a} - {b})", ATOM, ("the absolute difference between {a} and {b}",
                                         "the distance between {a} and {b}")),
}
