"""Run a recipe's stages in order, skipping finished ones and resuming an interrupted one.

    from xft.pipeline import load_recipe, run_pipeline
    run_pipeline(load_recipe("minicode"), "runs/minicode")

The run directory records the recipe it was started with (`recipe.yaml`);
running a recipe with other settings there is a `UserError` listing the
differences (adding methods is allowed: their stages simply run). Stage wall
times accumulate in `timings.json`. Under `accelerate launch` every process
runs the training stages together; the other stages run on the main process
while the rest wait.

With `jobs=N > 1` up to N independent stages run at once, each in its own
process (`xft.pipeline.worker`, log in `logs/<stage>.log`). On 2 idle CPU
cores, two one-thread stages side by side take 1.08x the time of one stage
at a time on both threads, and 0.75x of one stage at a time on one thread
(`benchmarks/bench_pipeline.py`); unlike multi-threaded stages they do not
slow down badly when other work shares the cores. Results are the same as
with `jobs=1`: each stage computes from its inputs alone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
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
                 log: Callable[[str], None] | None = None, jobs: int = 1, threads: int | None = None) -> Context:
    """Run every stage the recipe needs into run directory `out`; returns the run's context.

    Finished stages are skipped; an interrupted training stage resumes from
    its last checkpoint. `log` receives one line per stage (None: silent).
    `jobs`: stages run at once, each in its own process with `threads` torch
    threads (default: this process's threads divided among the jobs).
    """
    from accelerate import PartialState

    if jobs < 1:
        raise UserError(f"jobs must be at least 1, got {jobs}")
    state = PartialState()
    if jobs > 1 and state.num_processes > 1:
        raise UserError("--jobs > 1 runs stages in separate processes; under accelerate launch use --jobs 1")
    main = state.is_main_process
    say = log if (log and main) else (lambda _: None)
    if main:
        check_run_dir(out, recipe)
    state.wait_for_everyone()
    ctx = Context(recipe=recipe, root=out, device=device, progress=progress and main)
    stages = plan(recipe)
    if jobs > 1:
        _run_parallel(stages, ctx, say, jobs, threads)
        return ctx
    for i, stage in enumerate(stages, 1):
        head = _headline(i, len(stages), stage)
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


def _headline(i: int, n: int, stage: Stage) -> str:
    """How the log names a stage: "[i/n] name: description"."""
    return f"[{i}/{n}] {stage.name}: {stage.description}"


def _dependents(stages: list[Stage]) -> dict[str, int]:
    """Stage name -> how many planned stages wait on it, directly or not (its scheduling priority)."""
    below: dict[str, set[str]] = {s.name: set() for s in stages}
    for s in reversed(stages):  # plan order puts dependencies first, so dependents are filled in before
        for dep in s.deps:
            if dep in below:
                below[dep] |= {s.name} | below[s.name]
    return {name: len(v) for name, v in below.items()}


def _log_path(root: str, stage: str) -> str:
    return os.path.join(root, "logs", stage.replace("/", "-") + ".log")


_BAR_COUNT = re.compile(r"(\d+)/(\d+) \[")  # "360/800 [" in a tqdm line


def _stage_progress(root: str, stage: str) -> str:
    """"done/total" of the newest progress bar in a running stage's log ("" if it shows none yet)."""
    try:
        with open(_log_path(root, stage), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 2048))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    found = _BAR_COUNT.findall(tail)
    return f"{found[-1][0]}/{found[-1][1]}" if found else ""


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _run_parallel(stages: list[Stage], ctx: Context, say: Callable[[str], None], jobs: int,
                  threads: int | None) -> None:
    """Run `stages` (in plan order) as up to `jobs` worker processes, each once its dependencies are done."""
    import torch
    from tqdm.auto import tqdm

    threads = threads or max(1, torch.get_num_threads() // jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    priority = _dependents(stages)
    number = {s.name: i for i, s in enumerate(stages, 1)}
    head = {s.name: _headline(number[s.name], len(stages), s) for s in stages}
    finished = {s.name for s in stages if s.done(ctx)}
    for name in sorted(finished, key=number.get):
        say(f"{head[name]} -- finished earlier, skipped")
    pending = [s for s in stages if s.name not in finished]
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    failed: list[tuple[str, int]] = []
    os.makedirs(os.path.join(ctx.root, "logs"), exist_ok=True)
    bar = tqdm(total=len(pending), desc="stages", unit="stage", disable=not ctx.progress, dynamic_ncols=True)
    shown, shown_for, shown_at = "", [], 0.0

    def note(line: str) -> None:
        with tqdm.external_write_mode():
            say(line)

    try:
        while pending or running:
            ready = [s for s in pending if all(d in finished for d in s.deps)]
            while ready and len(running) < jobs and not failed:
                stage = max(ready, key=lambda s: (priority[s.name], -number[s.name]))
                ready.remove(stage)
                pending.remove(stage)
                cmd = [sys.executable, "-m", "xft.pipeline.worker", ctx.root, stage.name, "--device", ctx.device,
                       "--threads", str(threads)] + (["--progress"] if ctx.progress else [])
                with open(_log_path(ctx.root, stage.name), "a") as logf:
                    running[stage.name] = (subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env),
                                           time.perf_counter())
                note(f"{head[stage.name]} ... (log: {_log_path(ctx.root, stage.name)})")
            if not running:
                if failed or not pending:
                    break
                raise RuntimeError(f"stages {[s.name for s in pending]} wait on stages that never run")
            if ctx.progress and (set(running) != set(shown_for) or time.monotonic() - shown_at > 2.0):
                # the running stages and their own bars' counts; redrawn on a new stage or every 2 s at most,
                # so that a log without a tty stays short
                status = ", ".join(f"{name} {_stage_progress(ctx.root, name)}".strip() for name in running)
                shown_for, shown_at = list(running), time.monotonic()
                if status != shown:
                    shown = status
                    bar.set_postfix_str(shown)
            time.sleep(0.2)
            for name, (proc, t0) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[name]
                seconds = time.perf_counter() - t0
                if rc != 0:
                    failed.append((name, rc))
                    note(f"{head[name]} -- FAILED (exit {rc}) after {seconds:.0f} s")
                    continue
                finished.add(name)
                _record_time(ctx.root, name, seconds)
                bar.update(1)
                note(f"{head[name]} -- done in {seconds:.0f} s")
    except BaseException:  # Ctrl-C or a bug here: leave no orphaned workers behind
        for proc, _ in running.values():
            proc.terminate()
        for proc, _ in running.values():
            proc.wait()
        raise
    finally:
        bar.close()
    if failed:
        name, rc = failed[0]
        path = _log_path(ctx.root, name)
        raise UserError(f"stage {name} failed (exit {rc}); re-running the same command resumes it. "
                        f"Last lines of {path}:\n{_tail(path)}")
