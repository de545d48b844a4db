"""Benchmarks, ground truth and execution: canonical solutions pass, wrong ones fail."""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import pytest

from xft.errors import UserError
from xft.eval import Sandbox, TimeLimits, check_samples, load_benchmark
from xft.eval.benchmarks import names
from conftest import private_cache, shared_data

MBPP_PLUS = Path(os.environ.get("XFT_MBPP_PLUS", shared_data("MbppPlus-2023-11.jsonl")))
needs_mbpp = pytest.mark.skipif(not MBPP_PLUS.is_file(), reason="MBPP+ data file not present")
# Light tasks (no huge outputs, no slow references), exercising special oracles:
# 2 (set equality), 581 (surface area oracle), 590 (complex outputs), 88 (Counter).
MBPP_SUBSET = ["Mbpp/2", "Mbpp/3", "Mbpp/4", "Mbpp/581", "Mbpp/590", "Mbpp/88", "Mbpp/17", "Mbpp/20"]


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox()


@pytest.fixture(scope="module")
def mbpp_subset_file(tmp_path_factory):
    """A few MBPP+ tasks in their own file (their own, quick, ground-truth cache)."""
    rows = [json.loads(line) for line in MBPP_PLUS.open()]
    path = tmp_path_factory.mktemp("mbpp") / "MbppPlus-subset.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["task_id"] in MBPP_SUBSET))
    return str(path)


_private_cache = pytest.fixture(autouse=True, scope="module")(private_cache)  # ground truth computed afresh


def test_registry_names():
    assert {"humaneval", "humaneval+", "mbpp", "mbpp+", "minicode"} <= set(names())


def test_humaneval_loads_164_tasks(humaneval):
    assert len(humaneval.tasks) == 164 and humaneval.style == "check"


def test_humaneval_canonical_passes_as_completion_and_solution(humaneval, sandbox):
    tasks = list(humaneval.tasks.values())[::8]  # 21 tasks; the full set is a slow test
    samples = [{"task_id": t.task_id, "completion": t.canonical_solution} for t in tasks]
    samples += [{"task_id": t.task_id, "solution": t.prompt + t.canonical_solution} for t in tasks]
    verdicts = check_samples(humaneval, samples, sandbox)
    assert [v.task_id for v in verdicts] == [s["task_id"] for s in samples]  # input order
    assert all(v.passed and v.status == "pass" for v in verdicts)


def test_return_none_fails(humaneval, sandbox):
    tasks = list(humaneval.tasks.values())[:10]
    verdicts = check_samples(humaneval, [{"task_id": t.task_id, "completion": "    return None\n"}
                                         for t in tasks], sandbox)
    assert not any(v.passed for v in verdicts)
    assert all(v.status == "fail" and v.error for v in verdicts)


def test_syntax_error_is_a_failure_with_its_first_line(humaneval, sandbox):
    [v] = check_samples(humaneval, [{"task_id": "HumanEval/0", "completion": "    return (\n"}], sandbox)
    assert not v.passed and "SyntaxError" in v.error


@needs_mbpp
def test_mbpp_plus_canonical_passes_base_and_plus(mbpp_subset_file, sandbox):
    bench = load_benchmark("mbpp+", mbpp_subset_file)
    assert bench.phases == ("base", "plus") and len(bench.tasks) == len(MBPP_SUBSET)
    samples = [{"task_id": t.task_id, "solution": t.prompt + t.canonical_solution}
               for t in bench.tasks.values()]
    verdicts = check_samples(bench, samples, sandbox)
    assert all(v.passed for v in verdicts), [v for v in verdicts if not v.passed]
    assert all(v.phases["plus"]["status"] == "pass" for v in verdicts)


@needs_mbpp
def test_an_mbpp_plus_prompt_names_its_function(mbpp_subset_file, tmp_path):
    # MBPP+ before v0.2.0 keeps its examples apart (`assertion`): the prompt gets the first, inside its
    # docstring, as v0.2.0 has it; a prompt that already holds an example is left as it is.
    rows = [json.loads(line) for line in open(mbpp_subset_file)]
    bench = load_benchmark("mbpp+", mbpp_subset_file)
    for r in rows:
        prompt, description = bench.tasks[r["task_id"]].prompt, r["prompt"].rstrip().rstrip("'\"").rstrip()
        first = next(line for line in r["assertion"].splitlines() if line.startswith("assert "))
        assert r["entry_point"] not in r["prompt"] and f"{r['entry_point']}(" in prompt
        assert prompt.startswith(description) and first in prompt
        assert isinstance(ast.parse(prompt).body[0].value.value, str)  # still one docstring
    current = tmp_path / "MbppPlus-v0.2.0-style.jsonl"
    current.write_text("".join(json.dumps({**r, "prompt": bench.tasks[r["task_id"]].prompt}) + "\n" for r in rows))
    again = load_benchmark("mbpp+", str(current))
    assert all(again.tasks[t].prompt == bench.tasks[t].prompt for t in bench.tasks)


