"""The judge: pass or fail, decided where no candidate code runs.

The candidate program runs in the sandbox; what comes back is only plain data
(`xft.eval.plain`) in frames that must carry the job's nonce and sequence numbers.
This module, in the `xft eval` process, turns that into verdicts:

* EvalPlus style (`judge_io_phase`): the outputs the program reported for a phase's
  inputs are compared, in order, with the expected outputs (which never enter the
  sandbox) by EvalPlus's rules (`xft.eval.oracles`). The first input without a
  matching output decides the verdict.
* HumanEval style (`judge_check`): the benchmark's test code, and the task's prompt
  (benchmark data: trusted helpers such as `poly` for find_zero), run here with
  `candidate` a proxy whose calls execute in the sandbox: arguments go in as plain
  data, the return value comes back as plain data. The program cannot redefine the
  helpers the test uses, and nothing it prints or writes becomes a verdict.

Guarantee: a pass needs plain results equal (by the benchmark's rules) to expected
outputs, or test assertions that hold on plain values. A program that returns an
object with a forged `__eq__`, writes fake reports on its descriptors, patches the
checker, reads the stack or exits early fails: nothing it can reach holds the
expected outputs or decides the verdict. Limits: a program that hard-codes the
benchmark's answers passes (it returns right answers); the test code is trusted
benchmark code and runs here, bounded by a deadline checked on each of its lines
and each call, but a single C-level operation it performs on a returned value
(e.g. `'x' * n` for a huge returned `n`) is not interrupted.
"""

from __future__ import annotations

import builtins
import json
import sys
import time

from xft.eval import oracles, plain
from xft.eval.sandbox import Ended, Session

_TEST_FILE, _PROMPT_FILE = "<benchmark test>", "<benchmark prompt>"


def _verdict(status: str, error: str | None = None) -> dict:
    return {"status": status, "error": error}


# ----------------------------------------------------------------- EvalPlus style

def _frames(phase: dict, nonce: str):
    """The phase's frames as dicts carrying our nonce; a malformed or oversized one (a
    frame carries at most one value: `plain.FRAME_BYTES`) ends the list."""
    frames = phase.get("frames")
    for text in frames if isinstance(frames, list) else [None]:
        try:
            msg = json.loads(text) if len(text) <= plain.FRAME_BYTES else None
        except Exception:  # not text, bad JSON, RecursionError: a garbled report
            msg = None
        if not isinstance(msg, dict) or msg.get("n") != nonce:
            yield {"garbled": True}
            return
        yield msg


def judge_io_phase(phase: dict | None, nonce: str, inputs: list, expected: list, entry_point: str,
                   oracle: str | None, atol: float, deadline: float) -> dict:
    """Verdict of one EvalPlus phase from the sandbox's report `phase` ({"frames", "end"})."""
    if not isinstance(phase, dict):
        return _verdict("error", "no report")
    i = 0
    for msg in _frames(phase, nonce):
        if "load_error" in msg or "error" in msg:
            return _verdict("error", str(msg.get("load_error") or msg.get("error"))[:300])
        if i == len(inputs) or msg.get("i") != i:
            if msg.get("done") is True and i == len(inputs):
                break
            return _verdict("fail", f"input #{i}: garbled report")
        if "e" in msg or "x" in msg:
            return _verdict("fail", f"input #{i}: {str(msg.get('e') or msg.get('x'))[:300]}")
        problem = _mismatch(msg, expected[i], inputs[i], entry_point, oracle, atol)
        if isinstance(problem, str):
            return _verdict("fail", f"input #{i}: {problem}")
        atol = problem
        i += 1
    if i == len(inputs):
        return _verdict("pass")
    if phase.get("end") == "deadline":
        return _verdict("timeout", f"no answer within {deadline:.1f}s")
    return _verdict("error", "the program ended before its tests finished")


def _mismatch(msg: dict, exp: tuple, inp, entry_point: str, oracle: str | None, atol: float):
    """Why the reported output `msg` is not accepted (a string), else the next atol."""
    kind, value = exp
    if "d" in msg:  # too large for the wire: only an identical huge output matches
        return atol if kind == "digest" and msg["d"] == value else "wrong output (compared by digest)"
    if "v" not in msg:
        return "garbled report"
    if kind == "digest":
        return "wrong output"
    try:
        out = plain.build(msg["v"])
    except plain.PlainError as e:
        return f"the result is not plain data: {e}"
    try:
        return oracles.assert_output(out, value, inp, entry_point, oracle, atol)
    except AssertionError:
        return "wrong output"
    except Exception as e:  # a comparison that cannot even be made (e.g. set() of an int)
        return f"wrong output ({type(e).__name__})"


