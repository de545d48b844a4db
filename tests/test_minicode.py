"""MiniCode: reference solutions pass, wrong ones fail, splits are deterministic and do not leak."""

from __future__ import annotations

import ast
import json
import random
import re
from collections import Counter

import pytest

from xft.errors import UserError
from xft.minicode.benchmark import load_tasks, split_records, write_splits
from xft.minicode.families import FAMILIES
from xft.minicode.phrasing import EVAL_FRAMES, TRAIN_FRAMES
from xft.minicode.splits import (
    eval_problems, heldout_compositions, pretrain_texts, train_problems, train_records,
)
from xft.minicode.unit_tests import INPUT_GENERATORS


@pytest.fixture(scope="module")
def tasks():
    return load_tasks("eval", seed=0)


@pytest.fixture(scope="module")
def train():
    return train_problems(seed=0)


@pytest.fixture(scope="module")
def pretrain():
    return pretrain_texts(seed=0)


def _run(solution: str, task: dict) -> bool:
    """Whether `solution` passes the task's check (trusted code: in process)."""
    ns: dict = {}
    try:
        exec(solution, ns)
        exec(task["test"], ns)
        ns["check"](ns[task["entry_point"]])
    except Exception:
        return False
    return True


def _header(task: dict) -> str:
    return task["canonical_solution"].splitlines()[0]


def _first_arg(task: dict) -> str:
    return ast.parse(task["canonical_solution"]).body[0].args.args[0].arg


# --- sizes and format ------------------------------------------------------------------------

def test_eval_size_families_and_tests(tasks):
    assert len(tasks) >= 300
    assert len({t["family"] for t in tasks}) >= 6
    assert all(t["test"].count("assert candidate(") >= 5 for t in tasks)
    assert len({t["task_id"] for t in tasks}) == len(tasks)
    assert all(t["task_id"] == f"MiniCode/{i}" for i, t in enumerate(tasks))
    counts = Counter(t["generalization"] for t in tasks)
    assert counts["composition"] >= 100 and counts["phrasing"] >= 100


def test_task_format(tasks):
    for t in tasks[:20]:
        assert {"task_id", "prompt", "entry_point", "canonical_solution", "test"} <= set(t)
        # named as in the answer: `def name(args)` or a bare " name" (the same token as in "def name(")
        assert re.search(rf"(`def {t['entry_point']}\(| {t['entry_point']} )", t["prompt"]), t["prompt"]
        assert t["canonical_solution"].startswith(f"def {t['entry_point']}(")
        assert t["test"].startswith("def check(candidate):")


def test_train_is_thousands_of_distinct_pairs():
    records = train_records(seed=0)
    assert len(records) >= 2000
    assert len({r["instruction"] for r in records}) == len(records)
    assert all(r["response"].startswith("```python\ndef ") and r["response"].endswith("```") for r in records)
    assert {r["family"] for r in records} == set(FAMILIES)


# --- the tests test ---------------------------------------------------------------------------

def test_every_reference_solution_passes(tasks):
    failing = [t["task_id"] for t in tasks if not _run(t["canonical_solution"], t)]
    assert failing == []


def test_trivially_wrong_solutions_fail(tasks):
    for t in tasks:
        header = _header(t)
        assert not _run(f"{header}\n    return None\n", t), t["task_id"]
        assert not _run(f"{header}\n    return {_first_arg(t)}\n", t), t["task_id"]
        assert not _run(f"{header}\n    pass\n", t), t["task_id"]


def _off_by_one_variants(source: str) -> list[str]:
    """The source with one integer literal moved by +1 or -1 (each occurrence separately)."""
    out = []
    for m in re.finditer(r"(?<![\w.])\d+(?![\w.])", source.split("\n", 1)[1]):
        start = len(source.split("\n", 1)[0]) + 1 + m.start()
        value = int(m.group())
        for new in (value + 1, value - 1):
            out.append(source[:start] + str(new) + source[start + len(m.group()):])
    return out


def _observably_different(a: str, b: str, task: dict, spec) -> bool:
    """Whether two sources disagree on some of 300 fresh random inputs (a stricter probe than the test pool)."""
    ns_a, ns_b = {}, {}
    exec(a, ns_a), exec(b, ns_b)
    fa, fb = ns_a[task["entry_point"]], ns_b[task["entry_point"]]
    rng = random.Random(1234)
    for _ in range(300):
        args = INPUT_GENERATORS[spec.inputs](rng, spec)
        try:
            out_a = fa(*[list(x) if isinstance(x, list) else x for x in args])
        except Exception:
            continue
        try:
            if fb(*[list(x) if isinstance(x, list) else x for x in args]) != out_a:
                return True
        except Exception:
            return True
    return False


