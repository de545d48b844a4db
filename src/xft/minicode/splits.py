"""MiniCode's splits and the leakage rules that separate them.

Everything is a pure function of `seed`:

* **held-out compositions**: per family, a quarter of the composition kind
  tuples (e.g. "keep multiples of k, then square") are reserved for `eval`.
  Every primitive of a held-out tuple still appears, in the same role, in a
  training composition, so the parts are learnable and only the combination
  is new.
* **held-out constants**: among the remaining kind tuples with >= 5 constant
  combinations, a stable-hash fifth of the combinations is reserved for
  `eval` (e.g. "numbers greater than 7, then plus 2").
* **held-out phrasings**: `eval` problems drawn from held-out constants are
  worded with `phrasing.EVAL_FRAMES`, never used in training.

`train` (instruction/response pairs) and `pretrain` (plain code) draw only
from the remaining specs, and additionally reject any program whose body
equals an `eval` program's, so no eval solution or instruction appears in
either (checked by the tests).

`valid` (tasks with tests, for choosing hyperparameters without touching
`eval`) draws from the training distribution under the same rules, and also
rejects every program and instruction of `train` at its default size: it
measures generalisation to unseen training-distribution programs. Its
programs may occur as plain code in `pretrain`.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from dataclasses import dataclass

from xft.minicode.families import FAMILIES, KIND_TUPLES, Spec, build_spec, param_choices
from xft.minicode.phrasing import (
    EVAL_FRAMES, TRAIN_FRAMES, format_response, function_source, instruction, pick_names,
)
from xft.minicode.unit_tests import compile_function, input_pool, select_tests

HOLDOUT_FRACTION = 0.25  # share of each family's composition kind tuples reserved for eval
EVAL_CONSTANT_SHARE = 5  # 1 in this many constant combinations is reserved for eval
MIN_COMBOS_FOR_CONSTANT_HOLDOUT = 5

DEFAULT_SIZES = {"pretrain": 10000, "train": 5000, "eval": 400, "valid": 200}
# Draws without a new program before a family counts as exhausted: a program that 1 draw in 300
# hits (list_reduce's rarest) is missed with probability < 1e-6, at ~30 us a draw.
VALID_MAX_DRAWS = 5000


@dataclass(frozen=True)
class Problem:
    """One generated problem: a spec under concrete names, worded, with its reference solution."""

    spec: Spec
    entry_point: str
    args: tuple[str, ...]
    instruction: str
    solution: str  # full function source
    generalization: str = ""  # eval: "composition" | "phrasing"; valid: "valid"
    tests: tuple = ()  # eval and valid only: ((args, expected), ...)


def _stable_int(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(repr, parts)).encode()).digest()[:8], "big")


@functools.lru_cache(maxsize=8)
def heldout_compositions(seed: int) -> dict[str, frozenset[tuple[str, ...]]]:
    """Per family, the composition kind tuples that only `eval` uses."""
    out = {}
    for family in FAMILIES:
        compositions = [k for k in KIND_TUPLES[family] if len(k) >= 2]
        rng = random.Random(f"minicode-holdout:{seed}:{family}")
        rng.shuffle(compositions)
        target = round(HOLDOUT_FRACTION * len(compositions))
        kept = list(compositions)
        held: list[tuple[str, ...]] = []
        for kinds in compositions:
            if len(held) == target:
                break
            rest = [k for k in kept if k != kinds]
            # Keep each (position, primitive) of the tuple visible in some training composition.
            if all(any(len(r) > i and r[i] == kind for r in rest) for i, kind in enumerate(kinds)):
                held.append(kinds)
                kept = rest
        out[family] = frozenset(held)
    return out


def _n_combos(kinds: tuple[str, ...]) -> int:
    return math.prod(len(param_choices(k)) for k in kinds)


def is_heldout_constant(seed: int, family: str, kinds: tuple[str, ...], params: tuple) -> bool:
    """Whether this constant combination of a (non-held-out) kind tuple is reserved for eval."""
    if _n_combos(kinds) < MIN_COMBOS_FOR_CONSTANT_HOLDOUT:
        return False
    return _stable_int("minicode-const", seed, family, kinds, params) % EVAL_CONSTANT_SHARE == 0


def _draw_params(kinds: tuple[str, ...], rng: random.Random) -> tuple:
    return tuple(rng.choice(param_choices(k)) for k in kinds)


@functools.lru_cache(maxsize=100_000)
def _is_degenerate(spec: Spec) -> bool:
    """True when the program's output barely depends on its input (e.g. "positive and less than 1")."""
    fn = compile_function(_canonical_source(spec), "f")
    outputs, identity = set(), True
    for args in input_pool(spec, random.Random(0), size=24):
        try:
            out = fn(*[list(a) if isinstance(a, list) else a for a in args])
        except Exception:
            return True
        outputs.add(repr(out))
        identity = identity and out == args[0]
    # Few distinct outputs, or a roundabout identity (e.g. "abs(n) if n > 4 else n").
    return len(outputs) < 3 or identity


