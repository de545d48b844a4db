"""`xft demo --study`: a seed-paired study in which every method gets the same tuning.

    run_study("minicode-study", "runs/study", jobs=2)   # tune, then every method × seed; writes study.json

The protocol is the recipe's `study` section (`StudySection`):

1. **Tuning, on validation only.** Every training method of the recipe (dense
   SFT, MoE, EWA, the routing ablations) is trained once per learning rate of
   `study.lr`, with the tuning seed `study.tune_seed` (never one of the study's
   seeds), and scored by greedy pass@1 on `study.select` (MiniCode's
   validation split, disjoint from eval). The learned merge is tuned the same
   way over `study.merge_lr`, on the MoE trained at the MoE's chosen learning
   rate; so is every merge with an option (`Method.tune` over the study list
   `Method.study_grid`: TIES's density, task arithmetic's scale, the
   distillation's rate). Each method keeps its best value (ties: the lower one).
   When some method scores strictly best at an end of the grid, the grid
   grows by one step at that end for every method (at most `study.extend`
   times).
2. **The study.** Every method of the recipe, with its chosen learning rate,
   on seeds 0 .. `study.seeds`-1 (one run directory per seed, `seed-N/`),
   evaluated on the recipe's benchmarks. Methods are paired by seed.

Every run is an ordinary `xft run` of the recipe with `--set` overrides, one
process on one thread, `jobs` at a time; the command of each is recorded, so
any (method, seed) re-runs alone (`xft run ... --set methods=[moe]`) and
computes the same model and pass@1. Re-running the study skips what is
finished. `study.json` holds the protocol, the tuning scores and choices,
per-seed pass@1 (and per-task verdicts), the training diagnostics of every
run, each merge's merge gap (`study_data.merge_gaps`), and the commit,
command, machine and wall time; `xft report --study` turns it into tables.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from xft.artifacts import atomic_write_json
from xft.errors import UserError
from xft.pipeline.methods import METHODS
from xft.pipeline.recipe import Recipe, load_recipe, to_dict
from xft.pipeline.report import eval_results
from xft.pipeline.scheduler import Job, read_sessions, record_session, run_jobs, thread_env
from xft.study.collect import collect_study

STUDY_RECIPE = "minicode-study"  # the bundled recipe whose `study` section is the protocol
STUDY_FILE = "study.json"
TUNE_DIR = "tune"


@dataclass
class Run:
    """One `xft run` of the study: its directory and the overrides it adds to the study recipe."""

    out: str
    overrides: list[str]
    what: str  # one line for the log
    cost: float = 1.0  # relative cost, to start the longest runs first

    def command(self, recipe: str, user: list[str]) -> list[str]:
        """The `xft run` command line that computes this run (how a user re-runs it)."""
        sets = [w for o in [*user, *self.overrides] for w in ("--set", o)]
        return ["xft", "run", recipe, "--out", self.out, *sets, "--threads", "1", "--jobs", "1"]


@dataclass
class Study:
    """The runs of one study and where they live."""

    recipe_name: str
    recipe: Recipe
    out: str
    user: list[str] = field(default_factory=list)  # the user's own --set overrides, applied to every run

    @property
    def tuned_methods(self) -> list[str]:
        """The recipe's methods that train from the base model (their learning rate is tuned)."""
        return [m for m in self.recipe.methods if METHODS[m].kind == "sft"]

    @property
    def tuned_merges(self) -> list[str]:
        """The recipe's merges that learn or take a tuned option (`Method.tuned`), in table order, one per recipe
        section: a learned merge of another MoE (xft_drop, ...) shares XFT's `merge` section and its learning
        rate."""
        sections, out = set(), []
        for name in [m for m in METHODS if m in self.recipe.methods]:
            m = METHODS[name]
            if m.kind == "merge" and m.tuned and m.section not in sections:
                sections.add(m.section)
                out.append(name)
        return out

    def grid(self, method: str) -> list[float]:
        """The study grid of `method`'s tuned setting (`Method.tune`, its values `Method.study_grid`)."""
        return sorted(getattr(self.recipe.study, METHODS[method].study_grid))

    def tune_run(self, method: str, lr: float) -> Run:
        m = METHODS[method]
        s = self.recipe.study
        cost = 2.5 if m.routing else 1.0  # an MoE step costs several dense steps: start those first
        return Run(os.path.join(self.out, TUNE_DIR, method, f"lr-{lr:g}"),
                   [f"seed={s.tune_seed}", f"methods=[{method}]", f"{m.section}.lr={lr!r}",
                    f"eval.benchmarks=[{s.select}]"], f"tune {method} at lr {lr:g}", cost)

    def merge_tune_run(self, method: str, moe_lr: float, lr: float, earlier: dict[str, float]) -> Run:
        """A tuning run of a merge at `lr` (the value of its tuned setting), merging its MoE trained at `moe_lr`,
        with the choices of the merges tuned before it (`earlier`: method -> value; xft_distill learns XFT's
        merge first)."""
        m = METHODS[method]
        moe = self.tune_run(m.merge_of, moe_lr)
        label = "lr" if m.tune.endswith("lr") else m.tune
        return Run(os.path.join(self.out, TUNE_DIR, method, f"moe-lr-{moe_lr:g}", f"{label}-{lr:g}"),
                   [o for o in moe.overrides if not o.startswith("methods=")] + _settings(earlier)
                   + [f"methods=[{method}]", f"{m.section}.{m.tune}={lr!r}"],
                   f"tune {method} at {m.tune} {lr:g}", 0.3)

    def seed_run(self, seed: int, chosen: dict[str, float]) -> Run:
        methods = [m for m in self.recipe.methods if seed == 0 or m != "base"]  # the base model: once
        lrs = _settings(chosen)
        return Run(os.path.join(self.out, f"seed-{seed}"), [f"seed={seed}", f"methods=[{', '.join(methods)}]", *lrs],
                   f"seed {seed}: {len(methods)} methods", 10.0)


