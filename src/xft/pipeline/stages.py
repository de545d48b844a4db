"""The experiment's stages: what each one needs, what it runs, where its artifact goes.

Every stage owns one directory under the run directory, named after the stage:

    base/                    MiniCode base model (when the recipe says model: minicode)
    data/train.jsonl         MiniCode instruction data (when data.path: minicode)
    upcycle/, upcycle-sparse/, upcycle-unnormalized/    upcycled MoEs, untrained
    sft/, moe/, ewa/, sparse/, unnormalized/             training runs: each is its model (xft.training)
    xft/, xft_init/, xft_uniform/                        merge runs: each is its dense model
    eval/<method>/<benchmark>/results.json              evaluation of each method's model (+ eval_settings.json)

Which training, merge and upcycle stages exist, what each depends on and how
its config is built follow from the method table (`xft.pipeline.methods`): one
training stage per method, named after it.

A stage is finished when its directory holds a finished artifact: the
training stages use `xft.training.rundir` (the model's config.json appears last and
re-running resumes from the last checkpoint); the other stages write into a
temporary sibling and rename it into place, so an interrupted stage leaves
nothing that looks finished. An evaluation stage is finished only while every
benchmark's results were computed with the recipe's current `eval` settings
(`eval_settings.json`): changing them re-runs just the evaluations they
change. Each training stage's config is built by `config(ctx, out)`, so it
can be validated before anything runs (`xft.pipeline.preflight`).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Callable

from xft.artifacts import atomic_write_json, read_json, resolve_model
from xft.pipeline.methods import METHODS, UPCYCLE_STAGES, Method
from xft.pipeline.recipe import Recipe, section_settings, upcycle_config
from xft.training import rundir

MINICODE_SEED = 0  # MiniCode's published splits; its train/eval leakage rules hold within one seed


@dataclass
class Context:
    """What stages share: the recipe, the run directory, the device for evaluation."""

    recipe: Recipe
    root: str
    device: str = "cpu"
    progress: bool = True

    def path(self, stage: str) -> str:
        return os.path.join(self.root, stage)


@dataclass
class Stage:
    """One step of the experiment. `run(ctx, out)` writes the artifact into directory `out`.

    `training`: `out` is an `xft.train` run directory (the training code makes it
    atomic and resumable); otherwise `out` is a temporary directory renamed into
    place when `run` returns.
    """

    name: str
    deps: tuple[str, ...]
    run: Callable[[Context, str], None]
    description: str
    training: bool = False
    finished: Callable[[Context, str], bool] | None = None  # done(ctx) beyond "its directory exists"
    config: Callable[[Context, str], object] | None = None  # training: its SFTConfig / MergeConfig

    def done(self, ctx: Context) -> bool:
        path = ctx.path(self.name)
        if self.training:
            return rundir.RunDir(path).is_finished()
        if self.finished is not None:
            return os.path.isdir(path) and self.finished(ctx, path)
        return os.path.isdir(path)


# ---------------------------------------------------------------- where artifacts are

def base_model(ctx: Context) -> str:
    """The base model's directory (or Hub id)."""
    if ctx.recipe.model == "minicode":
        return ctx.path("base")
    return resolve_model(ctx.recipe.model)


def train_data(ctx: Context) -> str:
    """The instruction data file."""
    if ctx.recipe.data.path == "minicode":
        return os.path.join(ctx.path("data"), "train.jsonl")
    return ctx.recipe.data.path


def benchmark_data(recipe: Recipe, bench: str) -> str | None:
    """The data file of benchmark `bench` from `eval.data` (None: the benchmark's own data).

    MBPP is scored on MBPP+'s tasks with their base tests only, so it reads the
    MBPP+ file when `eval.data` names only that one.
    """
    data = recipe.eval.data
    return data.get(bench) or (data.get("mbpp+") if bench == "mbpp" else None)


def model_of(ctx: Context, method: str) -> str:
    """The model directory a method produces: its stage's directory (`xft.training.rundir`)."""
    return base_model(ctx) if method == "base" else ctx.path(method)


# ---------------------------------------------------------------- stage bodies

