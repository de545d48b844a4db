"""MiniCode's problem families: how primitives compose into whole functions.

A family lists its *kind tuples* (which primitives, in which roles, e.g.
`("filter:even", "map:mul")`) and builds a `Spec` for a kind tuple plus one
constant per primitive. A kind tuple of length >= 2 is a *composition*;
`splits.py` holds some compositions out of training entirely.

A `Spec` is a function with its argument names left as `{a0}`, `{a1}`
placeholders, so the same program can be asked for under different names,
and `canonical_body` (placeholders filled with fixed names) identifies the
program for the leakage rules.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

from xft.minicode.primitives import (
    BINARY, MAPS, PREDICATES, STRINGS, Expr, apply_map, apply_string, map_phrases, predicate,
    predicate_adjs, predicate_nouns, string_phrases,
)


@dataclass(frozen=True)
class Spec:
    """One program: code, paraphrased descriptions and what inputs it takes."""

    family: str
    kinds: tuple[str, ...]  # primitive kinds in role order, e.g. ("filter:gt", "map:mul")
    params: tuple  # one constant per primitive (None where it takes none)
    arg_types: tuple[str, ...]  # "ints" (list[int]) | "str" | "int", one per argument
    body: str  # indented function body; arguments written {a0}, {a1}
    clauses: tuple[str, ...]  # "returns ..." paraphrases; arguments written {a0}, {a1}
    inputs: str  # input generator name (unit_tests.INPUT_GENERATORS)

    @property
    def canonical_body(self) -> str:
        """The body with arguments named a0, a1: identifies the program regardless of naming."""
        return self.body.format(a0="a0", a1="a1")


def _expand(templates: list[str], **choices: list[str]) -> tuple[str, ...]:
    """Every template filled with every combination of the paraphrase choices, arguments kept as {a0}."""
    names = list(choices)
    out = []
    for template in templates:
        used = [n for n in names if "{" + n + "}" in template]
        for combo in itertools.product(*(choices[n] for n in used)):
            out.append(template.format(a0="{a0}", a1="{a1}", **dict(zip(used, combo))))
    return tuple(dict.fromkeys(out))


def _split(kind: str) -> tuple[str, str]:
    role, name = kind.split(":")
    return role, name


# --- list[int] families --------------------------------------------------------------------

def _list_filter(kinds, params) -> Spec:
    (_, p1), k1 = _split(kinds[0]), params[0]
    if len(kinds) == 1:
        body = f"    return [x for x in {{a0}} if {predicate(p1, k1, 'x')}]"
        clauses = _expand(["returns a list of the {noun} in {a0}",
                           "returns only the {noun} from {a0}, in their original order",
                           "returns a new list with just the {noun} of {a0}"], noun=predicate_nouns(p1, k1))
    else:
        (_, p2), k2 = _split(kinds[1]), params[1]
        body = f"    return [x for x in {{a0}} if {predicate(p1, k1, 'x')} and {predicate(p2, k2, 'x')}]"
        clauses = _expand(["returns the numbers in {a0} that are {adj1} and {adj2}",
                           "returns a list of the {noun1} in {a0} that are also {adj2}",
                           "keeps the elements of {a0} that are both {adj1} and {adj2} and returns them as a list"],
                          adj1=predicate_adjs(p1, k1), adj2=predicate_adjs(p2, k2), noun1=predicate_nouns(p1, k1))
    return Spec("list_filter", kinds, params, ("ints",), body, clauses, "ints")


def _list_map(kinds, params) -> Spec:
    x = Expr("x", 4)
    for kind, k in zip(kinds, params):
        x = apply_map(_split(kind)[1], k, x)
    phr = [map_phrases(_split(kind)[1], k) for kind, k in zip(kinds, params)]
    body = f"    return [{x.code} for x in {{a0}}]"
    if len(kinds) == 1:
        clauses = _expand(["returns a list with every element of {a0} {p1}",
                           "returns a new list in which each number of {a0} is {p1}",
                           "returns the numbers of {a0}, each {p1}"], p1=phr[0])
    else:
        clauses = _expand(["returns a list with every element of {a0} {p1} and then {p2}",
                           "returns a new list in which each number of {a0} is first {p1} and then {p2}",
                           "returns the numbers of {a0}, each {p1}, then {p2}"], p1=phr[0], p2=phr[1])
    return Spec("list_map", kinds, params, ("ints",), body, clauses, "ints")


_REDUCE_SINGLE = {
    "sum": ("sum({a0})", ["returns the sum of the numbers in {a0}", "returns the total of all elements of {a0}"]),
    "max": ("max({a0})", ["returns the largest number in {a0}", "returns the maximum element of {a0}"]),
    "min": ("min({a0})", ["returns the smallest number in {a0}", "returns the minimum element of {a0}"]),
    "count": ("len({a0})", ["returns the number of elements in {a0}", "returns how many numbers {a0} contains"]),
}
_REDUCE_OVER_MAP = {
    "sum": ("sum", ["returns the sum of the elements of {a0} after each is {p}",
                    "returns the total of all numbers in {a0}, each {p} first"]),
    "max": ("max", ["returns the largest value among the elements of {a0} after each is {p}",
                    "returns the maximum of the numbers in {a0}, each {p} first"]),
    "min": ("min", ["returns the smallest value among the elements of {a0} after each is {p}",
                    "returns the minimum of the numbers in {a0}, each {p} first"]),
}


def _list_reduce(kinds, params) -> Spec:
    reducer = _split(kinds[-1])[1]
    nonempty = reducer in ("max", "min")  # max()/min() of an empty list raise
    if len(kinds) == 1:
        code, templates = _REDUCE_SINGLE[reducer]
        body, clauses = f"    return {code}", _expand(templates)
    else:
        (role, name), k = _split(kinds[0]), params[0]
        if role == "filter":
            cond = predicate(name, k, "x")
            nouns, adjs = predicate_nouns(name, k), predicate_adjs(name, k)
            if reducer == "sum":
                body = f"    return sum(x for x in {{a0}} if {cond})"
                clauses = _expand(["returns the sum of the {noun} in {a0}",
                                   "returns the total of all {noun} in {a0}"], noun=nouns)
            else:  # count
                body = f"    return len([x for x in {{a0}} if {cond}])"
                clauses = _expand(["returns how many {noun} are in {a0}",
                                   "returns the number of elements of {a0} that are {adj}",
                                   "counts the {noun} in {a0} and returns the count"], noun=nouns, adj=adjs)
        else:  # map then reduce
            func, templates = _REDUCE_OVER_MAP[reducer]
            body = f"    return {func}({apply_map(name, k, Expr('x', 4)).code} for x in {{a0}})"
            clauses = _expand(templates, p=map_phrases(name, k))
    return Spec("list_reduce", kinds, params, ("ints",), body, clauses, "ints1" if nonempty else "ints")


def _list_pipeline(kinds, params) -> Spec:
    (_, p), kp = _split(kinds[0]), params[0]
    (_, m), km = _split(kinds[1]), params[1]
    body = f"    return [{apply_map(m, km, Expr('x', 4)).code} for x in {{a0}} if {predicate(p, kp, 'x')}]"
    clauses = _expand(["returns the {noun} of {a0}, each {phr}",
                       "keeps only the {noun} in {a0} and returns them {phr}",
                       "returns a list of the elements of {a0} that are {adj}, each {phr}"],
                      noun=predicate_nouns(p, kp), adj=predicate_adjs(p, kp), phr=map_phrases(m, km))
    return Spec("list_pipeline", kinds, params, ("ints",), body, clauses, "ints")


# --- strings ----------------------------------------------------------------------------------

def _string(kinds, params) -> Spec:
    e = Expr("{a0}", 4)
    for kind, k in zip(kinds, params):
        e = apply_string(_split(kind)[1], k, e)
    phr = [string_phrases(_split(kind)[1], k) for kind, k in zip(kinds, params)]
    body = f"    return {e.code}"
    if len(kinds) == 1:
        clauses = _expand(["returns {a0} {p1}", "returns a copy of {a0} {p1}", "returns the string {a0} {p1}"],
                          p1=phr[0])
    else:
        clauses = _expand(["returns {a0} {p1}, then {p2}", "returns a copy of {a0} {p1} and then {p2}",
                           "returns the string {a0}, first {p1}, then {p2}"], p1=phr[0], p2=phr[1])
    return Spec("string", kinds, params, ("str",), body, clauses, "str")


# --- integers ---------------------------------------------------------------------------------

def _arith(kinds, params) -> Spec:
    role, name = _split(kinds[0])
    if role == "bin":
        code, level, nouns = BINARY[name]
        e, args = Expr(code.format(a="{a0}", b="{a1}"), level), ("int", "int")
        first = [n.format(a="{a0}", b="{a1}") for n in nouns]
        if len(kinds) == 1:
            clauses = _expand(["returns {b}", "computes {b} and returns it"], b=first)
        else:
            clauses = _expand(["returns {b}, {p}", "computes {b}, then {p}, and returns the result"],
                              b=first, p=map_phrases(_split(kinds[1])[1], params[1]))
        maps = kinds[1:]
        mparams = params[1:]
    else:
        e, args, maps, mparams = Expr("{a0}", 4), ("int",), kinds, params
        phr = [map_phrases(_split(kind)[1], k) for kind, k in zip(kinds, params)]
        if len(kinds) == 1:
            clauses = _expand(["returns {a0} {p1}", "computes {a0} {p1} and returns the result",
                               "returns the value of {a0} {p1}"], p1=phr[0])
        else:
            clauses = _expand(["returns {a0} {p1}, then {p2}",
                               "computes {a0} {p1} and then {p2}, and returns the result",
                               "returns the value of {a0} first {p1} and then {p2}"], p1=phr[0], p2=phr[1])
    for kind, k in zip(maps, mparams):
        e = apply_map(_split(kind)[1], k, e)
    inputs = "int2" if len(args) == 2 else "int"
    return Spec("arith", kinds, params, args, f"    return {e.code}", clauses, inputs)


_ELSE_FIXED = {"keep": ("{a0}", ["{a0} unchanged", "{a0} itself"]), "zero": ("0", ["0", "zero"])}


def _cond(kinds, params) -> Spec:
    (_, p), kp = _split(kinds[0]), params[0]
    (_, t), kt = _split(kinds[1]), params[1]
    (_, f), kf = _split(kinds[2]), params[2]
    n = Expr("{a0}", 4)
    then_code = apply_map(t, kt, n).code
    then_phr = ["{a0} " + ph for ph in map_phrases(t, kt)]
    if f in _ELSE_FIXED:
        else_code, else_phr = _ELSE_FIXED[f]
    else:
        else_code, else_phr = apply_map(f, kf, n).code, ["{a0} " + ph for ph in map_phrases(f, kf)]
    body = (f"    if {predicate(p, kp, '{a0}')}:\n"
            f"        return {then_code}\n"
            f"    return {else_code}")
    clauses = _expand(["returns {then} if {a0} is {adj}, and {other} otherwise",
                       "returns {then} when {a0} is {adj}; otherwise it returns {other}",
                       "checks whether {a0} is {adj}: if so it returns {then}, else it returns {other}"],
                      then=then_phr, other=else_phr, adj=predicate_adjs(p, kp))
    return Spec("cond", kinds, params, ("int",), body, clauses, "int")


# --- loops -----------------------------------------------------------------------------------

_LOOP_SINGLE = {
    "sum": ("    total = 0\n    for i in range(1, {a0} + 1):\n        total += i\n    return total",
            ["returns the sum of the integers from 1 to {a0}",
             "adds up every integer from 1 to {a0} and returns the total"], "nat"),
    "prod": ("    result = 1\n    for i in range(1, {a0} + 1):\n        result *= i\n    return result",
             ["returns the product of the integers from 1 to {a0}",
              "multiplies together every integer from 1 to {a0} and returns the product"], "small"),
    "digitsum": ("    total = 0\n    while {a0} > 0:\n        total += {a0} % 10\n        {a0} //= 10\n    return total",
                 ["returns the sum of the decimal digits of {a0}",
                  "adds up the digits of {a0} and returns the total"], "digits"),
    "digitcount": ("    count = 0\n    while {a0} > 0:\n        count += 1\n        {a0} //= 10\n    return count",
                   ["returns the number of decimal digits of the positive integer {a0}",
                    "counts the digits of the positive integer {a0} and returns the count"], "posdigits"),
}
# accumulator -> (init line, update statement, clause templates for a filtered loop, input generator)
_LOOP_FILTERED = {
    "sum": ("total = 0", "total += i", "total",
            ["returns the sum of the integers from 1 to {a0} that are {adj}",
             "adds up the {noun} between 1 and {a0} and returns the total"], "nat"),
    "count": ("count = 0", "count += 1", "count",
              ["returns how many integers from 1 to {a0} are {adj}",
               "counts the {noun} between 1 and {a0} and returns the count"], "nat"),
    "prod": ("result = 1", "result *= i", "result",
             ["returns the product of the integers from 1 to {a0} that are {adj}",
              "multiplies together the {noun} between 1 and {a0} and returns the product"], "small"),
}


def _loop(kinds, params) -> Spec:
    acc = _split(kinds[0])[1]
    if len(kinds) == 1:
        body, templates, inputs = _LOOP_SINGLE[acc]
        return Spec("loop", kinds, params, ("int",), body, _expand(templates), inputs)
    (role, name), k = _split(kinds[1]), params[1]
    if role == "map":  # sum of a term over 1..n
        term = apply_map(name, k, Expr("i", 4)).code
        body = ("    total = 0\n    for i in range(1, {a0} + 1):\n"
                f"        total += {term}\n    return total")
        clauses = _expand(["returns the sum of i {p} over every integer i from 1 to {a0}",
                           "adds up i {p} for each integer i from 1 to {a0} and returns the total"],
                          p=map_phrases(name, k))
        return Spec("loop", kinds, params, ("int",), body, clauses, "nat")
    if len(kinds) == 3:  # sum of a term over the integers that pass a filter
        (_, m), km = _split(kinds[2]), params[2]
        term = apply_map(m, km, Expr("i", 4)).code
        body = ("    total = 0\n    for i in range(1, {a0} + 1):\n"
                f"        if {predicate(name, k, 'i')}:\n            total += {term}\n    return total")
        clauses = _expand(["returns the sum of i {p} over the integers i from 1 to {a0} that are {adj}",
                           "adds up i {p} for each integer i from 1 to {a0} that is {adj}, and returns the total"],
                          p=map_phrases(m, km), adj=predicate_adjs(name, k))
        return Spec("loop", kinds, params, ("int",), body, clauses, "nat")
    init, update, var, templates, inputs = _LOOP_FILTERED[acc]
    body = (f"    {init}\n    for i in range(1, {{a0}} + 1):\n"
            f"        if {predicate(name, k, 'i')}:\n            {update}\n    return {var}")
    clauses = _expand(templates, adj=predicate_adjs(name, k), noun=predicate_nouns(name, k))
    return Spec("loop", kinds, params, ("int",), body, clauses, inputs)


# --- registry ---------------------------------------------------------------------------------

_P = sorted(PREDICATES)
_M = sorted(MAPS)
_S = sorted(STRINGS)
# Pairs of filters that are contradictory or redundant (always empty, or equal to one filter).
_BAD_FILTER_PAIRS = {("even", "odd"), ("neg", "pos"), ("gt", "neg"), ("neg", "nonzero"), ("nonzero", "pos")}
# What a conditional returns otherwise: n unchanged, zero, or n negated (kept few: a tiny model must learn it).
_COND_ELSE = ["keep", "zero", "neg"]
# Predicates that are constant or redundant over 1..n.
_LOOP_PREDICATES = [p for p in _P if p not in ("neg", "pos", "nonzero")]


def _kind_tuples() -> dict[str, list[tuple[str, ...]]]:
    f = lambda names, role: [(f"{role}:{n}",) for n in names]  # noqa: E731
    return {
        "list_filter": f(_P, "filter") + [(f"filter:{a}", f"filter:{b}") for a, b in itertools.combinations(_P, 2)
                                          if (a, b) not in _BAD_FILTER_PAIRS],
        "list_map": f(_M, "map") + [(f"map:{a}", f"map:{b}") for a, b in itertools.permutations(_M, 2)],
        "list_reduce": f(_REDUCE_SINGLE, "reduce")
        + [(f"filter:{p}", f"reduce:{r}") for p in _P for r in ("sum", "count")]
        + [(f"map:{m}", f"reduce:{r}") for m in _M for r in _REDUCE_OVER_MAP],
        "list_pipeline": [(f"filter:{p}", f"map:{m}") for p in _P for m in _M],
        "string": f(_S, "str") + [(f"str:{a}", f"str:{b}") for a, b in itertools.permutations(_S, 2)],
        # (Chains of two maps are list_map's compositions; arith composes a binary op with a map.)
        "arith": f(_M, "map") + f(sorted(BINARY), "bin")
        + [(f"bin:{b}", f"map:{m}") for b in sorted(BINARY) for m in _M],
        "cond": [(f"if:{p}", f"then:{t}", f"else:{e}") for p in _P for t in _M
                 for e in _COND_ELSE if e != t],
        "loop": f(_LOOP_SINGLE, "loop") + [("loop:sum", f"map:{m}") for m in _M]
        + [(f"loop:{a}", f"filter:{p}") for a in _LOOP_FILTERED for p in _LOOP_PREDICATES]
        + [("loop:sum", f"filter:{p}", f"map:{m}") for p in _LOOP_PREDICATES for m in _M],
    }


KIND_TUPLES: dict[str, list[tuple[str, ...]]] = _kind_tuples()
_BUILDERS: dict[str, Callable[[tuple, tuple], Spec]] = {
    "list_filter": _list_filter, "list_map": _list_map, "list_reduce": _list_reduce,
    "list_pipeline": _list_pipeline, "string": _string, "arith": _arith, "cond": _cond, "loop": _loop,
}
FAMILIES: tuple[str, ...] = tuple(KIND_TUPLES)


def param_choices(kind: str) -> tuple:
    """The constants a primitive kind accepts ((None,) when it takes none)."""
    role, name = _split(kind)
    if role in ("filter", "if"):
        return PREDICATES[name][3]
    if role in ("map", "then", "else"):
        return MAPS[name][1] if name in MAPS else (None,)
    if role == "str":
        return STRINGS[name][3]
    return (None,)


def build_spec(family: str, kinds: tuple[str, ...], params: tuple) -> Spec:
    """The `Spec` of `family` for a kind tuple and one constant per primitive."""
    return _BUILDERS[family](tuple(kinds), tuple(params))
