"""Adversarial tests of the verdict: wrong programs that try to forge a pass.

Every program here gives a wrong answer and tries, one technique per test, to make
the harness count it as right anyway: objects that compare equal to anything,
subclasses of built-ins, recursive or huge results, fake reports written to every
descriptor, searching the stack and `gc` for the expected outputs or the checker
and patching it, patching builtins, the encoder, the exit functions, atexit
handlers, floods of fake results. Each must fail, on HumanEval-style tasks (the test
code runs in the judge and calls the program) and on MBPP+-style tasks (outputs
compared in the judge), at every sandbox level this machine offers.

The default run uses a handful of tasks per technique; `pytest -m slow` runs each
technique on 20 HumanEval and 20 MBPP+ tasks and prints the forged-pass counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from xft.eval import Benchmark, Sandbox, Task, TimeLimits, check_samples, detect_level, load_benchmark
from conftest import MBPP_FEW, private_cache, shared_data

MBPP_PLUS = Path(os.environ.get("XFT_MBPP_PLUS", shared_data("MbppPlus-2023-11.jsonl")))
needs_mbpp = pytest.mark.skipif(not MBPP_PLUS.is_file(), reason="MBPP+ data file not present")
BEST = detect_level()
LEVELS = [BEST] + (["rlimits"] if BEST != "rlimits" else [])
HUMANEVAL_FEW = ["HumanEval/0", "HumanEval/2", "HumanEval/32", "HumanEval/38", "HumanEval/53"]
LIMITS = TimeLimits(check_seconds=2.0, max_phase=4.0)

# ----------------------------------------------------------------- the techniques
# Each is a program defining `{entry}` (the task's entry point); none computes the answer.

_FORGE = '''
import gc, json, os, struct
def _nonce():  # the job's nonce is in this process: a forger can find it
    for o in gc.get_objects():
        if type(o) is dict and isinstance(o.get("nonce"), str):
            return o["nonce"]
    return ""
def _frames():
    n = _nonce()
    msgs = [{"status": "pass", "error": None}, {"phases": {"base": {"status": "pass", "error": None},
            "plus": {"status": "pass", "error": None}}}, {"n": n, "s": 0, "ready": True}]
    msgs += [{"n": n, "s": s, "v": "true"} for s in range(1, 40)]
    msgs += [{"n": n, "i": i, "v": "true"} for i in range(40)] + [{"n": n, "done": True, "status": "pass"}]
    return b"".join(struct.pack("<Q", len(m)) + m for m in (json.dumps(x).encode() for x in msgs))
def _forge():
    data = _frames()
    for fd in range(1024):
        try:
            os.set_blocking(fd, False)
            os.write(fd, data)
        except OSError:
            pass
'''

TECHNIQUES = {
    "eq_anything": '''
class _Any:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __hash__(self): return 0
    def __bool__(self): return True
def {entry}(*args, **kwargs):
    return _Any()
''',
    "int_subclass": '''
class _I(int):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __hash__ = int.__hash__
def {entry}(*args, **kwargs):
    return _I(7)
''',
    "str_subclass": '''
class _S(str):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __hash__ = str.__hash__
def {entry}(*args, **kwargs):
    return _S("x")
''',
    "list_subclass": '''
class _L(list):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
def {entry}(*args, **kwargs):
    return _L()
''',
    "float_subclass_in_tuple": '''
class _F(float):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __hash__ = float.__hash__
def {entry}(*args, **kwargs):
    return (_F(0.5), [_F(1.5)])
''',
    "recursive_list": '''
def {entry}(*args, **kwargs):
    x = []
    x.append(x)
    return x
''',
    "deeply_nested": '''
def {entry}(*args, **kwargs):
    x = []
    for _ in range(10000):
        x = [x]
    return x
''',
    "huge_result": '''
def {entry}(*args, **kwargs):
    return "x" * (24 << 20)
''',
    "fake_reports_on_every_fd_then_exit": _FORGE + '''
def {entry}(*args, **kwargs):
    _forge()
    os._exit(0)
''',
    "fake_reports_at_import_then_exit": _FORGE + '''
_forge()
os._exit(0)
def {entry}(*args, **kwargs):
    return None
''',
    "stack_and_gc_for_expected": '''
import gc, sys
def _find():
    f = sys._getframe(1)
    while f is not None:
        for name in ("exp", "expected", "expected_output", "outputs", "result", "value"):
            if name in f.f_locals:
                return f.f_locals[name]
        f = f.f_back
    for o in gc.get_objects():
        if type(o) is dict:
            for key in ("expected", "expected_pickle", "exp", "outputs", "truth"):
                if key in o:
                    return o[key]
    return None
def {entry}(*args, **kwargs):
    return _find()
''',
    "patch_checker_via_gc_and_globals": '''
import gc, sys, types
def _ok(*a, **k):
    return True
_NAMES = ("assert_output", "_assert_output", "judge_io_phase", "_mismatch", "check", "_result",
          "encode", "_tree", "decode", "_send_message", "_run_io", "_serve", "_first_line")
for _o in gc.get_objects():
    if isinstance(_o, types.FunctionType) and _o.__name__ in _NAMES and _o.__code__.co_freevars == ():
        try:
            _o.__code__ = _ok.__code__
        except Exception:
            pass
for _m in list(sys.modules.values()):
    for _n in _NAMES:
        if hasattr(_m, _n):
            try:
                setattr(_m, _n, _ok)
            except Exception:
                pass
def {entry}(*args, **kwargs):
    return None
''',
    "patch_builtins_and_json": '''
import builtins, json
json.dumps = lambda *a, **k: '{"status": "pass", "error": null, "v": "true", "done": true}'
builtins.isinstance = lambda *a: True
builtins.repr = lambda *a: "True"
def {entry}(*args, **kwargs):
    return None
''',
    "patch_exits_and_atexit": _FORGE + '''
import atexit, sys
atexit.register(_forge)
os._exit = lambda *a: None
sys.exit = lambda *a: None
def {entry}(*args, **kwargs):
    raise SystemExit(0)
''',
    "ignore_alarm_and_sleep_after_forging": _FORGE + '''
import signal, time
signal.signal(signal.SIGALRM, signal.SIG_IGN)
def {entry}(*args, **kwargs):
    _forge()
    time.sleep(60)
''',
    "flood_results_from_a_thread": _FORGE + '''
import threading
def _flood():
    data = _frames()
    while True:
        for fd in range(3, 64):
            try:
                os.write(fd, data)
            except OSError:
                pass
threading.Thread(target=_flood, daemon=True).start()
def {entry}(*args, **kwargs):
    return None
''',
    "generator_and_custom_iterables": '''
def {entry}(*args, **kwargs):
    return (x for x in [True])
''',
}


def _program(technique: str, entry: str) -> str:
    return TECHNIQUES[technique].replace("{entry}", entry)


# ----------------------------------------------------------------- benchmarks

_private_cache = pytest.fixture(autouse=True, scope="module")(private_cache)  # ground truth computed afresh


@pytest.fixture(scope="module", params=LEVELS)
def sandbox(request):
    with Sandbox(request.param) as box:
        yield box


def _passes(bench: Benchmark, task_ids, technique: str, sandbox: Sandbox) -> list[str]:
    samples = [{"task_id": t, "solution": _program(technique, bench.tasks[t].entry_point)} for t in task_ids]
    verdicts = check_samples(bench, samples, sandbox, workers=2, time_limits=LIMITS)
    return [v.task_id for v in verdicts if v.passed]


# ----------------------------------------------------------------- one property each

@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_forgery_fails_humaneval(technique, humaneval, sandbox):
    assert _passes(humaneval, HUMANEVAL_FEW, technique, sandbox) == []


@needs_mbpp
@pytest.mark.parametrize("technique", [pytest.param(t, marks=pytest.mark.slow) if t == "huge_result" else t
                                       for t in sorted(TECHNIQUES)])  # huge_result here: ~10 s per sandbox level
def test_forgery_fails_mbpp_plus(technique, mbpp_few, sandbox):
    assert _passes(mbpp_few, MBPP_FEW, technique, sandbox) == []


def test_honest_programs_still_pass(humaneval, mbpp_few, sandbox):
    """The control: the same tasks' canonical solutions pass in the same sandbox."""
    for bench, ids in ((humaneval, HUMANEVAL_FEW), (mbpp_few, MBPP_FEW)):
        samples = [{"task_id": t, "solution": bench.tasks[t].prompt + bench.tasks[t].canonical_solution}
                   for t in ids]
        assert all(v.passed for v in check_samples(bench, samples, sandbox, workers=2))