def _settings(chosen: dict[str, float]) -> list[str]:
    """The `--set` overrides that give each method its chosen value: `<section>.<tuned setting>=value`."""
    return [f"{METHODS[m].section}.{METHODS[m].tune}={v!r}" for m, v in chosen.items()]


def _pass_at_1(run_dir: str, method: str, benchmark: str) -> float | None:
    """`method`'s pass@1 on `benchmark` in run `run_dir` (None if not evaluated)."""
    return (eval_results(run_dir, method, benchmark) or {}).get("pass@1")


def choose(scores: dict[float, float]) -> float:
    """The learning rate with the highest validation score; ties go to the lower learning rate."""
    return max(sorted(scores), key=lambda lr: (scores[lr], -lr))


def extend_grid(grid: list[float], scores: list[dict[float, float]], upper: float | None = None) -> list[float]:
    """`grid` (sorted) with one more point, at its geometric step, beyond each end where some method scored
    strictly best (`scores`: per method, learning rate -> validation score); never above `upper`.

    A best value at the end of the grid may not be the best value: the grid
    grows there, for every method alike (same grid, same budget). A method
    that scores the same everywhere does not grow it.
    """
    def best_at(end: float, inner: float) -> bool:
        return any(choose(s) == end and s[end] > s[inner] for s in scores)

    if len(grid) < 2:
        return list(grid)
    step = grid[1] / grid[0]
    low = [grid[0] / step] if best_at(grid[0], grid[1]) else []
    high = [grid[-1] * step] if best_at(grid[-1], grid[-2]) and (upper is None or grid[-1] * step <= upper) else []
    return low + list(grid) + high


def _seed_merge_run(src: str, dst: str, recipe: Recipe) -> None:
    """Give the merge-tuning run `dst` the trained MoE of tuning run `src` (hard links), with `recipe` recorded.

    Correct because the stages copied (base, data, upcycle, the MoE) depend
    only on settings the two recipes share: they differ in `methods` and the
    merge's own settings.
    """
    import shutil

    import yaml

    from xft.artifacts import atomic_write_text
    from xft.pipeline.runner import RECIPE_FILE
    from xft.pipeline.stages import plan

    if os.path.isfile(os.path.join(dst, RECIPE_FILE)):
        return
    os.makedirs(dst, exist_ok=True)
    copied = [s.name for s in plan(recipe) if s.name not in recipe.methods and not s.name.startswith("eval/")]
    for stage in copied:  # everything the merge stage depends on: base, data, the upcycle, the trained MoE
        if os.path.isdir(os.path.join(src, stage)):
            shutil.copytree(os.path.join(src, stage), os.path.join(dst, stage), copy_function=os.link,
                            ignore=shutil.ignore_patterns("checkpoint-*"))
    atomic_write_text(os.path.join(dst, RECIPE_FILE), yaml.safe_dump(to_dict(recipe), sort_keys=False))


