"""Processes run side by side: the one scheduler of `xft run --jobs N` (stages) and the study (whole runs).

    run_jobs([Job("moe", argv, "logs/moe.log", deps=("upcycle",))], parallel=2, say=print)

A job is a command line with a log file; it starts once every job it depends
on has finished, the most depended-on first among the ready ones. The first
failure stops new starts, lets the running jobs finish (their work is kept
and resumes), and raises a `UserError` quoting the failed job's last log lines.
Ctrl-C terminates every running process, so nothing is left orphaned.

The run record lives here too: `sessions.json` (one entry per invocation that
computed anything: command, machine, wall seconds, what it ran) and
`timings.json` (wall seconds per job, over all sessions), for `xft run`'s
report and the study's provenance alike.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

from xft.artifacts import atomic_write_json, read_json
from xft.errors import UserError

TIMINGS_FILE = "timings.json"
SESSIONS_FILE = "sessions.json"
_BAR_COUNT = re.compile(r"(\d+)/(\d+) \[")  # "360/800 [" in a tqdm line


@dataclass
class Job:
    """One process to run: its command line, where its output goes, what it waits for."""

    name: str
    argv: list[str]
    log: str  # stdout and stderr, appended
    deps: tuple[str, ...] = ()
    priority: float = 0.0  # among ready jobs, the highest starts first
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    header: str = ""  # a line written to the log before the process starts (e.g. the command a user re-runs)
    title: str = ""  # how the log lines name it (default: its name)
    noun: str = "job"  # what it is, in the failure message: "stage upcycle failed"

    def __str__(self) -> str:
        return self.title or self.name


def run_jobs(jobs: list[Job], parallel: int, say: Callable[[str], None] = lambda _: None,
             progress: bool = False, on_done: Callable[[Job, float], None] | None = None) -> None:
    """Run `jobs` as processes, at most `parallel` at once, each once its `deps` (names of `jobs`) finished.

    `say` gets one line per start, end and failure; `progress`: a bar of finished jobs whose postfix shows
    each running job's own progress-bar count from its log; `on_done(job, seconds)` after each success.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="jobs", unit="job", disable=not progress, dynamic_ncols=True)

    def note(line: str) -> None:
        with tqdm.external_write_mode():
            say(line)

    pool = _Running(jobs, parallel, note)
    shown_at = 0.0
    try:
        while pool.start_ready():
            if progress and time.monotonic() - shown_at > 2.0:  # at most every 2 s: a log without a tty stays short
                bar.set_postfix_str(pool.status())
                shown_at = time.monotonic()
            time.sleep(0.2)
            for job, seconds in pool.reap():
                bar.update(1)
                if on_done:
                    on_done(job, seconds)
    except BaseException:  # Ctrl-C or a bug here: leave no orphaned processes behind
        pool.terminate()
        raise
    finally:
        bar.close()
    if pool.failed:
        job, rc = pool.failed[0]
        raise UserError(f"{job.noun} {job.name} failed (exit {rc}); re-running the same command resumes it. "
                        f"Last lines of {job.log}:\n{tail(job.log)}")