# ----------------------------------------------------------------- HumanEval style

class _Gone(BaseException):
    """The candidate can answer no more (or answered with something that is no answer), or
    the benchmark's code ran past the deadline. A BaseException, so that a test's
    `except Exception` cannot swallow it."""

    def __init__(self, message: str, status: str = "fail"):
        super().__init__(message)
        self.status = status


class CandidateError(Exception):
    """The candidate raised an exception of a type the judge does not have (by name)."""


def _raised(line: str) -> BaseException:
    """The exception a candidate's call raised, rebuilt from its first line: a built-in
    exception type by name (so tests that expect e.g. ValueError keep working)."""
    name, _, message = line.partition(": ")
    cls = getattr(builtins, name, None)
    if name in ("SystemExit", "KeyboardInterrupt", "GeneratorExit"):
        return _Gone(f"the program {'exited' if name == 'SystemExit' else 'stopped'}: {line}")
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:  # a built-in that wants other arguments (ExceptionGroup, ...)
            pass
    return CandidateError(line)


class _Candidate:
    """The test's `candidate`: each call runs in the sandbox."""

    def __init__(self, session: Session):
        self.session, self.gone = session, None

    def __call__(self, *args, **kwargs):
        try:
            wires = {"a": plain.encode(list(args)), "k": plain.encode(kwargs)}
        except plain.PlainError as e:
            raise self._gone(_Gone(f"the test's arguments are not plain data ({e})", "error"))
        try:
            reply = self.session.request(wires)
        except Ended as e:
            raise self._gone(_Gone(str(e), e.status))
        if "v" in reply:
            try:
                return plain.build(reply["v"])
            except plain.PlainError as e:
                raise self._gone(_Gone(f"the result is not plain data: {e}"))
        if "e" in reply:
            exc = _raised(str(reply["e"])[:300])
            raise self._gone(exc) if isinstance(exc, _Gone) else exc
        if "x" in reply:
            raise self._gone(_Gone(str(reply["x"])[:300]))
        if "d" in reply:
            raise self._gone(_Gone("the result is larger than the wire limit"))
        raise self._gone(_Gone("the program garbled its reply"))

    def _gone(self, exc: _Gone) -> _Gone:
        self.gone = self.gone or exc  # sticky: a test that swallows it still fails
        return exc


def _tracer(deadline: float):
    """A trace function stopping the benchmark's own code (test and prompt) at `deadline`."""
    def local(frame, event, arg):
        if time.monotonic() > deadline:
            raise _Gone("timed out", "timeout")
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_filename in (_TEST_FILE, _PROMPT_FILE) else None
    return calls


def compile_check(prompt: str | None, test: str):
    """Compiled (prompt or None, test) code of a HumanEval-style task, for `judge_check`.
    The prompt is kept only if it compiles and runs on its own (a code prompt)."""
    code = None
    if prompt:
        try:
            code = compile(prompt, _PROMPT_FILE, "exec")
            exec(code, {"__name__": "__judge__"})
        except BaseException:  # natural-language prompt, or code that needs the completion
            code = None
    return code, compile(test, _TEST_FILE, "exec")


def judge_check(session: Session, compiled: tuple, entry_point: str, seconds: float) -> dict:
    """Run the task's `check(candidate)` here against the program served by `session`."""
    deadline = time.monotonic() + seconds
    session.deadline = min(session.deadline, deadline)
    try:
        hello = session.reply()
    except Ended as e:
        return _verdict(e.status, str(e))
    if "load_error" in hello:
        return _verdict("fail", str(hello["load_error"])[:300])
    if hello.get("ready") is not True:
        return _verdict("fail", "the program garbled its reply")
    prompt, test = compiled
    candidate = _Candidate(session)
    env = {"__name__": "__judge__"}
    previous = sys.gettrace()
    sys.settrace(_tracer(deadline))
    try:
        if prompt is not None:
            exec(prompt, env)
        env[entry_point] = candidate  # the prompt's stub (or the program's own) is not the candidate
        exec(test, env)
        env["check"](candidate)
    except _Gone as e:  # the candidate's end, or the benchmark's code past the deadline
        return _verdict(e.status, str(e))
    except KeyboardInterrupt:  # the user's Ctrl-C (the program's own comes back as _Gone)
        raise
    except BaseException as e:  # the test failed (MemoryError included: it is not ours)
        return _verdict(candidate.gone.status if candidate.gone else "fail",
                        str(candidate.gone) if candidate.gone else _first_line(e))
    finally:
        sys.settrace(previous)
    if candidate.gone:
        return _verdict(candidate.gone.status, str(candidate.gone))
    return _verdict("pass")


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
