"""Run a recipe's stages in order, skipping finished ones and resuming an interrupted one.

    from xft.pipeline import load_recipe, run_pipeline
    run_pipeline(load_recipe("minicode"), "runs/minicode")

Before anything is created, the recipe's inputs (base model, data, every
benchmark's data, every stage's settings) are checked (`preflight`). The run
directory records the recipe it was started with (`recipe.yaml`). Running
another recipe there: added methods simply run; changed `eval.*` settings
re-run the evaluations they change and keep the training stages; changed
training settings are a `UserError` listing the differences, unless no stage
has finished or checkpointed yet (the run restarts) or `overwrite` is set
(what xft wrote there is deleted). Stage wall times accumulate in
`timings.json`; every invocation that ran stages is listed in
`sessions.json` (command, device, wall time) for the report. Under
`accelerate launch` every process runs the training stages together; the
other stages run on the main process while the rest wait.

With `jobs=N > 1` up to N independent stages run at once, each in its own
process (`xft.pipeline.worker`, log in `logs/<stage>.log`). On 2 idle CPU
cores, two one-thread stages side by side take 1.08x the time of one stage
at a time on both threads, and 0.75x of one stage at a time on one thread
(`benchmarks/bench_pipeline.py`); unlike multi-threaded stages they do not
slow down badly when other work shares the cores. Results are the same as
with `jobs=1`: each stage computes from its inputs alone.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Callable

import yaml

from xft.artifacts import atomic_dir, atomic_write_text, settings_diff
from xft.errors import UserError
from xft.pipeline.recipe import LAYERS, METHODS, Recipe, StudySection, to_dict
from xft.pipeline.stages import Context, Stage, all_stages, plan
from xft.pipeline.scheduler import (SESSIONS_FILE, TIMINGS_FILE, Job, record_session, record_time, run_jobs,
                                    thread_env)
from xft.training import rundir

RECIPE_FILE = "recipe.yaml"
# Recipe keys that do not change what the stages compute.
_NON_SEMANTIC = {"methods", "eval.workers"} | {f"{s}.{k}" for s in LAYERS if s != "upcycle"
                                              for k in rundir.NON_SEMANTIC} | {
    f"study.{f.name}" for f in dataclasses.fields(StudySection)}  # the protocol around the runs, not a run
# What xft writes at the top of a run directory besides the stage directories (all deleted by overwrite).
_BOOKKEEPING = (RECIPE_FILE, TIMINGS_FILE, SESSIONS_FILE, "logs", "report.md", "report.json", "plots")


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; empty sections and None values are dropped (None, {} and a
    missing key all mean "the default")."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif v is not None:
            out[f"{prefix}{k}"] = v
    return out


def recipe_differences(saved: dict, recipe: Recipe, work: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(training differences, evaluation-only differences) between a run's saved recipe and `recipe`.

    Each is a list of "key: old -> new". Evaluation settings (`eval.*`) change
    only the evaluation stages, which re-run where their settings changed.
    Given the run's stages with `work` (`finished_work`), a setting read only
    by methods with no work there yet is no difference: a method added to a
    run brings its own settings (a study's chosen `ties.merge_density`).
    """
    diff = settings_diff(_flatten(saved), _flatten(to_dict(recipe)), _NON_SEMANTIC)
    training = [d for k, d in diff.items() if not k.startswith("eval.")
                and (work is None or not _unread(k.split(".", 1)[0], work))]
    return training, [d for k, d in diff.items() if k.startswith("eval.")]


def _unread(section: str, work: list[str]) -> bool:
    """Whether recipe section `section` is read only by methods whose stages hold no work yet (`work`): a method
    section (`moe`, `ties`, ...) or one that only method sections inherit (`merge` under `distill`, `ties`)."""
    def chain(name: str) -> list[str]:
        return [name, *chain(LAYERS[name].inherits)] if LAYERS[name].inherits else [name]

    readers = [m.name for m in METHODS.values() if section in chain(m.section)]
    return bool(readers) and not any(name in work for name in readers)


def _every_stage() -> dict[str, Stage]:
    """Every stage any recipe could run, by name: the directories a run directory can hold."""
    return all_stages(Recipe(methods=list(METHODS)))


def finished_work(root: str) -> list[str]:
    """Stage directories of `root` that hold work: a finished stage or a training checkpoint to resume."""
    work = []
    for name, stage in _every_stage().items():
        path = os.path.join(root, name)
        run = rundir.RunDir(path)
        if (run.is_finished() or run.last_checkpoint()) if stage.training else os.path.isdir(path):
            work.append(name)
    return work


def clear_run_dir(root: str) -> None:
    """Delete what xft wrote in run directory `root` (stage directories, their temporaries, bookkeeping)."""
    import shutil

    for path in [os.path.join(root, name) for name in [*_every_stage(), *_BOOKKEEPING]]:
        parent, base = os.path.split(path)
        leftovers = [os.path.join(parent, n) for n in (os.listdir(parent) if os.path.isdir(parent) else [])
                     if n.startswith((f".{base}.tmp-", f".{base}.old-"))]  # atomic_dir's temporaries
        for p in [path] + leftovers:
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    eval_dir = os.path.join(root, "eval")
    if os.path.isdir(eval_dir) and not os.listdir(eval_dir):
        os.rmdir(eval_dir)


def saved_recipe(root: str) -> dict | None:
    """The recipe mapping recorded in run directory `root` (None without a readable one)."""
    try:
        with open(os.path.join(root, RECIPE_FILE)) as f:
            return yaml.safe_load(f) or {}
    except (OSError, ValueError):
        return None