def _canonical_source(spec: Spec) -> str:
    return function_source(spec, "f", tuple(f"a{i}" for i in range(len(spec.arg_types))))


def draw_spec(seed: int, family: str, pool: str, rng: random.Random) -> Spec:
    """A random non-degenerate spec of `family` from `pool`: "train" | "composition" | "phrasing"."""
    held = heldout_compositions(seed)[family]
    if pool == "composition":
        candidates = sorted(held)
    elif pool == "phrasing":
        candidates = [k for k in KIND_TUPLES[family]
                      if k not in held and _n_combos(k) >= MIN_COMBOS_FOR_CONSTANT_HOLDOUT]
    else:
        candidates = [k for k in KIND_TUPLES[family] if k not in held]
    for _ in range(10_000):
        kinds = rng.choice(candidates)
        params = _draw_params(kinds, rng)
        if pool != "composition" and is_heldout_constant(seed, family, kinds, params) != (pool == "phrasing"):
            continue  # train draws only training constants, phrasing only held-out ones
        spec = build_spec(family, kinds, params)
        if not _is_degenerate(spec):
            return spec
    raise RuntimeError(f"could not draw a {pool} spec for {family}")  # a bug in the family tables


@functools.lru_cache(maxsize=4)
def eval_problems(seed: int = 0, size: int = DEFAULT_SIZES["eval"]) -> tuple[Problem, ...]:
    """The evaluation set: half held-out compositions (training frames), half held-out
    constants worded with held-out frames, spread evenly over the families; distinct programs."""
    rng = random.Random(f"minicode-eval:{seed}")
    per_family = math.ceil(size / len(FAMILIES))
    problems: list[Problem] = []
    bodies: set[str] = set()
    for family in FAMILIES:
        exhausted: set[str] = set()
        for i in range(per_family):
            pool = "composition" if i % 2 == 0 else "phrasing"
            if pool in exhausted:  # small families run out of held-out constants: use the other kind
                pool = ({"composition", "phrasing"} - {pool}).pop()
            problem = _draw_eval_problem(seed, family, pool, bodies, rng)
            if problem is None:
                exhausted.add(pool)
                pool = ({"composition", "phrasing"} - {pool}).pop()
                problem = _draw_eval_problem(seed, family, pool, bodies, rng)
            if problem is None:
                raise RuntimeError(f"{family}: not enough distinct eval programs")
            bodies.add(problem.spec.canonical_body)
            problems.append(problem)
    rng.shuffle(problems)
    return tuple(problems[:size])


def _draw_eval_problem(seed: int, family: str, pool: str, taken: set[str], rng: random.Random):
    """A new eval program (body not in `taken`) with a usable test set, or None if the pool seems exhausted."""
    frames = TRAIN_FRAMES if pool == "composition" else EVAL_FRAMES
    for _ in range(300):
        spec = draw_spec(seed, family, pool, rng)
        if spec.canonical_body in taken:
            continue
        try:
            return _make_problem(spec, rng, frames, pool, with_tests=True)
        except ValueError:  # degenerate on the test pool
            continue
    return None


def _make_problem(spec: Spec, rng: random.Random, frames, generalization: str, with_tests: bool) -> Problem:
    name, args = pick_names(spec, rng)
    source = function_source(spec, name, args)
    text = instruction(spec, name, args, rng.choice(frames), rng)
    tests = tuple(select_tests(spec, source, name, rng)) if with_tests else ()
    return Problem(spec, name, args, text, source, generalization, tests)


@functools.lru_cache(maxsize=4)
def _eval_bodies(seed: int) -> frozenset[str]:
    return frozenset(p.spec.canonical_body for p in eval_problems(seed))