def _build_base(ctx: Context, out: str) -> None:
    """Build (or take from the cache) MiniCode's base model and copy it into the stage directory."""
    import shutil

    from xft.minicode.base import build_base_model, resolve_budget, with_steps

    b = ctx.recipe.base
    budget = with_steps(b.budget, b.steps) if b.steps is not None else resolve_budget(b.budget)
    cached = build_base_model(None, seed=b.seed, budget=budget, progress=ctx.progress)
    shutil.copytree(cached, out, dirs_exist_ok=True)


def _write_data(ctx: Context, out: str) -> None:
    from xft.minicode.benchmark import split_records

    with open(os.path.join(out, "train.jsonl"), "w") as f:
        for record in split_records("train", MINICODE_SEED, ctx.recipe.data.size):
            f.write(json.dumps(record) + "\n")


def _upcycler(settings: dict):
    """An upcycle stage: the base model upcycled with the recipe's `upcycle` section and `settings` on top."""
    def run(ctx: Context, out: str) -> None:
        from xft.checkpoint import upcycle_checkpoint

        upcycle_checkpoint(base_model(ctx), out, upcycle_config(ctx.recipe, settings))
    return run


def _settings(ctx: Context, section: str | None) -> dict:
    """A stage's flat settings: the recipe's seed and precision, then its section (with what that inherits)."""
    merged = {"seed": ctx.recipe.seed, "precision": ctx.recipe.precision, "progress": ctx.progress}
    return {**merged, **(section_settings(ctx.recipe, section) if section else {})}


def sft_config(ctx: Context, out: str, source: Callable[[Context], str], method: Method):
    """The `SFTConfig` of `method`'s instruction-tuning stage (ConfigError on a bad value)."""
    from xft.config import SFTConfig, from_flat

    r = ctx.recipe
    return from_flat(SFTConfig, {**_settings(ctx, method.section), "model": source(ctx), "data": train_data(ctx),
                                 "out": out, "ewa_share_rate": r.ewa["share_rate"] if method.ewa else 0.0})


def merge_config(ctx: Context, out: str, method: Method):
    """The `MergeConfig` of `method`'s merge stage (ConfigError on a bad value).

    A merge that trains takes its section with what it inherits (`merge`:
    `train`'s settings less the merge's own schedule, `recipe.LAYERS`); a
    fixed merge trains nothing and takes the `merge` section's own settings,
    then its own section's (`ties`, `task_arithmetic`: its tuned option).
    """
    from xft.config import MergeConfig, from_flat

    r = ctx.recipe
    if method.trains:
        settings = {**_settings(ctx, method.section), "data": train_data(ctx)}
        if r.data.merge_subset is not None:
            settings["subset"] = r.data.merge_subset
    else:
        own = getattr(r, method.section) if method.section not in ("train", "merge") else {}
        settings = {**_settings(ctx, None), **r.merge, **own}
    return from_flat(MergeConfig, {**settings, "moe": ctx.path(method.merge_of), "out": out, "method": method.merge})


def _training(name: str, deps: tuple[str, ...], config: Callable, description: str) -> Stage:
    """A stage that runs `xft.train` on the config `config(ctx, out)` builds."""
    def run(ctx: Context, out: str) -> None:
        from xft.config import MergeConfig
        from xft.training import learn_merge, train_sft

        cfg = config(ctx, out)
        (learn_merge if isinstance(cfg, MergeConfig) else train_sft)(cfg)
    return Stage(name, deps, run, description, training=True, config=config)


EVAL_SETTINGS = "eval_settings.json"  # in eval/<method>/<benchmark>/: what the results were computed with


def eval_settings(recipe: Recipe, bench: str) -> dict:
    """The settings that decide what an evaluation on `bench` computes (not `workers`: it only sets speed)."""
    e = recipe.eval
    return {"benchmark": bench, "data": benchmark_data(recipe, bench), "limit": e.limit,
            "max_new_tokens": e.max_new_tokens, "batch_size": e.batch_size, "template": eval_template(recipe)}


def eval_template(recipe: Recipe) -> str:
    """The prompt template of every evaluation: the one the models were trained with (`train.template`)."""
    from xft.config import DataConfig

    return recipe.train.get("template", DataConfig.__dataclass_fields__["template"].default)


