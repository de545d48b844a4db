"""Expected outputs for differential ("io") tests, from the canonical solutions.

As EvalPlus does, each canonical solution is run on every test input (a deep copy)
and its outputs and per-input wall times are recorded; a candidate later gets
`max(1 s, 4 × reference time)` per input. We run the canonical code in the sandbox
too, in parallel, and cache the result per data file under
`$XDG_CACHE_HOME/xft/eval/<benchmark>-<data hash>/` (default `~/.cache/xft/eval`):
`times.json` plus one pickle of outputs per task and phase.

The outputs are never unpickled in this process (some tasks produce hundreds of
MB): their bytes go to the sandbox with each job, where the harness decodes them
with an unpickler that only builds plain data, so neither a tampered cache nor a
sandboxed program can run code here.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from xft.errors import UserError
from xft.eval.benchmarks import Benchmark
from xft.eval.sandbox import Sandbox

_CACHE_VERSION = 1
_REFERENCE_DEADLINE = 300.0  # seconds per phase for a canonical solution
_PHASES = ("base", "plus")  # always both: one cache serves MBPP and MBPP+
# Tasks whose outputs are checked only for not-None-ness (EvalPlus's MBPP+ oracle).
_MBPP_NOT_NONE = {"check_str", "text_match_three", "text_starta_endb"}


@dataclasses.dataclass
class GroundTruth:
    """Where a benchmark's expected outputs live, and the reference timings."""

    directory: Path
    times: dict  # task_id -> {"base": [seconds per input], "plus": [...]}

    def outputs(self, task_id: str, phase: str) -> bytes:
        """The pickled expected outputs (decoded only inside the sandbox)."""
        return (self.directory / _file_name(task_id, phase)).read_bytes()


def _file_name(task_id: str, phase: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", task_id) + f".{phase}.pkl"


def cache_dir(bench: Benchmark) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xft" / "eval"
    return root / f"{bench.name.rstrip('+')}-{bench.fingerprint}-v{_CACHE_VERSION}"


def _reference_job(bench: Benchmark, task) -> dict:
    phases = [{"name": p, "inputs": getattr(task, f"{p}_input"), "deadline": _REFERENCE_DEADLINE}
              for p in _PHASES]
    return {"kind": "reference", "code": task.prompt + task.canonical_solution,
            "entry_point": task.entry_point, "phases": phases,
            "output_not_none": bench.oracle == "mbpp" and task.entry_point in _MBPP_NOT_NONE}


def _compute(bench: Benchmark, sandbox: Sandbox, workers: int, directory: Path) -> dict:
    # Trusted code with big outputs (hundreds of MB): room to write them, no memory cap.
    limits = dataclasses.replace(sandbox.limits, file_bytes=-1, memory_bytes=0, scratch_bytes=16 << 30)
    box = Sandbox(sandbox.level, limits)

    def one(task):
        keep = {f"{p}.pkl": str(directory / _file_name(task.task_id, p)) for p in _PHASES}
        result = box.run(_reference_job(bench, task), deadline=2 * _REFERENCE_DEADLINE + 10, keep=keep)
        phases = (result.verdict or {}).get("phases", {})
        for p in _PHASES:
            r = phases.get(p, {})
            if r.get("status") != "pass" or not os.path.isfile(keep[f"{p}.pkl"]):
                raise UserError(f"{bench.name}: the canonical solution of {task.task_id} fails "
                                f"on its {p} inputs ({r.get('error') or 'no answer'})")
        return task.task_id, {p: phases[p]["times"] for p in _PHASES}

    with box, concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(one, bench.tasks.values()))


def expected_outputs(bench: Benchmark, sandbox: Sandbox, workers: int = 1) -> GroundTruth:
    """The benchmark's ground truth, computed once per data file and cached."""
    directory = cache_dir(bench)
    index = directory / "times.json"
    if index.is_file():
        try:
            times = json.loads(index.read_text())
            if set(times) == set(bench.tasks):
                return GroundTruth(directory, times)
        except ValueError:
            pass  # damaged: recompute
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".tmp-"))
    try:
        times = _compute(bench, sandbox, workers, tmp)
        (tmp / "times.json").write_text(json.dumps(times))
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)  # appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return GroundTruth(directory, times)