class _Running:
    """The state of one `run_jobs` call: what waits, what runs, what finished or failed."""

    def __init__(self, jobs: list[Job], parallel: int, note: Callable[[str], None]):
        self.names = {j.name for j in jobs}
        self.pending, self.finished, self.parallel, self.note = list(jobs), set(), parallel, note
        self.running: dict[str, tuple[Job, subprocess.Popen, float]] = {}
        self.failed: list[tuple[Job, int]] = []

    def start_ready(self) -> bool:
        """Start ready jobs while slots are free (none after a failure); False once nothing runs or can."""
        ready = [j for j in self.pending if all(d in self.finished or d not in self.names for d in j.deps)]
        while ready and len(self.running) < self.parallel and not self.failed:
            job = max(ready, key=lambda j: j.priority)  # max keeps the first of equals: the given order
            ready.remove(job)
            self.pending.remove(job)
            self.running[job.name] = (job, _start(job), time.perf_counter())
            self.note(f"{job} ... (log: {job.log})")
        if self.running:
            return True
        if self.pending and not self.failed:
            raise RuntimeError(f"jobs {[j.name for j in self.pending]} wait on jobs that never run")
        return False

    def reap(self) -> list[tuple[Job, float]]:
        """The jobs that finished well since the last call, with their wall seconds; failures are recorded."""
        done = []
        for name, (job, proc, t0) in list(self.running.items()):
            if (rc := proc.poll()) is None:
                continue
            del self.running[name]
            seconds = time.perf_counter() - t0
            if rc != 0:
                self.failed.append((job, rc))
                self.note(f"{job} -- FAILED (exit {rc}) after {seconds:.0f} s")
                continue
            self.finished.add(name)
            self.note(f"{job} -- done in {seconds:.0f} s")
            done.append((job, seconds))
        return done

    def status(self) -> str:
        """Each running job with its own progress-bar count, e.g. "moe 120/800, sft 300/800"."""
        return ", ".join(f"{name} {_log_progress(job.log)}".strip() for name, (job, _, _) in self.running.items())

    def terminate(self) -> None:
        for _, proc, _ in self.running.values():
            proc.terminate()
        for _, proc, _ in self.running.values():
            proc.wait()


def _start(job: Job) -> subprocess.Popen:
    os.makedirs(os.path.dirname(job.log) or ".", exist_ok=True)
    with open(job.log, "a") as log:
        if job.header:
            log.write(job.header.rstrip("\n") + "\n")
            log.flush()
        return subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **job.env})


def _log_progress(path: str) -> str:
    """"done/total" of the newest progress bar in a log ("" if it shows none yet)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 2048))
            found = _BAR_COUNT.findall(f.read().decode(errors="replace"))
    except OSError:
        return ""
    return f"{found[-1][0]}/{found[-1][1]}" if found else ""


def tail(path: str, lines: int = 15) -> str:
    """The last `lines` lines of a log ("" if unreadable)."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def thread_env(threads: int) -> dict[str, str]:
    """The environment that holds a child's BLAS/OpenMP pools to `threads` threads."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


# ---------------------------------------------------------------- the run record

def record_time(root: str, name: str, seconds: float) -> None:
    """Add `seconds` of wall time to job `name` in root/timings.json."""
    timings = read_timings(root)
    timings[name] = round(timings.get(name, 0.0) + seconds, 2)
    atomic_write_json(os.path.join(root, TIMINGS_FILE), timings)


def read_timings(root: str) -> dict[str, float]:
    """Job (stage) name -> wall seconds spent on it, over all sessions that worked on it."""
    return read_json(os.path.join(root, TIMINGS_FILE)) or {}


def read_sessions(root: str) -> list[dict]:
    """The invocations that computed something in `root`: command, device, machine, wall seconds, work run."""
    return read_json(os.path.join(root, SESSIONS_FILE)) or []


def record_session(root: str, command: str | None, seconds: float, ran: list[str], device: str = "cpu") -> None:
    """Append this invocation to root/sessions.json; call it only when it ran something (a re-run that
    skips everything is no session)."""
    session = {"command": command, "device": device, "machine": machine(), "cpu_capability": cpu_capability(),
               "seconds": round(seconds, 2), "stages": ran,
               "ended": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_json(os.path.join(root, SESSIONS_FILE), read_sessions(root) + [session])


def machine() -> str:
    """The machine, in words: CPU count and model, OS and architecture."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.machine()}"


def cpu_capability() -> str:
    """The instruction set torch's CPU kernels run with here (e.g. AVX512, AVX2): results are bit-identical
    only between runs with the same one; another changes the rounding of reductions."""
    import torch

    return torch.backends.cpu.get_cpu_capability()