def _evaluated_with(path: str, settings: dict) -> bool:
    """Whether `path` (eval/<method>/<benchmark>) holds results computed with `settings`."""
    return read_json(os.path.join(path, EVAL_SETTINGS)) == settings and os.path.isfile(
        os.path.join(path, "results.json"))


def _evaluations_current(ctx: Context, path: str) -> bool:
    benchmarks = ctx.recipe.eval.benchmarks
    return all(_evaluated_with(os.path.join(path, b), eval_settings(ctx.recipe, b)) for b in benchmarks)


def _evaluator(method: str):
    def run(ctx: Context, out: str) -> None:
        import shutil

        from xft.pipeline.evaluate import evaluate_model

        e = ctx.recipe.eval
        before = ctx.path(f"eval/{method}")
        # `out` replaces `before` as a whole: carry over every benchmark whose results still hold
        # (an eval-only change re-runs only what it changed; results of benchmarks no longer listed stay).
        for bench in sorted(os.listdir(before)) if os.path.isdir(before) else []:
            settings = eval_settings(ctx.recipe, bench) if bench in e.benchmarks else None
            if settings is None or _evaluated_with(os.path.join(before, bench), settings):
                shutil.copytree(os.path.join(before, bench), os.path.join(out, bench))
        for bench in e.benchmarks:
            if os.path.isdir(os.path.join(out, bench)):
                continue
            evaluate_model(model_of(ctx, method), bench, os.path.join(out, bench), limit=e.limit,
                           max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, workers=e.workers,
                           data=benchmark_data(ctx.recipe, bench), device=ctx.device, progress=ctx.progress,
                           label=method, base_model=method == "base", template=eval_template(ctx.recipe),
                           expert_impl=e.expert_impl, sandbox=e.sandbox)
            atomic_write_json(os.path.join(out, bench, EVAL_SETTINGS), eval_settings(ctx.recipe, bench))
    return run


# ---------------------------------------------------------------- the graph

def _method_stage(m: Method, base_deps: tuple[str, ...], data_deps: tuple[str, ...]) -> Stage:
    """The training stage that produces method `m`'s model, named after it (see `xft.pipeline.methods`)."""
    if m.kind == "merge":  # a merge of the trained MoE; only a learned merge reads data
        return _training(m.name, (m.merge_of,) + (data_deps if m.trains else ()),
                         functools.partial(merge_config, method=m), m.stage)
    if m.upcycle_stage is None:  # instruction tuning of the dense base model
        return _training(m.name, base_deps + data_deps, functools.partial(sft_config, source=base_model, method=m),
                         m.stage)
    upcycled = m.upcycle_stage
    return _training(m.name, (upcycled,) + data_deps,
                     functools.partial(sft_config, source=lambda c: c.path(upcycled), method=m), m.stage)


def all_stages(recipe: Recipe) -> dict[str, Stage]:
    """Every stage this recipe could run, by name (dependencies included)."""
    base_deps = ("base",) if recipe.model == "minicode" else ()
    data_deps = ("data",) if recipe.data.path == "minicode" else ()
    stages = [
        Stage("base", (), _build_base, "pretrain MiniCode's tiny base model"),
        Stage("data", (), _write_data, "write MiniCode's instruction-tuning split"),
    ]
    for name, settings in UPCYCLE_STAGES.items():
        what = ", ".join(f"{k} {v}" for k, v in settings.items())
        stages.append(Stage(name, base_deps, _upcycler(settings), f"upcycle the base model ({what})"))
    stages += [_method_stage(m, base_deps, data_deps) for m in METHODS.values() if m.kind != "base"]
    for method in recipe.methods:
        deps = base_deps if method == "base" else (method,)
        stages.append(Stage(f"eval/{method}", deps, _evaluator(method), f"evaluate {method}",
                            finished=_evaluations_current))
    return {s.name: s for s in stages}


def plan(recipe: Recipe) -> list[Stage]:
    """The stages needed for the recipe's methods, dependencies first, in a stable order."""
    stages = all_stages(recipe)
    order: list[Stage] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in stages[name].deps:
            visit(dep)
        order.append(stages[name])

    for method in recipe.methods:
        if method != "base":
            visit(method)
    for method in recipe.methods:
        visit(f"eval/{method}")
    return order
