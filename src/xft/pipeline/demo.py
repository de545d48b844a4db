"""`xft demo`: the MiniCode recipe end to end on a CPU, one run directory per seed, then the report.

Budgets (what `--full` changes is listed in FULL, and printed in the report):
* default: recipes/minicode.yaml as shipped, one seed (6.4 minutes measured on 2 idle CPU cores; budget ≤ 10);
* `--full`: more steps and every baseline, 3 seeds, mean ± 95% CI (44.8 minutes measured; budget ≤ 90).

All seeds share one base model (the first run's): the seeds vary the
fine-tuning (data order, router initialisation, router noise), not the
pretrained model, as in the paper where one base model is fine-tuned.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Callable

from xft.pipeline.recipe import METHODS, load_recipe
from xft.pipeline.runner import read_timings, run_pipeline

RECIPE = "minicode"
# The --full budget, as recipe overrides on top of recipes/minicode.yaml.
FULL = ["methods=[" + ", ".join(METHODS) + "]", "train.max_steps=1250", "merge.max_steps=100"]
FULL_SEEDS = 3


def seed_overrides(seed: int, first_run: str | None) -> list[str]:
    """Overrides of one seed's run; later seeds reuse the first run's base model."""
    extra = [f"seed={seed}"]
    if first_run is not None:
        extra.append(f"model={os.path.join(first_run, 'base')}")
    return extra


def run_demo(out: str, seeds: int = 1, full: bool = False, device: str = "cpu",
             log: Callable[[str], None] = print, progress: bool = True,
             extra_overrides: list[str] = (), jobs: int = 1, threads: int | None = None) -> tuple[str, str]:
    """Run the demo into `out`; returns (report.md path, the results table).

    `jobs` / `threads`: stages at once and torch threads per stage (`run_pipeline`).
    """
    from xft.report import write_report

    overrides = (FULL if full else []) + list(extra_overrides)
    t0 = time.perf_counter()
    runs = []
    for i in range(seeds):
        run = os.path.join(out, f"seed-{i}")
        recipe = load_recipe(RECIPE, overrides + seed_overrides(i, runs[0] if runs else None))
        if runs:  # the base model is the first run's; it was evaluated there
            recipe.methods = [m for m in recipe.methods if m != "base"]
        log(f"== seed {i} ({i + 1}/{seeds}): {run}")
        run_pipeline(recipe, run, device=device, progress=progress, log=log, jobs=jobs, threads=threads)
        runs.append(run)
    minutes = (time.perf_counter() - t0) / 60
    stage_minutes = sum(sum(read_timings(r).values()) for r in runs) / 60
    command = "xft demo" + (" --full" if full else "") + (f" --seeds {seeds}" if seeds != (FULL_SEEDS if full
                                                                                          else 1) else "")
    preamble = (f"Command: `{command} --out {out}` (recipe `{RECIPE}`"
                + (f", overrides {' '.join(overrides)}" if overrides else "") + f"), {seeds} seed(s).\n\n"
                f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, device {device}. "
                f"Wall time of this invocation: {minutes:.1f} min; all stages of these runs, over every "
                f"invocation that worked on them: {stage_minutes:.1f} min (timings.json in each run).")
    return write_report(out, runs, "XFT on MiniCode: `xft demo` report", preamble=preamble)