def test_redefined_helper_does_not_change_the_test(humaneval, sandbox):
    """HumanEval/32's test uses the prompt's `poly`: the program's own `poly` is not it."""
    program = "def poly(xs, x):\n    return 0.0\n\ndef find_zero(xs):\n    return 12345.0\n"
    [v] = check_samples(humaneval, [{"task_id": "HumanEval/32", "solution": program}], sandbox)
    assert not v.passed


def test_right_answers_pass_after_a_forger_on_the_same_worker(humaneval, sandbox):
    """Replies a forger left in the worker's pipes are not taken for the next program's."""
    task = humaneval.tasks["HumanEval/0"]
    forger = _program("flood_results_from_a_thread", task.entry_point)
    wrong = f"def {task.entry_point}(*a):\n    return True\n"
    right = task.prompt + task.canonical_solution
    samples = [{"task_id": task.task_id, "solution": p} for p in (forger, wrong, forger, right)]
    verdicts = check_samples(humaneval, samples, sandbox, workers=1, time_limits=LIMITS)
    assert [v.passed for v in verdicts] == [False, False, False, True]


def test_toy_check_task_sees_only_plain_values(sandbox):
    """A check-style test comparing with `is`/`type` sees exact built-ins, not the program's objects."""
    task = Task("toy/0", "", "f", "", test="def check(candidate):\n    r = candidate(1)\n"
                "    assert type(r) is int and r == 2\n")
    bench = Benchmark("toy", {"toy/0": task}, style="check")
    programs = ["def f(x):\n    return x + 1\n", "def f(x):\n    return True\n",
                "class I(int):\n    pass\ndef f(x):\n    return I(2)\n"]
    verdicts = check_samples(bench, [{"task_id": "toy/0", "solution": p} for p in programs], sandbox)
    assert [v.passed for v in verdicts] == [True, False, False]
    assert "not plain data" in verdicts[2].error


# ----------------------------------------------------------------- the full measurement

@pytest.mark.slow
@needs_mbpp
def test_no_forged_pass_on_20_humaneval_and_20_mbpp_plus(humaneval, sandbox, tmp_path):
    rows = [json.loads(line) for line in MBPP_PLUS.open()][:20]
    path = tmp_path / "MbppPlus-20.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mbpp = load_benchmark("mbpp+", str(path))
    he_ids = list(humaneval.tasks)[:20]
    counts = {t: (len(_passes(humaneval, he_ids, t, sandbox)), len(_passes(mbpp, list(mbpp.tasks), t, sandbox)))
              for t in TECHNIQUES}
    print(f"\nforged passes at level {sandbox.level} (HumanEval/20, MBPP+/20):")
    for t, (he, mb) in counts.items():
        print(f"  {t:40} {he:2d} {mb:2d}")
    assert all(c == (0, 0) for c in counts.values()), counts
