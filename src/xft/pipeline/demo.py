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
from typing import Callable

from xft.pipeline.methods import PAPER_METHODS
from xft.pipeline.recipe import load_recipe
from xft.pipeline.runner import run_pipeline

RECIPE = "minicode"
# The --full budget, as recipe overrides on top of recipes/minicode.yaml.
FULL = ["methods=[" + ", ".join(PAPER_METHODS) + "]", "train.max_steps=1250", "merge.max_steps=100"]
FULL_SEEDS = 3


def seed_overrides(seed: int, first_run: str | None) -> list[str]:
    """Overrides of one seed's run; later seeds reuse the first run's base model."""
    extra = [f"seed={seed}"]
    if first_run is not None:
        extra.append(f"model={os.path.join(first_run, 'base')}")
    return extra


def run_demo(out: str, seeds: int = 1, full: bool = False, device: str = "cpu",
             log: Callable[[str], None] = print, progress: bool = True,
             extra_overrides: list[str] = (), jobs: int = 1, threads: int | None = None,
             overwrite: bool = False, command: str | None = None) -> tuple[str, str]:
    """Run the demo into `out`; returns (report.md path, the pass@1 summary table).

    `jobs` / `threads`: stages at once and torch threads per stage (`run_pipeline`);
    `overwrite`: start every seed's run over; `command` is recorded for the report.
    """
    from xft.pipeline.report import write_report

    overrides = (FULL if full else []) + list(extra_overrides)
    runs = []
    for i in range(seeds):
        run = os.path.join(out, f"seed-{i}")
        recipe = load_recipe(RECIPE, overrides + seed_overrides(i, runs[0] if runs else None))
        if runs:  # the base model is the first run's; it was evaluated there
            recipe.methods = [m for m in recipe.methods if m != "base"]
        log(f"== seed {i} ({i + 1}/{seeds}): {run}")
        run_pipeline(recipe, run, device=device, progress=progress, log=log, jobs=jobs, threads=threads,
                     overwrite=overwrite, command=command)
        runs.append(run)
    preamble = (f"The MiniCode recipe (`{RECIPE}`"
                + (f", overrides {' '.join(overrides)}" if overrides else "") + f"), {seeds} seed(s): "
                "one run directory per seed (seed-N/), all starting from the first run's base model.")
    return write_report(out, runs, "XFT on MiniCode: `xft demo` report", preamble=preamble)
