"""Wall time of the MiniCode pipeline run stage by stage vs independent stages side by side (`--jobs`).

Runs the same reduced `minicode` recipe (dense SFT, MoE SFT, EWA and their
evaluations, from the shipped base model) three ways, each into a fresh
directory and in its own process:

* `--jobs 1 --threads 2`: one stage at a time on torch's threads (the usual way),
* `--jobs 1 --threads 1`: one stage at a time, one thread,
* `--jobs 2 --threads 1`: `xft demo`'s default, two stages at once, one thread each;

and prints wall times and ratios to the first. The configurations alternate
over `--repeats` rounds and medians are reported (the machine is noisy; only
the ratios mean anything). Every configuration computes the same models
(tests/test_pipeline.py checks that jobs=2 gives jobs=1's outputs).

    python benchmarks/bench_pipeline.py               # ~6 min on 2 idle cores
    python benchmarks/bench_pipeline.py --steps 40 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = {"jobs 1, 2 threads": ["--jobs", "1", "--threads", "2"],
           "jobs 1, 1 thread": ["--jobs", "1", "--threads", "1"],
           "jobs 2, 1 thread each": ["--jobs", "2", "--threads", "1"]}


def run_once(out: str, steps: int, limit: int, flags: list[str]) -> float:
    """Seconds for one `xft run minicode` into the new directory `out`."""
    cmd = [sys.executable, "-m", "xft.cli", "run", "minicode", "--out", out, "--no-progress",
           "--set", "methods=[sft, moe, ewa]", "--set", f"train.max_steps={steps}",
           "--set", "train.save_steps=100000", "--set", f"eval.limit={limit}", *flags]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150, help="training steps of each SFT stage (batch 8)")
    p.add_argument("--limit", type=int, default=100, help="MiniCode problems per evaluation")
    p.add_argument("--repeats", type=int, default=2, help="rounds over the configurations")
    args = p.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, flags in CONFIGS.items():
                out = os.path.join(tmp, f"{r}-{name.replace(' ', '_').replace(',', '')}")
                times[name].append(run_once(out, args.steps, args.limit, flags))
                print(f"round {r + 1}/{args.repeats}  {name:24s} {times[name][-1]:7.1f} s", flush=True)
    base = statistics.median(times["jobs 1, 2 threads"])
    print(f"\nmethods sft, moe, ewa; {args.steps} steps each; {args.limit} eval problems; "
          f"{os.cpu_count()} CPUs; medians of {args.repeats}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:24s} {m:7.1f} s   {m / base:5.2f}x of jobs 1, 2 threads")


if __name__ == "__main__":
    main()
