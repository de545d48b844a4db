"""The experiment's stages: what each one needs, what it runs, where its artifact goes.

Every stage owns one directory under the run directory, named after the stage:

    base/                    MiniCode base model (when the recipe says model: minicode)
    data/train.jsonl         MiniCode instruction data (when data.path: minicode)
    upcycle/, upcycle-sparse/, upcycle-unnormalized/    upcycled MoEs, untrained
    sft/, moe/, ewa/, sparse/, unnormalized/             training runs (xft.train: final/ + checkpoints/)
    xft/, xft_init/, xft_uniform/                        merge runs (xft.train.learn_merge: final/)
    eval/<method>/results.json                          evaluation of each method's model

A stage is finished when its directory holds a finished artifact: the
training stages use `xft.training.rundir` (`final/` appears only complete and
re-running resumes from the last checkpoint); the other stages write into a
temporary sibling and rename it into place, so an interrupted stage leaves
nothing that looks finished.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

from xft.errors import UserError
from xft.pipeline.recipe import Recipe
from xft.training import rundir

MINICODE_SEED = 0  # MiniCode's published splits; its train/eval leakage rules hold within one seed
ROUTING_OF = {"moe": "xft", "sparse": "sparse", "unnormalized": "unnormalized"}
UPCYCLE_STAGE = {"xft": "upcycle", "sparse": "upcycle-sparse", "unnormalized": "upcycle-unnormalized"}


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

    def done(self, ctx: Context) -> bool:
        path = ctx.path(self.name)
        if self.training:
            return rundir.RunDir(path).is_finished()
        return os.path.isdir(path)


# ---------------------------------------------------------------- where artifacts are

def base_model(ctx: Context) -> str:
    """The base model's directory (or Hub id)."""
    if ctx.recipe.model == "minicode":
        return ctx.path("base")
    return rundir.resolve_model(ctx.recipe.model)


def train_data(ctx: Context) -> str:
    """The instruction data file."""
    if ctx.recipe.data.path == "minicode":
        return os.path.join(ctx.path("data"), "train.jsonl")
    return ctx.recipe.data.path


def model_of(ctx: Context, method: str) -> str:
    """The model directory a method produces."""
    return base_model(ctx) if method == "base" else os.path.join(ctx.path(method), rundir.FINAL)


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


def _upcycler(routing: str):
    def run(ctx: Context, out: str) -> None:
        import xft
        from transformers import AutoTokenizer

        path = base_model(ctx)
        model = xft.load(path)
        if xft.is_moe(model):
            raise UserError(f"model {ctx.recipe.model} is already an MoE; XFT upcycles a dense model")
        config = xft.UpcycleConfig(**{**ctx.recipe.upcycle, "routing": routing, "seed": ctx.recipe.seed})
        xft.upcycle(model, config)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return run


def _settings(ctx: Context, *sections: dict) -> dict:
    """Training settings: the recipe's seed and precision, then each section in turn."""
    merged = {"seed": ctx.recipe.seed, "precision": ctx.recipe.precision, "progress": ctx.progress}
    for section in sections:
        merged.update(section)
    return merged


def _sft(source: Callable[[Context], str], *, ewa: bool = False, dense: bool = False):
    def run(ctx: Context, out: str) -> None:
        from xft.train import SFTConfig, train_sft

        r = ctx.recipe
        extra = {k: v for k, v in r.ewa.items() if k != "share_rate"} if ewa else {}
        settings = _settings(ctx, r.train, r.dense if dense else {}, extra)
        train_sft(SFTConfig(model=source(ctx), data=train_data(ctx), out=out, kind="instruction",
                            ewa_share_rate=r.ewa["share_rate"] if ewa else 0.0, **settings))
    return run


def _merger(method: str):
    def run(ctx: Context, out: str) -> None:
        from xft.train import MergeConfig, learn_merge

        r = ctx.recipe
        settings = _settings(ctx, r.train if method == "learned" else {}, r.merge)
        # The merge stage has its own paper schedule (MergeConfig defaults); only the shared knobs of `train`
        # (batch, length, optimizer, ...) carry over, never its lr / epochs / warm-up / steps.
        for key in ("lr", "epochs", "warmup_steps", "max_steps", "lr_scheduler"):
            if key in r.train and key not in r.merge:
                settings.pop(key, None)
        if method == "learned" and r.data.merge_subset is not None:
            settings["subset"] = r.data.merge_subset
        learn_merge(MergeConfig(moe=ctx.path("moe"), data=train_data(ctx) if method == "learned" else None,
                                out=out, method=method, kind="instruction", **settings))
    return run


def _evaluator(method: str):
    def run(ctx: Context, out: str) -> None:
        from xft.pipeline.evaluate import evaluate_model

        e = ctx.recipe.eval
        for bench in e.benchmarks:
            evaluate_model(model_of(ctx, method), bench, os.path.join(out, bench), limit=e.limit,
                           max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, workers=e.workers,
                           data=e.data.get(bench), device=ctx.device, progress=ctx.progress, label=method,
                           base_model=method == "base")
    return run


# ---------------------------------------------------------------- the graph

def all_stages(recipe: Recipe) -> dict[str, Stage]:
    """Every stage this recipe could run, by name (dependencies included)."""
    base_deps = ("base",) if recipe.model == "minicode" else ()
    data_deps = ("data",) if recipe.data.path == "minicode" else ()
    stages = [
        Stage("base", (), _build_base, "pretrain MiniCode's tiny base model"),
        Stage("data", (), _write_data, "write MiniCode's instruction-tuning split"),
    ]
    for routing, name in UPCYCLE_STAGE.items():
        stages.append(Stage(name, base_deps, _upcycler(routing), f"upcycle the base model ({routing} routing)"))
    stages += [
        Stage("sft", base_deps + data_deps, _sft(base_model, dense=True), "dense SFT baseline", training=True),
        Stage("moe", ("upcycle",) + data_deps, _sft(lambda c: c.path("upcycle")), "MoE SFT (shared expert, "
              "normalized routing)", training=True),
        Stage("ewa", ("upcycle",) + data_deps, _sft(lambda c: c.path("upcycle"), ewa=True),
              "MoE SFT with EWA, experts averaged", training=True),
        Stage("sparse", ("upcycle-sparse",) + data_deps, _sft(lambda c: c.path("upcycle-sparse")),
              "MoE SFT, sparse upcycling (no shared expert)", training=True),
        Stage("unnormalized", ("upcycle-unnormalized",) + data_deps,
              _sft(lambda c: c.path("upcycle-unnormalized")), "MoE SFT, shared expert, unnormalized routing",
              training=True),
        Stage("xft", ("moe",) + data_deps, _merger("learned"), "learn the merge (XFT)", training=True),
        Stage("xft_init", ("moe",), _merger("init"), "init merge (no learning)", training=True),
        Stage("xft_uniform", ("moe",), _merger("uniform"), "uniform merge of all experts", training=True),
    ]
    for method in recipe.methods:
        deps = base_deps if method == "base" else (method,)
        stages.append(Stage(f"eval/{method}", deps, _evaluator(method), f"evaluate {method}"))
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