def test_off_by_one_solutions_fail(tasks):
    problems = eval_problems(0)
    survivors = []
    for t, p in zip(tasks, problems):
        assert t["canonical_solution"] == p.solution
        if "while" in p.solution:  # moving a while-loop bound can make a mutant loop forever
            continue
        for variant in _off_by_one_variants(t["canonical_solution"]):
            if _run(variant, t) and _observably_different(t["canonical_solution"], variant, t, p.spec):
                survivors.append((t["task_id"], variant))
    assert survivors == []


# --- determinism ------------------------------------------------------------------------------

def test_splits_are_deterministic_by_seed():
    a = eval_problems.__wrapped__(0, 40)
    assert a == eval_problems.__wrapped__(0, 40)
    assert a != eval_problems.__wrapped__(1, 40)
    assert train_records(0, 50) == train_records(0, 50)
    assert train_records(0, 50) != train_records(1, 50)
    assert pretrain_texts(0, 30) == pretrain_texts(0, 30)
    assert heldout_compositions(0) != heldout_compositions(1)


def test_load_tasks_is_stable_across_calls(tasks):
    assert load_tasks("eval", seed=0) == tasks


# --- leakage ----------------------------------------------------------------------------------

def _canonical_bodies(source: str) -> set[str]:
    """Every function in `source` with its arguments renamed a0, a1, ... (body only, normalised by ast)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef):
            names = {a.arg: f"a{i}" for i, a in enumerate(node.args.args)}
            for n in ast.walk(node):
                if isinstance(n, ast.Name) and n.id in names:
                    n.id = names[n.id]
            out.add("\n".join(ast.unparse(stmt) for stmt in node.body))
    return out


def test_no_eval_instruction_or_solution_in_train(tasks, train):
    train_instructions = {p.instruction for p in train}
    train_bodies = set().union(*(_canonical_bodies(p.solution) for p in train))
    for t in tasks:
        assert t["prompt"] not in train_instructions
        assert not (_canonical_bodies(t["canonical_solution"]) & train_bodies), t["canonical_solution"]


def test_no_eval_solution_in_pretrain(tasks, pretrain):
    pretrain_bodies = set().union(*(_canonical_bodies(text) for text in pretrain))
    corpus = "\n".join(pretrain)
    for t in tasks:
        assert t["canonical_solution"] not in corpus
        assert not (_canonical_bodies(t["canonical_solution"]) & pretrain_bodies), t["canonical_solution"]


def test_pretrain_is_plain_code(pretrain):
    for text in pretrain:
        ast.parse(text)  # parses as Python: no natural-language instructions
    assert "@@ Instruction" not in "\n".join(pretrain)
    assert sum(map(len, pretrain)) > 500_000


def test_heldout_compositions_are_held_out(tasks, train):
    held = heldout_compositions(0)
    train_kinds = {(p.spec.family, p.spec.kinds) for p in train}
    for family, kinds_set in held.items():
        assert kinds_set, family
        for kinds in kinds_set:
            assert (family, kinds) not in train_kinds
            # ...while each of its primitives appears in that role in training compositions.
            for i, kind in enumerate(kinds):
                assert any(f == family and len(k) > i and k[i] == kind and len(k) >= 2 for f, k in train_kinds)
    for p in eval_problems(0):
        if p.generalization == "composition":
            assert p.spec.kinds in held[p.spec.family]
        else:
            assert p.spec.kinds not in held[p.spec.family]


def _frame_pattern(frame: str) -> re.Pattern:
    parts = re.split(r"\{\w+\}", frame)
    return re.compile("^" + ".+".join(re.escape(p) for p in parts) + "$", re.S)


def test_heldout_phrasings_are_held_out(tasks, train):
    eval_frames = [_frame_pattern(f) for f in EVAL_FRAMES]
    train_frames = [_frame_pattern(f) for f in TRAIN_FRAMES]
    assert not set(EVAL_FRAMES) & set(TRAIN_FRAMES)
    for p in train:
        assert not any(f.match(p.instruction) for f in eval_frames), p.instruction
    for p in eval_problems(0):
        frames = eval_frames if p.generalization == "phrasing" else train_frames
        assert any(f.match(p.instruction) for f in frames), p.instruction


# --- API --------------------------------------------------------------------------------------

def test_unknown_split_is_a_user_error():
    with pytest.raises(UserError):
        load_tasks("train")
    with pytest.raises(UserError):
        split_records("validation")


def test_write_splits(tmp_path):
    paths = write_splits(tmp_path, seed=0, sizes={"pretrain": 5, "train": 7, "eval": 16})
    rows = {s: [json.loads(line) for line in p.read_text().splitlines()] for s, p in paths.items()}
    assert [len(rows[s]) for s in ("pretrain", "train", "eval")] == [5, 7, 16]
    assert set(rows["pretrain"][0]) == {"text"}
    assert {"instruction", "response"} <= set(rows["train"][0])
    assert rows["eval"][0]["task_id"] == "MiniCode/0"
