"""Expected outputs for differential ("io") tests, from the canonical solutions.

As EvalPlus does, each canonical solution is run on every test input (a deep copy)
and its outputs and per-input wall times are recorded; a candidate later gets
`max(1 s, 4 × reference time)` per input. We run the canonical code in the sandbox
too, in parallel, and cache the result per data file under
the xft cache (`xft.artifacts.cache_root()`), `eval/<benchmark>-<data hash>/` (default `~/.cache/xft/eval`):
one JSON file of outputs per task and phase, and `index.json` (the timings and each
file's SHA-256) with `index.mac`, its HMAC under `key` (made once, mode 0600, in a
0700 directory).

Outputs are stored in the plain wire form (`xft.eval.plain`), each either a value or,
when larger than the wire limit (MBPP+'s Mbpp/255: ~1 GB), the digest an identical
output would have. They are decoded only here, in the judge, by the plain decoder
(no pickle), and never sent to the sandbox: the cache directory is hidden inside it
(`Sandbox`), and a cache whose index does not carry a valid MAC, or whose files do not
match it, is recomputed, so one written by a program (e.g. during a run at a weak
level, under another uid) is never trusted. A program that runs as *your* uid
(`rlimits` without root) can read the key: see docs/evaluation.md.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
from pathlib import Path

from xft.artifacts import atomic_dir, cache_root, file_sha256
from xft.errors import UserError
from xft.eval import plain
from xft.eval.benchmarks import Benchmark
from xft.eval.oracles import MBPP_NOT_NONE
from xft.eval.sandbox import Sandbox, wire_inputs

_CACHE_VERSION = 3  # 2: plain wire form, no pickles; 3: values embedded as JSON, authenticated index
_REFERENCE_DEADLINE = 300.0  # seconds per phase for a canonical solution
_PHASES = ("base", "plus")  # always both: one cache serves MBPP and MBPP+


@dataclasses.dataclass
class GroundTruth:
    """Where a benchmark's expected outputs live, and the reference timings."""

    directory: Path
    times: dict  # task_id -> {"base": [seconds per input], "plus": [...]}
    hashes: dict  # file name -> SHA-256 (hex) of its bytes, from the authenticated index

    def wire_bytes(self, task_id: str, phase: str) -> int:
        """Size of the stored expected outputs (their wire text and a few bytes each)."""
        return (self.directory / _file_name(task_id, phase)).stat().st_size

    def outputs(self, task_id: str, phase: str) -> list[tuple[str, object]]:
        """Expected outputs, one ("value", v) or ("digest", hex) per input."""
        name = _file_name(task_id, phase)
        return _load_outputs(self.directory / name, self.hashes.get(name, ""))


@functools.lru_cache(maxsize=8)  # the samples of one task usually run one after another
def _load_outputs(path: Path, sha256: str) -> list[tuple[str, object]]:
    try:
        data = path.read_bytes()
        if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), sha256):
            raise ValueError("its content changed since it was computed")
        entries = json.loads(data)
        return [("digest", e["d"]) if "d" in e else ("value", plain.build(e["v"])) for e in entries]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:  # PlainError is a ValueError
        raise UserError(f"damaged ground-truth cache {path} ({e}); delete it to recompute") from None


def _file_name(task_id: str, phase: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", task_id) + f".{phase}.json"


def cache_dir(bench: Benchmark) -> Path:
    return cache_root() / "eval" / f"{bench.name.rstrip('+')}-{bench.fingerprint}-v{_CACHE_VERSION}"


def _key() -> bytes:
    """The MAC key of this user's ground-truth caches, made on first use: 32 random bytes
    in a file only this uid may read, in a directory only it may enter."""
    root = cache_root() / "eval"
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    path = root / "key"
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    st = path.stat()
    key = path.read_bytes()
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or len(key) != 32:
        raise UserError(f"{path}: not a private 32-byte key of this user; delete it to make a new one")
    return key


def _mac(data: bytes) -> str:
    return hmac.new(_key(), data, hashlib.sha256).hexdigest()


def _seal(directory: Path, times: dict) -> None:
    """Write the index (timings, each output file's hash) and its MAC."""
    hashes = {f.name: file_sha256(f) for f in directory.iterdir() if f.name.endswith(".json")}
    index = json.dumps({"times": times, "files": hashes}).encode()
    (directory / "index.json").write_bytes(index)
    (directory / "index.mac").write_text(_mac(index))


def _open_sealed(directory: Path, tasks) -> GroundTruth | None:
    """The cache in `directory` if its index carries our MAC, covers `tasks` and every file
    still has the hash the index gives it (read once here: a few MB), else None."""
    try:
        index = (directory / "index.json").read_bytes()
        if not hmac.compare_digest((directory / "index.mac").read_text(), _mac(index)):
            return None
        data = json.loads(index)
        times, hashes = data["times"], data["files"]
        if set(times) != set(tasks) or not all(file_sha256(directory / name) == h for name, h in hashes.items()):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return GroundTruth(directory, times, hashes)


def _reference_job(bench: Benchmark, task) -> dict:
    phases = [{"name": p, "inputs": wire_inputs(getattr(task, f"{p}_input")), "deadline": _REFERENCE_DEADLINE}
              for p in _PHASES]
    return {"kind": "reference", "code": task.prompt + task.canonical_solution,
            "entry_point": task.entry_point, "phases": phases,
            "output_not_none": bench.oracle == "mbpp" and task.entry_point in MBPP_NOT_NONE}


def _compute(bench: Benchmark, sandbox: Sandbox, workers: int, directory: Path) -> dict:
    # Trusted code with big outputs (hundreds of MB): room to write them, no memory cap.
    limits = dataclasses.replace(sandbox.limits, file_bytes=-1, memory_bytes=0, scratch_bytes=16 << 30)
    box = Sandbox(sandbox.level, limits, hide=(bench.source,))

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
    """The benchmark's ground truth, computed once per data file and cached; a cache that
    is damaged, unsealed or sealed with another key is computed afresh."""
    directory = cache_dir(bench)
    truth = _open_sealed(directory, bench.tasks)
    if truth is not None:
        return truth
    with atomic_dir(str(directory)) as tmp:  # appears complete or not at all, replacing a damaged one
        times = _compute(bench, sandbox, workers, Path(tmp))
        _seal(Path(tmp), times)
    return _open_sealed(directory, bench.tasks)