def run_study(recipe_name: str, out: str, overrides: list[str] = (), jobs: int = 2,
              log: Callable[[str], None] = print, command: str | None = None) -> dict:
    """Tune every method on validation, run every method × seed, write `out/study.json`; returns its contents."""
    recipe = load_recipe(recipe_name, list(overrides))
    s = recipe.study
    if s.select in recipe.eval.benchmarks:
        raise UserError(f"study.select: {s.select} is also in eval.benchmarks; the study chooses on validation "
                        "data that it never reports (--set study.select=minicode-valid)")
    if s.seeds < 2:
        raise UserError(f"study.seeds: a paired interval needs at least 2 seeds, got {s.seeds}")
    study = Study(recipe_name, recipe, out, list(overrides))
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    pool = _Pool(study, jobs, log)

    # 1. tuning: every (method, lr), longest first; the merge grid once the MoE's choice is known
    grid = sorted(s.lr)
    for _ in range(s.extend + 1):
        tune = {m: {lr: study.tune_run(m, lr) for lr in grid} for m in study.tuned_methods}
        pool.run([r for runs in tune.values() for r in runs.values()])
        scores = {m: {lr: _pass_at_1(r.out, m, s.select) for lr, r in runs.items()} for m, runs in tune.items()}
        chosen = {m: choose(v) for m, v in scores.items()}
        grid, wider = extend_grid(grid, list(scores.values())), grid
        if grid == wider:
            break
        log(f"a choice at the end of the grid: every method also tries {sorted(set(grid) - set(wider))}")
    merge_runs: dict[str, dict[float, Run]] = {}
    for method in study.tuned_merges:
        source = METHODS[method].merge_of
        if source not in chosen:
            raise UserError(f"methods: {method} merges {source}, which the study's methods must include")
        grid, earlier = study.grid(method), {m: chosen[m] for m in merge_runs}
        for _ in range(s.extend + 1):
            runs = merge_runs.setdefault(method, {})
            for lr in grid:
                run = runs[lr] = study.merge_tune_run(method, chosen[source], lr, earlier)
                _seed_merge_run(tune[source][chosen[source]].out, run.out,
                                load_recipe(recipe_name, study.user + run.overrides))
            pool.run(list(runs.values()))
            merge_scores = {lr: _pass_at_1(r.out, method, s.select) for lr, r in runs.items()}
            chosen[method] = choose(merge_scores)
            grid, wider = extend_grid(grid, [merge_scores], METHODS[method].tune_max), grid
            if grid == wider:
                break
    log("chosen on validation: " + ", ".join(f"{m} {METHODS[m].tune} {v:g}" for m, v in chosen.items()))

    # 2. the study: every method on every seed, with its chosen learning rate
    seeds = [study.seed_run(i, chosen) for i in range(s.seeds)]
    pool.run(seeds)
    if pool.ran:
        record_session(out, command, time.time() - t0, pool.ran)
    wall = sum(x["seconds"] for x in read_sessions(out))
    data = collect_study(study, tune, merge_runs, chosen, seeds, wall_seconds=wall, command=command, jobs=jobs)
    atomic_write_json(os.path.join(out, STUDY_FILE), data)
    return data


class _Pool:
    """Runs the study's `xft run` processes through the pipeline's scheduler, `jobs` at a time, one thread each."""

    def __init__(self, study: Study, jobs: int, log: Callable[[str], None]):
        self.study, self.jobs, self.log = study, jobs, log
        self.ran: list[str] = []  # runs this invocation computed something in (the others were finished)

    def finished(self, run: Run) -> bool:
        """Whether `run` already holds every stage of its recipe, computed with these very settings."""
        from xft.pipeline.runner import finished_work, recipe_differences, saved_recipe
        from xft.pipeline.stages import Context, plan

        saved = saved_recipe(run.out)
        if saved is None:
            return False
        recipe = load_recipe(self.study.recipe_name, self.study.user + run.overrides)
        training, evaluation = recipe_differences(saved, recipe, finished_work(run.out))
        ctx = Context(recipe=recipe, root=run.out, progress=False)
        return not training and not evaluation and all(stage.done(ctx) for stage in plan(recipe))

    def run(self, runs: list[Run]) -> None:
        """Run the unfinished ones of `runs` (longest first) and wait for all; raises on the first failure."""
        todo = [self._job(r) for r in runs if not self.finished(r)]
        self.log(f"{len(runs)} run(s), {len(runs) - len(todo)} finished earlier, {self.jobs} at a time: "
                 + "; ".join(r.what for r in runs[:3]) + ("; ..." if len(runs) > 3 else ""))
        self.ran += [j.name for j in todo]
        run_jobs(todo, self.jobs, self.log)

    def _job(self, run: Run) -> Job:
        cmd = run.command(self.study.recipe_name, self.study.user)
        name = os.path.relpath(run.out, self.study.out).replace(os.sep, "-")
        return Job(name, [sys.executable, "-m", "xft.cli", *cmd[1:], "--no-progress", "--no-report"],
                   os.path.join(self.study.out, "logs", f"{name}.log"), priority=run.cost, env=thread_env(1),
                   header=f"$ {shlex.join(cmd)}", title=run.what, noun="study run")
