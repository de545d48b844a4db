"""How a MiniCode problem is worded and answered.

An instruction is a *frame* (the sentence around the request) filled with a
function signature and one of the spec's clause paraphrases. Frames are split
in two disjoint sets: `TRAIN_FRAMES` appear in the instruction-tuning data,
`EVAL_FRAMES` only in the evaluation set (the held-out phrasings). Clause
paraphrases ("returns the even numbers in `xs`") are shared: they carry the
vocabulary of the primitives, which a model cannot be expected to guess.

Function and argument names are drawn from generic pools, so the name does
not give the task away and the instruction has to be read. The signature is
quoted as `def name(args)` and a bare name follows a space, so the name is the
same token in the request as in the answer (byte-level BPE merges the space
into the word: "`name(" and "def name(" would give different tokens).
"""

from __future__ import annotations

import random

from xft.minicode.families import Spec

TRAIN_FRAMES: tuple[str, ...] = (
    "Write a Python function `{sig}` that {clause}.",
    "Create a function `{sig}` which {clause}.",
    "Implement `{sig}`. It takes {params} and {clause}.",
    "Write a function named {name} that takes {params} and {clause}.",
    "Define `{sig}` so that it {clause}.",
    "Complete the Python function `{sig}`: it {clause}.",
    "Given {params}, the function `{sig}` {clause}. Write it.",
)
EVAL_FRAMES: tuple[str, ...] = (
    "Your task is to code `{sig}`, a function that {clause}.",
    "Please provide a Python implementation of `{sig}`. Given {params}, it {clause}.",
    "I need a function called {name} taking {params}; it {clause}.",
)

FUNCTION_NAMES: tuple[str, ...] = (
    "solve", "compute", "transform", "process", "calculate", "answer", "func", "helper", "apply_rule",
    "evaluate", "convert", "handle", "run_task", "my_function", "operate", "do_it", "work", "task",
    "f", "g", "h", "fn", "step", "routine",
)
ARG_NAMES: dict[str, tuple[str, ...]] = {
    "ints": ("nums", "xs", "values", "numbers", "arr", "data", "items", "lst"),
    "str": ("s", "text", "word", "string", "line"),
    "int": ("n", "num", "value", "k", "m"),
}
ARG_PAIRS: tuple[tuple[str, str], ...] = (("a", "b"), ("x", "y"), ("m", "n"), ("p", "q"), ("left", "right"))
_TYPE_WORDS = {"ints": "a list of integers", "str": "a string", "int": "an integer"}


def pick_names(spec: Spec, rng: random.Random) -> tuple[str, tuple[str, ...]]:
    """A function name and argument names for `spec`."""
    name = rng.choice(FUNCTION_NAMES)
    if len(spec.arg_types) == 2:
        return name, rng.choice(ARG_PAIRS)
    return name, (rng.choice(ARG_NAMES[spec.arg_types[0]]),)


def function_source(spec: Spec, name: str, args: tuple[str, ...]) -> str:
    """The reference solution: `def name(args):` plus the spec's body, newline-terminated."""
    body = spec.body.format(**{f"a{i}": a for i, a in enumerate(args)})
    return f"def {name}({', '.join(args)}):\n{body}\n"


def _params_text(spec: Spec, args: tuple[str, ...]) -> str:
    if len(args) == 2:
        return f"two integers `{args[0]}` and `{args[1]}`"
    return f"{_TYPE_WORDS[spec.arg_types[0]]} `{args[0]}`"


def instruction(spec: Spec, name: str, args: tuple[str, ...], frame: str, rng: random.Random) -> str:
    """The natural-language request for `spec` in `frame`, with a random clause paraphrase."""
    clause = rng.choice(spec.clauses).format(**{f"a{i}": f"`{a}`" for i, a in enumerate(args)})
    # `def name(args)`, and a bare name preceded by a space: the name is then the same token (" name") as
    # in the answer's `def name(`, so answering needs a copy, not a learned map from "name" to " name".
    sig = f"def {name}({', '.join(args)})"
    return frame.format(sig=sig, name=name, params=_params_text(spec, args), clause=clause)


def format_response(source: str) -> str:
    """How a model should answer: the function in a ```python fenced block."""
    return f"```python\n{source}```"
