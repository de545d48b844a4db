"""Score one samples file with `xft eval` and with EvalPlus, and compare the verdicts sample by sample.

    python benchmarks/evalplus_parity.py SAMPLES.jsonl --data MbppPlus.jsonl [--dataset mbpp|humaneval]

SAMPLES: `xft eval`'s `samples.jsonl` (or any EvalPlus samples file with a
`solution` per line). Both sides get the same per-input time limits
(`--min-time-limit`, `--time-limit-factor`; generous by default, so machine
load cannot flip a verdict) and score base and plus tests separately; EvalPlus
runs in a subprocess with its data file given by `MBPP_OVERRIDE_PATH` /
`HUMANEVAL_OVERRIDE_PATH` and its cache in a temporary directory. Prints the
pass@1 of each side, every sample whose verdict differs, and one JSON line.
Mbpp/255 is left out: EvalPlus fails its canonical solution under its own
memory limit (tests/test_eval_parity.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

LEFT_OUT = {"Mbpp/255"}


def evalplus_verdicts(samples: list[dict], data: str, dataset: str, min_time: float, factor: float,
                      tmp: str) -> list[dict]:
    """EvalPlus's {"base", "plus"} pass/fail per sample, in `samples`' order."""
    path = os.path.join(tmp, "samples.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"task_id": s["task_id"], "solution": s["solution"]}) + "\n" for s in samples)
    env = {**os.environ, f"{dataset.upper()}_OVERRIDE_PATH": data, "XDG_CACHE_HOME": os.path.join(tmp, "cache")}
    subprocess.run([sys.executable, "-m", "evalplus.evaluate", "--dataset", dataset, "--samples", path,
                    "--parallel", str(os.cpu_count() or 1), "--min_time_limit", str(min_time),
                    "--gt_time_limit_factor", str(factor)], env=env, cwd=tmp, check=True,
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(tmp, "samples_eval_results.json")) as f:
        results = json.load(f)["eval"]
    seen: dict[str, int] = {}
    verdicts = []
    for s in samples:
        k = seen[s["task_id"]] = seen.get(s["task_id"], -1) + 1
        ref = results[s["task_id"]][k]
        verdicts.append({phase: ref[f"{phase}_status"] == "pass" for phase in ("base", "plus")})
    return verdicts


def xft_verdicts(samples: list[dict], data: str, dataset: str, min_time: float, factor: float) -> list[dict]:
    """xft's {"base", "plus"} pass/fail per sample, in `samples`' order."""
    from xft.eval import Sandbox, TimeLimits, check_samples, load_benchmark

    bench = load_benchmark("mbpp+" if dataset == "mbpp" else "humaneval+", data)
    with Sandbox() as sandbox:
        verdicts = check_samples(bench, samples, sandbox,
                                 time_limits=TimeLimits(min_per_input=min_time, factor=factor))
    return [{phase: v.phases[phase]["status"] == "pass" for phase in ("base", "plus")} for v in verdicts]


def main() -> None:
    """Parse the options, score both ways, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", help="samples .jsonl (task_id + solution per line)")
    parser.add_argument("--data", required=True, help="the EvalPlus data file the samples answer")
    parser.add_argument("--dataset", choices=("mbpp", "humaneval"), default="mbpp", help="EvalPlus dataset name")
    parser.add_argument("--min-time-limit", type=float, default=2.0, help="seconds per test input, at least")
    parser.add_argument("--time-limit-factor", type=float, default=20.0,
                        help="times the canonical solution's time per input")
    args = parser.parse_args()
    with open(args.samples) as f:
        samples = [s for s in map(json.loads, f) if s["task_id"] not in LEFT_OUT]
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data.jsonl")  # EvalPlus wants every task of its data file answered
        with open(args.data) as f, open(data, "w") as out:
            out.writelines(line for line in f if json.loads(line)["task_id"] not in LEFT_OUT)
        theirs = evalplus_verdicts(samples, data, args.dataset, args.min_time_limit, args.time_limit_factor, tmp)
        os.environ["XDG_CACHE_HOME"] = os.path.join(tmp, "cache")
        ours = xft_verdicts(samples, data, args.dataset, args.min_time_limit, args.time_limit_factor)
    differ = [(s["task_id"], phase, o[phase], t[phase]) for s, o, t in zip(samples, ours, theirs)
              for phase in ("base", "plus") if o[phase] != t[phase]]
    n = len(samples)
    for side, v in (("xft", ours), ("EvalPlus", theirs)):
        print(f"{side}: base {sum(x['base'] for x in v)}/{n}, base+plus {sum(x['base'] and x['plus'] for x in v)}/{n}")
    for task_id, phase, o, t in differ:
        print(f"differs: {task_id} {phase}: xft {'pass' if o else 'fail'}, EvalPlus {'pass' if t else 'fail'}")
    print(f"{n} samples, {len(differ)} verdicts differ")
    print(json.dumps({"samples": n, "differ": len(differ),
                      "xft": {"base": sum(x["base"] for x in ours),
                              "plus": sum(x["base"] and x["plus"] for x in ours)},
                      "evalplus": {"base": sum(x["base"] for x in theirs),
                                   "plus": sum(x["base"] and x["plus"] for x in theirs)}}))


if __name__ == "__main__":
    main()
