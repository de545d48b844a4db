"""What a run needs from outside its run directory, checked before any stage starts.

    check_inputs(load_recipe("deepseek-coder-1.3b", ["data.path=evol.jsonl"]))   # UserError, or None

A paper-scale run trains for hours before its first evaluation, so everything
a later stage would fail on is checked first, in seconds, and before the run
directory is created:

* the base model location (`xft.artifacts.resolve_model`, as the stages resolve it);
* every planned training stage's config (built by the stage's own `config` and validated)
  and the upcycling settings of every planned upcycle stage;
* the instruction data: read and validated as `xft.data.load_dataset` reads it, and each
  training stage's schedule on it (a warm-up that would take the whole run);
* every benchmark, loaded by `xft.eval.benchmarks.load_benchmark` with the data the
  evaluation stage will pass (so a missing MBPP+ file or the missing `evalplus` extra is
  reported now, with the recipe key that fixes it).

Not checked: what only training can tell (memory, speed).
"""

from __future__ import annotations

import os
import re

from xft.config import closest
from xft.errors import UserError
from xft.pipeline.recipe import Recipe, upcycle_config
from xft.pipeline.methods import METHODS, UPCYCLE_STAGES
from xft.pipeline.stages import Context, benchmark_data, plan

_PLACEHOLDER_ROOT = "<run directory>"  # configs are built and validated, never run, so no path is touched


def check_inputs(recipe: Recipe) -> None:
    """Raise UserError on anything in `recipe`'s inputs that a stage of its run would fail on."""
    ctx = Context(recipe=recipe, root=_PLACEHOLDER_ROOT, progress=False)
    if recipe.model != "minicode":
        from xft.artifacts import resolve_model

        resolve_model(recipe.model)
    stages = plan(recipe)
    _check_upcycling(recipe, {s.name for s in stages})
    configs = {s.name: s.config(ctx, ctx.path(s.name)) for s in stages if s.config is not None}
    for cfg in configs.values():
        _for_recipe(cfg.validate)
    if recipe.data.path != "minicode":
        _check_data(configs)
    _check_benchmarks(recipe)


def _for_recipe(check, *args) -> None:
    """Run `check`; its UserError names command-line flags of `xft train`: name the recipe keys instead."""
    try:
        check(*args)
    except UserError as e:
        message = re.sub(r"--(\w+)-field", lambda m: f"--set train.{m.group(1)}_field=NAME", str(e))
        raise UserError(message) from None


def _check_upcycling(recipe: Recipe, stage_names: set[str]) -> None:
    for name, settings in UPCYCLE_STAGES.items():
        if name in stage_names:
            upcycle_config(recipe, settings)


def _check_data(configs: dict) -> None:
    """Read the instruction data once per file; check the records and the schedule of every training stage."""
    import warnings

    from xft.data import detect_kind, read_records, training_records, validate_records
    from xft.training.stage import check_schedule

    seen: dict[str, object] = {}
    for stage, cfg in configs.items():
        data = cfg.data
        if data is None:  # init / uniform merges read no data
            continue
        if data.path not in seen:
            seen[data.path] = records = read_records(data.path)
            if not records.rows:
                raise UserError(f"data.path: {data.path} is empty (no records)")
        records = seen[data.path]
        _for_recipe(validate_records, records, detect_kind(records.rows[0], data), data)
        # A warm-up that swallows the run fails its stage, maybe hours in: fail now. (Counted in records;
        # the stage counts examples, which drops records with no response token left: it checks again.)
        section = METHODS[stage].section  # the recipe section its schedule comes from
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the stage itself warns about a long warm-up, once
            try:
                check_schedule(cfg, training_records(len(records.rows), data),
                               flag=lambda name, value=None: f"--set {section}.{name}"
                               + ("" if value is None else f"={value}"))
            except UserError as e:
                raise UserError(f"stage {stage}: {e}; no stage was started") from None


def _require_known(bench: str, where: str, known: list[str]) -> None:
    if bench not in known:
        hint = closest(bench, known) or f"; choose from {', '.join(known)}"
        raise UserError(f"{where}: unknown benchmark {bench!r}{hint}")


def _check_benchmarks(recipe: Recipe) -> None:
    """Load every benchmark as the evaluation stage will; the error says which recipe key fixes it."""
    from xft.config import ConfigError, DecodingConfig, ExecutionConfig
    from xft.eval.benchmarks import load_benchmark, names

    try:  # how the models run (the same settings as xft eval's flags)
        DecodingConfig(expert_impl=recipe.eval.expert_impl), ExecutionConfig(sandbox=recipe.eval.sandbox)
    except ConfigError as e:
        raise UserError(f"eval: {e}") from None
    for bench, path in recipe.eval.data.items():
        _require_known(bench, f"eval.data.{bench}", names())
        if not isinstance(path, str) or not os.path.isfile(path):
            raise UserError(f"eval.data.{bench}: {path}: no such file")
    for bench in recipe.eval.benchmarks:
        _require_known(bench, "eval.benchmarks", names())
        try:
            load_benchmark(bench, benchmark_data(recipe, bench), data_option=f"--set eval.data.{bench}=PATH")
        except UserError as e:
            raise UserError(f"benchmark {bench}: {e}; no stage was started") from None
