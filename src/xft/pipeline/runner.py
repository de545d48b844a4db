"""Run a recipe's stages in order, skipping finished ones and resuming an interrupted one.

    from xft.pipeline import load_recipe, run_pipeline
    run_pipeline(load_recipe("minicode"), "runs/minicode")

The run directory records the recipe it was started with (`recipe.yaml`);
running a recipe with other settings there is a `UserError` listing the
differences (adding methods is allowed: their stages simply run). Stage wall
times accumulate in `timings.json`. Under `accelerate launch` every process
runs the training stages together; the other stages run on the main process
while the rest wait.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import yaml

from xft.errors import UserError
from xft.pipeline.recipe import Recipe, to_dict
from xft.pipeline.stages import Context, Stage, plan
from xft.training import rundir

RECIPE_FILE = "recipe.yaml"
TIMINGS_FILE = "timings.json"
# Recipe keys that do not change what the stages compute.
_NON_SEMANTIC = {"methods", "eval.workers"} | {f"{s}.{k}" for s in ("train", "dense", "ewa", "merge")
                                              for k in rundir.NON_SEMANTIC}


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_run_dir(root: str, recipe: Recipe) -> None:
    """Refuse a run directory started with other settings; record the recipe in a new one."""
    path = os.path.join(root, RECIPE_FILE)
    mine = to_dict(recipe)
    if os.path.isfile(path):
        with open(path) as f:
            saved = yaml.safe_load(f) or {}
        old = {k: v for k, v in _flatten(saved).items() if k not in _NON_SEMANTIC}
        new = {k: v for k, v in _flatten(mine).items() if k not in _NON_SEMANTIC}
        diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)]
        if diff:
            raise UserError(f"{root} holds a run of another recipe ({'; '.join(diff[:4])}"
                            f"{'; ...' if len(diff) > 4 else ''}); choose another --out to run this one")
        saved_methods = saved.get("methods", [])
        if all(m in saved_methods for m in recipe.methods):
            return
        mine = dict(mine, methods=list(dict.fromkeys(saved_methods + recipe.methods)))
    elif os.path.isdir(root) and os.listdir(root):
        raise UserError(f"{root} is not empty and holds no {RECIPE_FILE}; choose a new or empty --out")
    os.makedirs(root, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(mine, f, sort_keys=False)
    os.replace(tmp, path)


def _record_time(root: str, stage: str, seconds: float) -> None:
    path = os.path.join(root, TIMINGS_FILE)
    timings = read_timings(root)
    timings[stage] = round(timings.get(stage, 0.0) + seconds, 2)
    rundir.write_json(path, timings)


def read_timings(root: str) -> dict[str, float]:
    """Stage name -> wall seconds spent on it (over all sessions that worked on it)."""
    try:
        with open(os.path.join(root, TIMINGS_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def run_stage(stage: Stage, ctx: Context) -> None:
    """Run one stage so that its directory appears only complete."""
    out = ctx.path(stage.name)
    if stage.training:
        stage.run(ctx, out)  # xft.train: atomic final/, resumes from out/checkpoints
        return
    with rundir.atomic_dir(out) as tmp:
        stage.run(ctx, tmp)


def run_pipeline(recipe: Recipe, out: str, device: str = "cpu", progress: bool = True,
                 log: Callable[[str], None] | None = None) -> Context:
    """Run every stage the recipe needs into run directory `out`; returns the run's context.

    Finished stages are skipped; an interrupted training stage resumes from
    its last checkpoint. `log` receives one line per stage (None: silent).
    """
    from accelerate import PartialState

    state = PartialState()
    main = state.is_main_process
    say = log if (log and main) else (lambda _: None)
    if main:
        check_run_dir(out, recipe)
    state.wait_for_everyone()
    ctx = Context(recipe=recipe, root=out, device=device, progress=progress and main)
    stages = plan(recipe)
    for i, stage in enumerate(stages, 1):
        head = f"[{i}/{len(stages)}] {stage.name}: {stage.description}"
        if stage.done(ctx):
            say(f"{head} -- finished earlier, skipped")
            continue
        say(f"{head} ...")
        t0 = time.perf_counter()
        if stage.training or main:
            run_stage(stage, ctx)
        state.wait_for_everyone()
        seconds = time.perf_counter() - t0
        if main:
            _record_time(out, stage.name, seconds)
        say(f"{head} -- done in {seconds:.0f} s")
    return ctx
