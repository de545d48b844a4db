"""EvalPlus's output comparison: exact match, float tolerance and the special oracles.

Runs in the judge (the `xft eval` process), on plain values decoded from the sandbox
(`xft.eval.plain`) and expected outputs that never entered it. The rules are
EvalPlus 0.3.1's (`evalplus.eval.unsafe_execute`'s checks): `out == exp`; for float
outputs (or a task `atol`) `np.allclose(out, exp, rtol=1e-07, atol=atol)` after
checking type and length; per-task oracles where MBPP+/HumanEval+ admit several right
answers.
"""

from __future__ import annotations

import math

from xft.eval import plain


def _is_floats(x) -> bool:
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(i, float) for i in x)
    return False


def _poly_value(coeffs, x):
    return sum(c * math.pow(x, i) for i, c in enumerate(coeffs))


def _pyramid_surface(base_edge, height):  # Mbpp/581: surface area, rounded
    slant = math.sqrt((base_edge / 2) ** 2 + height ** 2)
    return round(base_edge ** 2 + 2 * base_edge * slant)


def _digit_distance(a, b):  # Mbpp/558: zero-pad to equal length, sum digit gaps
    sa, sb = str(a), str(b)
    width = max(len(sa), len(sb))
    return sum(abs(int(x) - int(y)) for x, y in zip(sa.zfill(width), sb.zfill(width)))


# EvalPlus's special oracles for MBPP+ (keyed by entry point): outputs compared as sets,
# or only for not-None-ness, where the task admits several right answers.
MBPP_SET_EQ = {"similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly",
               "larg_nnum", "intersection_array", "find_dissimilar", "Diff"}
MBPP_NOT_NONE = {"check_str", "text_match_three", "text_starta_endb"}


def assert_output(out, exp, inp, entry_point: str, oracle: str | None, atol: float) -> float:
    """Raise AssertionError unless `out` is an accepted output for input `inp`. Returns the
    tolerance for the next input (EvalPlus keeps a tolerance it had to introduce)."""
    exact = out == exp
    if oracle == "mbpp":
        if entry_point == "are_equivalent":
            exact = True
        elif entry_point == "sum_div":
            exact = exact or out == 0
        elif entry_point == "surface_Area":
            exact = exact or abs(out - _pyramid_surface(*inp)) <= atol
        elif entry_point == "digit_distance_nums":
            exact = exact or out == _digit_distance(*inp)
        elif entry_point in MBPP_SET_EQ:
            exact = set(plain.check_hashes(list(out))) == set(exp)  # bounded: see check_hashes
        elif entry_point in MBPP_NOT_NONE:
            exact = out == exp if isinstance(out, bool) else exp == (out is not None)
    if oracle == "humaneval" and entry_point == "find_zero":
        assert abs(_poly_value(*inp, out)) <= atol
        return atol
    if atol == 0 and _is_floats(exp):
        atol = 1e-6
    if not exact and atol != 0:
        import numpy as np  # only here: most tasks never need it and it costs ~0.1 s

        assert type(out) == type(exp)  # noqa: E721
        if isinstance(exp, (list, tuple)):
            assert len(out) == len(exp)
        assert np.allclose(out, exp, rtol=1e-07, atol=atol)
    else:
        assert exact
    return atol