@needs_mbpp
def test_mbpp_wrong_answers_fail(mbpp_subset_file, sandbox):
    bench = load_benchmark("mbpp", mbpp_subset_file)
    assert bench.phases == ("base",)
    samples = [{"task_id": t.task_id, "solution": f"def {t.entry_point}(*args):\n    return None\n"}
               for t in bench.tasks.values()]
    verdicts = check_samples(bench, samples, sandbox)
    assert not any(v.passed for v in verdicts)


@needs_mbpp
def test_io_timeout_and_missing_entry_point(mbpp_subset_file, sandbox):
    bench = load_benchmark("mbpp+", mbpp_subset_file)
    t = bench.tasks["Mbpp/3"]
    samples = [{"task_id": t.task_id, "solution": f"def {t.entry_point}(*a):\n    while True: pass\n"},
               {"task_id": t.task_id, "solution": "def something_else():\n    return 1\n"}]
    slow, missing = check_samples(bench, samples, sandbox, time_limits=TimeLimits(max_phase=2.0))
    assert not slow.passed and "timed out" in slow.error
    assert not missing.passed and missing.status == "error"
    assert "the answer does not define is_not_prime" in missing.error


def test_unknown_benchmark_is_a_user_error():
    with pytest.raises(UserError, match="unknown benchmark"):
        load_benchmark("nope")


def test_evalplus_data_missing_offline_says_how_to_provide_it(monkeypatch, tmp_path):
    monkeypatch.delenv("HUMANEVAL_OVERRIDE_PATH", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # EvalPlus's cache: empty
    import evalplus.data.utils as ep

    monkeypatch.setattr(ep, "CACHE_DIR", str(tmp_path / "evalplus"))
    monkeypatch.setattr(ep, "make_cache", _offline)
    with pytest.raises(UserError, match="--data PATH"):
        load_benchmark("humaneval+")


def _offline(*args, **kwargs):
    raise OSError("network is unreachable")


def test_bad_data_file_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "x"}\n')
    with pytest.raises(UserError, match="lacks"):
        load_benchmark("humaneval", str(bad))
    with pytest.raises(UserError, match="no such file"):
        load_benchmark("mbpp+", str(tmp_path / "missing.jsonl"))


def test_minicode_missing_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "xft.minicode.benchmark", None)  # import now fails
    with pytest.raises(UserError, match="minicode"):
        load_benchmark("minicode")


def test_minicode_data_file_is_an_instruction_benchmark(tmp_path, sandbox):
    row = {"task_id": "mini/0", "prompt": "Write a function add(a, b) returning a + b.",
           "entry_point": "add", "canonical_solution": "def add(a, b):\n    return a + b\n",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}
    path = tmp_path / "mini.jsonl"
    path.write_text(json.dumps(row) + "\n")
    bench = load_benchmark("minicode", str(path))
    assert bench.prompt_kind == "instruction"
    [v] = check_samples(bench, [{"task_id": "mini/0", "solution": row["canonical_solution"]}], sandbox)
    assert v.passed


@pytest.mark.slow
def test_full_humaneval_canonical_and_none(humaneval, sandbox):
    tasks = list(humaneval.tasks.values())
    good = check_samples(humaneval, [{"task_id": t.task_id, "completion": t.canonical_solution}
                                     for t in tasks], sandbox)
    good += check_samples(humaneval, [{"task_id": t.task_id, "solution": t.prompt + t.canonical_solution}
                                      for t in tasks], sandbox)
    assert all(v.passed for v in good)
    none = check_samples(humaneval, [{"task_id": t.task_id, "completion": "    return None\n"}
                                     for t in tasks], sandbox)
    assert sum(v.passed for v in none) <= 2


@pytest.mark.slow
@needs_mbpp
def test_full_mbpp_plus_canonical(sandbox, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")  # the real cache: the ground truth takes minutes
    bench = load_benchmark("mbpp+", str(MBPP_PLUS))
    samples = [{"task_id": t.task_id, "solution": t.prompt + t.canonical_solution}
               for t in bench.tasks.values()]
    verdicts = check_samples(bench, samples, sandbox)
    assert all(v.passed for v in verdicts), [v.task_id for v in verdicts if not v.passed]