def _train_spec(seed: int, rng: random.Random) -> Spec:
    family = rng.choice(FAMILIES)
    while True:
        spec = draw_spec(seed, family, "train", rng)
        if spec.canonical_body not in _eval_bodies(seed):
            return spec


def train_problems(seed: int = 0, size: int = DEFAULT_SIZES["train"]) -> list[Problem]:
    """Instruction-tuning problems (distinct instructions), worded with training frames only."""
    rng = random.Random(f"minicode-train:{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < size:
        problem = _make_problem(_train_spec(seed, rng), rng, TRAIN_FRAMES, "", with_tests=False)
        if problem.instruction not in seen:
            seen.add(problem.instruction)
            out.append(problem)
    return out


@functools.lru_cache(maxsize=4)
def valid_problems(seed: int = 0, size: int = DEFAULT_SIZES["valid"]) -> tuple[Problem, ...]:
    """The validation set: training compositions, constants and frames, with tests, spread evenly
    over the families; distinct programs, none of them (nor their instructions) in `eval` or `train`."""
    rng = random.Random(f"minicode-valid:{seed}")
    train = train_problems(seed)
    taken = set(_eval_bodies(seed)) | {p.spec.canonical_body for p in train}
    train_instructions = {p.instruction for p in train}
    per_family = math.ceil(size / len(FAMILIES))
    problems: list[Problem] = []
    exhausted: set[str] = set()

    def draw(family: str) -> None:
        problem = _draw_valid_problem(seed, family, taken, train_instructions, rng)
        if problem is None:
            exhausted.add(family)
        else:
            taken.add(problem.spec.canonical_body)
            problems.append(problem)

    for family in FAMILIES:
        for _ in range(per_family):
            if family not in exhausted:
                draw(family)
    # `train` covers nearly all programs of the small families (list_reduce has ~7 left at seed 0):
    # the rest of their quota comes from the other families, one problem each in turn.
    while len(problems) < size:
        open_families = [f for f in FAMILIES if f not in exhausted]
        if not open_families:
            raise RuntimeError(f"only {len(problems)} distinct valid programs outside train and eval; "
                               f"asked for {size}")
        for family in open_families:
            if len(problems) < size:
                draw(family)
    rng.shuffle(problems)
    return tuple(problems[:size])


def _draw_valid_problem(seed: int, family: str, taken: set[str], train_instructions: set[str],
                        rng: random.Random):
    """A new training-distribution program (body not in `taken`, instruction not in training) with a
    usable test set, or None if the family seems exhausted."""
    for _ in range(VALID_MAX_DRAWS):
        spec = draw_spec(seed, family, "train", rng)
        if spec.canonical_body in taken:
            continue
        try:
            problem = _make_problem(spec, rng, TRAIN_FRAMES, "valid", with_tests=True)
        except ValueError:  # degenerate on the test pool
            continue
        if problem.instruction not in train_instructions:
            return problem
    return None


def pretrain_texts(seed: int = 0, size: int = DEFAULT_SIZES["pretrain"]) -> list[str]:
    """Plain Python for pretraining: one training-side function per record, often followed by
    asserts that exercise it (outputs computed by running it). No natural-language instructions.
    Records are short on purpose: batches are padded to their longest record."""
    rng = random.Random(f"minicode-pretrain:{seed}")
    texts = []
    for _ in range(size):
        spec = _train_spec(seed, rng)
        name, args = pick_names(spec, rng)
        text = function_source(spec, name, args)
        if rng.random() < 0.5:
            fn = compile_function(text, name)
            calls = input_pool(spec, rng, size=rng.randint(1, 2))
            text += "\n" + "".join(_assert_line(fn, name, call) for call in calls)
        texts.append(text)
    return texts


def _assert_line(fn, name: str, call: tuple) -> str:
    expected = fn(*[list(a) if isinstance(a, list) else a for a in call])
    return f"assert {name}({', '.join(map(repr, call))}) == {expected!r}\n"


def train_records(seed: int = 0, size: int = DEFAULT_SIZES["train"]) -> list[dict]:
    """The `train` split as JSON records: instruction, response (fenced code), family."""
    return [{"instruction": p.instruction, "response": format_response(p.solution), "family": p.spec.family}
            for p in train_problems(seed, size)]
