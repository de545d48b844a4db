"""Expected outputs for differential ("io") tests, from the canonical solutions.

As EvalPlus does, each canonical solution is run on every test input (a deep copy)
and its outputs and per-input wall times are recorded; a candidate later gets
`max(1 s, 4 × reference time)` per input. We run the canonical code in the sandbox
too, in parallel, and cache the result per data file under
`$XDG_CACHE_HOME/xft/eval/<benchmark>-<data hash>/` (default `~/.cache/xft/eval`):
`times.json` plus one JSON file of outputs per task and phase.

Outputs are stored in the plain wire form (`xft.eval.plain`), each either a value or,
when larger than the wire limit (MBPP+'s Mbpp/255: ~1 GB), the digest an identical
output would have. They are decoded only here, in the judge, by the plain decoder
(no pickle), and never sent to the sandbox: a program under test cannot read them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import re
from pathlib import Path

from xft.errors import UserError
from xft.eval import plain
from xft.eval.benchmarks import Benchmark
from xft.eval.oracles import MBPP_NOT_NONE
from xft.eval.sandbox import Sandbox

_CACHE_VERSION = 2  # 2: plain wire form, no pickles
_REFERENCE_DEADLINE = 300.0  # seconds per phase for a canonical solution
_PHASES = ("base", "plus")  # always both: one cache serves MBPP and MBPP+


@dataclasses.dataclass
class GroundTruth:
    """Where a benchmark's expected outputs live, and the reference timings."""

    directory: Path
    times: dict  # task_id -> {"base": [seconds per input], "plus": [...]}

    def outputs(self, task_id: str, phase: str) -> list[tuple[str, object]]:
        """Expected outputs, one ("value", v) or ("digest", hex) per input."""
        return _load_outputs(self.directory / _file_name(task_id, phase))


@functools.lru_cache(maxsize=8)  # the samples of one task usually run one after another
def _load_outputs(path: Path) -> list[tuple[str, object]]:
    try:
        entries = json.loads(path.read_text())
        return [("digest", e["d"]) if "d" in e else ("value", plain.decode(e["v"])) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as e:  # PlainError is a ValueError
        raise UserError(f"damaged ground-truth cache {path} ({e}); delete it to recompute") from None


def _file_name(task_id: str, phase: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", task_id) + f".{phase}.json"


def cache_dir(bench: Benchmark) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xft" / "eval"
    return root / f"{bench.name.rstrip('+')}-{bench.fingerprint}-v{_CACHE_VERSION}"


def _reference_job(bench: Benchmark, task) -> dict:
    phases = [{"name": p, "inputs": getattr(task, f"{p}_input"), "deadline": _REFERENCE_DEADLINE}
              for p in _PHASES]
    return {"kind": "reference", "code": task.prompt + task.canonical_solution,
            "entry_point": task.entry_point, "phases": phases,
            "output_not_none": bench.oracle == "mbpp" and task.entry_point in MBPP_NOT_NONE}


def _compute(bench: Benchmark, sandbox: Sandbox, workers: int, directory: Path) -> dict:
    # Trusted code with big outputs (hundreds of MB): room to write them, no memory cap.
    limits = dataclasses.replace(sandbox.limits, file_bytes=-1, memory_bytes=0, scratch_bytes=16 << 30)
    box = Sandbox(sandbox.level, limits)

    def one(task):
        keep = {f"{p}.json": str(directory / _file_name(task.task_id, p)) for p in _PHASES}
        result = box.run(_reference_job(bench, task), deadline=2 * _REFERENCE_DEADLINE + 10, keep=keep)
        phases = (result.verdict or {}).get("phases", {})
        times = {}
        for p in _PHASES:
            report = _last_frame(phases.get(p), result.nonce)
            if "times" not in report or not os.path.isfile(keep[f"{p}.json"]):
                raise UserError(f"{bench.name}: the canonical solution of {task.task_id} fails "
                                f"on its {p} inputs ({report.get('error') or 'no answer'})")
            times[p] = report["times"]
        return task.task_id, times

    with box, concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(one, bench.tasks.values()))


def _last_frame(phase: dict | None, nonce: str) -> dict:
    """The reference run's final report of a phase ({"done", "times"} or {"error"})."""
    try:
        msg = json.loads(phase["frames"][-1])
        return msg if isinstance(msg, dict) and msg.get("n") == nonce else {}
    except (TypeError, KeyError, IndexError, ValueError):
        return {}


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
    from xft.artifacts import atomic_dir

    with atomic_dir(str(directory)) as tmp:  # appears complete or not at all, replacing a damaged one
        times = _compute(bench, sandbox, workers, Path(tmp))
        (Path(tmp) / "times.json").write_text(json.dumps(times))
    return GroundTruth(directory, times)
