"""MiniCode's validation split: training distribution, tested, and disjoint from eval and train."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest

from test_minicode import (
    _canonical_bodies, _first_arg, _frame_pattern, _header, _observably_different, _off_by_one_variants, _run,
)
from xft.eval.benchmarks import load_benchmark
from xft.minicode.benchmark import load_tasks, split_records
from xft.minicode.families import FAMILIES, KIND_TUPLES, build_spec, param_choices
from xft.minicode.phrasing import EVAL_FRAMES, TRAIN_FRAMES
from xft.minicode.splits import (
    DEFAULT_SIZES, _is_degenerate, eval_problems, heldout_compositions, is_heldout_constant, train_problems,
    valid_problems,
)


@pytest.fixture(scope="module")
def valid():
    return valid_problems(seed=0)


@pytest.fixture(scope="module")
def tasks():
    return load_tasks("valid", seed=0)


@pytest.fixture(scope="module")
def train():
    return train_problems(seed=0)


def _bodies(solutions) -> set[str]:
    return set().union(*(_canonical_bodies(s) for s in solutions))


# --- disjointness -----------------------------------------------------------------------------

def test_no_eval_program(valid):
    assert not _bodies(p.solution for p in valid) & _bodies(p.solution for p in eval_problems(0))


def test_no_train_program_or_instruction(valid, train):
    train_bodies = _bodies(p.solution for p in train)
    train_instructions = {p.instruction for p in train}
    for p in valid:
        assert not _canonical_bodies(p.solution) & train_bodies, p.solution
        assert p.instruction not in train_instructions


def test_distinct_programs(valid):
    assert len({p.spec.canonical_body for p in valid}) == len(valid)


# --- training distribution --------------------------------------------------------------------

def test_training_compositions_and_constants_only(valid):
    held = heldout_compositions(0)
    for p in valid:
        assert p.spec.kinds not in held[p.spec.family]
        assert not is_heldout_constant(0, p.spec.family, p.spec.kinds, p.spec.params)


def test_training_frames_only(valid):
    train_frames = [_frame_pattern(f) for f in TRAIN_FRAMES]
    eval_frames = [_frame_pattern(f) for f in EVAL_FRAMES]
    for p in valid:
        assert any(f.match(p.instruction) for f in train_frames), p.instruction
        assert not any(f.match(p.instruction) for f in eval_frames), p.instruction


# --- size and spread --------------------------------------------------------------------------

def test_size_and_family_spread(valid):
    assert len(valid) == DEFAULT_SIZES["valid"]
    assert {p.generalization for p in valid} == {"valid"}
    counts = Counter(p.spec.family for p in valid)
    assert set(counts) == set(FAMILIES)
    quota = math.ceil(len(valid) / len(FAMILIES))
    full = [c for c in counts.values() if c >= quota]
    assert len(full) >= len(FAMILIES) // 2
    assert max(full) - min(full) <= 1  # the families that filled their quota share the overflow evenly


def test_short_family_has_no_fresh_program_left(valid, train):
    """A family is short of its quota only when every training-distribution program of it is in train,
    eval or valid already."""
    quota = math.ceil(len(valid) / len(FAMILIES))
    counts = Counter(p.spec.family for p in valid)
    used = {p.spec.canonical_body for p in (*train, *eval_problems(0), *valid)}
    held = heldout_compositions(0)
    for family in (f for f in FAMILIES if counts[f] < quota):
        for kinds in set(KIND_TUPLES[family]) - held[family]:
            for params in itertools.product(*(param_choices(k) for k in kinds)):
                spec = build_spec(family, kinds, params)
                if not is_heldout_constant(0, family, kinds, params) and not _is_degenerate(spec):
                    assert spec.canonical_body in used, (family, kinds, params)


# --- the tests test ---------------------------------------------------------------------------

def test_every_reference_solution_passes(tasks):
    assert [t["task_id"] for t in tasks if not _run(t["canonical_solution"], t)] == []
    assert all(t["test"].count("assert candidate(") >= 5 for t in tasks)


def test_wrong_solutions_fail(tasks, valid):
    survivors = []
    for t, p in zip(tasks, valid):
        header = _header(t)
        assert not _run(f"{header}\n    return None\n", t), t["task_id"]
        assert not _run(f"{header}\n    return {_first_arg(t)}\n", t), t["task_id"]
        if "while" in p.solution:  # moving a while-loop bound can make a mutant loop forever
            continue
        for variant in _off_by_one_variants(t["canonical_solution"]):
            if _run(variant, t) and _observably_different(t["canonical_solution"], variant, t, p.spec):
                survivors.append((t["task_id"], variant))
    assert survivors == []


# --- determinism and API ----------------------------------------------------------------------

def test_deterministic_by_seed(valid):
    assert valid_problems.__wrapped__(0) == valid
    assert valid_problems.__wrapped__(0, 40) != valid_problems.__wrapped__(1, 40)


def test_tasks_and_records(tasks, valid):
    assert [t["task_id"] for t in tasks] == [f"MiniCodeValid/{i}" for i in range(len(valid))]
    assert [t["canonical_solution"] for t in tasks] == [p.solution for p in valid]
    assert split_records("valid", 0) == tasks


def test_benchmark_registry(tasks):
    bench = load_benchmark("minicode-valid")
    assert bench.name == "minicode-valid" and bench.prompt_kind == "instruction" and bench.style == "check"
    assert list(bench.tasks) == [t["task_id"] for t in tasks]
    assert bench.fingerprint != load_benchmark("minicode").fingerprint