def check_run_dir(root: str, recipe: Recipe, overwrite: bool = False) -> list[str]:
    """Prepare run directory `root` for `recipe` and record the recipe there; returns eval-only changes.

    A run of the same training settings continues (methods may be added,
    evaluation settings changed). Other training settings are a UserError,
    unless no stage has finished or checkpointed yet (the directory is
    restarted) or `overwrite` is set (everything xft wrote there is deleted).
    A non-empty directory without a recipe file is never touched.
    """
    path = os.path.join(root, RECIPE_FILE)
    mine = to_dict(recipe)
    eval_changes: list[str] = []
    if os.path.isfile(path):
        with open(path) as f:
            saved = yaml.safe_load(f) or {}
        work = finished_work(root)
        training, eval_changes = recipe_differences(saved, recipe, work)
        if overwrite or (training and not work):
            clear_run_dir(root)  # with no work to keep, a changed recipe starts over (a stage that failed early)
            eval_changes = []
        elif training and work:
            raise UserError(f"{root} holds a run of another recipe ({'; '.join(training[:4])}"
                            f"{'; ...' if len(training) > 4 else ''}) with {len(work)} finished or started "
                            f"stage(s); pass --overwrite to delete them and start over, or choose another --out")
        elif not training:
            mine = dict(mine, methods=list(dict.fromkeys(saved.get("methods", []) + recipe.methods)))
    elif os.path.isdir(root) and os.listdir(root):
        raise UserError(f"{root} is not empty and holds no {RECIPE_FILE}; choose a new or empty --out")
    os.makedirs(root, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(mine, sort_keys=False))
    return eval_changes


def run_stage(stage: Stage, ctx: Context) -> None:
    """Run one stage so that its directory appears only complete."""
    out = ctx.path(stage.name)
    if stage.training:
        stage.run(ctx, out)  # xft.training: the model appears in out whole, resumes from out/checkpoint-N
        return
    with atomic_dir(out) as tmp:
        stage.run(ctx, tmp)


def run_pipeline(recipe: Recipe, out: str, device: str = "cpu", progress: bool = True,
                 log: Callable[[str], None] | None = None, jobs: int = 1, threads: int | None = None,
                 overwrite: bool = False, command: str | None = None) -> Context:
    """Run every stage the recipe needs into run directory `out`; returns the run's context.

    The recipe's inputs are checked first (`preflight.check_inputs`), before
    `out` is created. Finished stages are skipped; an interrupted training
    stage resumes from its last checkpoint. `log` receives one line per stage
    (None: silent). `jobs`: stages run at once, each in its own process with
    `threads` torch threads (default: this process's threads divided among
    the jobs). `overwrite`: delete what xft wrote in `out` and start over.
    `command` is recorded in sessions.json for the report.
    """
    from accelerate import PartialState

    from xft.pipeline.preflight import check_inputs

    if jobs < 1:
        raise UserError(f"jobs must be at least 1, got {jobs}")
    state = PartialState()
    if jobs > 1 and state.num_processes > 1:
        raise UserError("--jobs > 1 runs stages in separate processes; under accelerate launch use --jobs 1")
    main = state.is_main_process
    say = log if (log and main) else (lambda _: None)
    t0, ran = time.perf_counter(), []
    if main:
        check_inputs(recipe)
        changed = check_run_dir(out, recipe, overwrite)
        if changed:
            say(f"evaluation settings changed ({'; '.join(changed)}): finished training stages are kept, "
                "evaluations re-run where their settings changed")
    state.wait_for_everyone()
    ctx = Context(recipe=recipe, root=out, device=device, progress=progress and main)
    stages = plan(recipe)
    try:
        if jobs > 1:
            _run_parallel(stages, ctx, say, jobs, threads, ran)
        else:
            _run_sequential(stages, ctx, say, state, ran)
    finally:
        if main and ran:
            record_session(out, command, time.perf_counter() - t0, ran, device)
    return ctx


def _run_sequential(stages: list[Stage], ctx: Context, say: Callable[[str], None], state, ran: list[str]) -> None:
    """Run `stages` one after the other in this process (all processes for training stages)."""
    for i, stage in enumerate(stages, 1):
        head = _headline(i, len(stages), stage)
        if stage.done(ctx):
            say(f"{head} -- finished earlier, skipped")
            continue
        say(f"{head} ...")
        ran.append(stage.name)
        t0 = time.perf_counter()
        if stage.training or state.is_main_process:
            run_stage(stage, ctx)
        state.wait_for_everyone()
        seconds = time.perf_counter() - t0
        if state.is_main_process:
            record_time(ctx.root, stage.name, seconds)
        say(f"{head} -- done in {seconds:.0f} s")


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


def _run_parallel(stages: list[Stage], ctx: Context, say: Callable[[str], None], jobs: int,
                  threads: int | None, ran: list[str]) -> None:
    """Run `stages` (in plan order) as up to `jobs` worker processes, each once its dependencies are done.

    Appends the name of every stage it starts to `ran`.
    """
    import torch

    threads = threads or max(1, torch.get_num_threads() // jobs)
    priority = _dependents(stages)
    todo = []
    for i, stage in enumerate(stages, 1):
        head = _headline(i, len(stages), stage)
        if stage.done(ctx):
            say(f"{head} -- finished earlier, skipped")
            continue
        argv = [sys.executable, "-m", "xft.pipeline.worker", ctx.root, stage.name, "--device", ctx.device,
                "--threads", str(threads)] + (["--progress"] if ctx.progress else [])
        todo.append(Job(stage.name, argv, _log_path(ctx.root, stage.name), deps=tuple(stage.deps),
                        priority=priority[stage.name], env=thread_env(threads), title=head, noun="stage"))
    ran.extend(j.name for j in todo)
    run_jobs(todo, jobs, say, progress=ctx.progress, on_done=lambda job, seconds: record_time(ctx.root, job.name,
                                                                                                seconds))
