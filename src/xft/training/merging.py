"""`learn_merge`: merge a trained MoE back into a dense model (docs/method.md §3), optionally distilling it.

* "learned": `xft.build_merge_model` -> train only the mixing logits with the
  LM loss (paper: 1 epoch, lr 1e-5, 125 warm-up steps) -> `xft.compile_merge`;
* any other method of `xft.MERGE_METHODS` ("init": the initial coefficients,
  shared λ and routed (1-λ)/(N-1); "uniform": the plain average of all
  experts; "task_arithmetic" and "ties": tensor-level merges of the experts'
  deltas to the shared expert, options `merge_scale` / `merge_density`; or one
  registered at runtime): `xft.merge`, no training;
* then, with `distill_steps > 0`, the merged model learns the MoE's next-token
  distributions on the data (`xft.training.distill`, all dense parameters
  train), its checkpoints in `<out>/distill/`.

The result is a dense model of the MoE's original class and config, saved with
the tokenizer in `<out>` itself, and `merge_coefficients.json` next to its
weights: per layer the N coefficients (expert 0 = shared; null for a
tensor-level method, which has none) and, for "learned", the mixing logits, so
`xft.merge(moe, mixing_logits=...)` reproduces it — the merge, before any
distillation (its "distilled" entry then says from which teacher and how long).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass

import transformers
from accelerate import PartialState

import xft
from xft.artifacts import resolve_model
from xft.checkpoint import load_tokenizer
from xft.data import Collator, load_splits, pad_token_id
from xft.errors import UserError
from xft.merge import merge_inputs, merge_modules
from xft.merge_diagnostics import before_merge, collate, held_out_loss
from xft.modelcard import base_model_of, write_model_card
from xft.training import rundir
from xft.config import MergeConfig
from xft.training.distill import DistillTrainer
from xft.training.stage import (
    Output, card_results, check_schedule, cli_flag, common_rows, config_record, loss_curve,
    print_summary, run_trainer, save_output, validation_curve,
)
from xft.training.trainer import resolve_precision

# How `xft merge` spells the distillation's schedule, for the schedule checks' advice.
GAP_FILE = "merge_gap.json"  # the merge-gap diagnostics (xft.merge_diagnostics), next to the merged weights
DISTILL_FLAGS = {"max_steps": "distill_steps", "epochs": "distill_steps", "warmup_steps": "distill_warmup_steps"}


def fixed_coefficients(moe, method: str, shared_weight: float) -> dict[int, list[float]] | None:
    """Per-layer coefficients [N] of a merge method that does not learn; None for a tensor-level method."""
    merger = xft.MERGE_METHODS[method]
    if merger.coefficients_fn is None:
        return None
    return {i: merger.coefficients(layer).tolist() for i, layer in merge_inputs(moe, shared_weight).items()}


# A learned merge whose coefficients moved less than this from their init is the init merge.
STILL = 1e-6


def coefficient_change(start: dict[int, list[float]], end: dict[int, list[float]]) -> float:
    """max |end - start| over every layer's coefficients."""
    return max(abs(b - a) for i in start for a, b in zip(start[i], end[i]))


def experts_identical(moe) -> bool:
    """Whether every layer's experts are equal (an upcycled MoE not trained yet): every merge is the same."""
    return all(bool((w == w[:1]).all()) for stacks in xft.expert_weights(moe).values() for w in stacks.values())


def still_warning(change: float, cfg: MergeConfig, steps: int, identical: bool = False) -> str:
    """What to tell the user when learning left the coefficients at their init: the likely cause and fix."""
    if identical:
        cause = ("the MoE's experts are identical (the upcycled model, not yet trained?), so every mixture is the "
                 "same model and the coefficients get no gradient; merge the trained MoE")
    elif cfg.warmup_steps >= steps / 2:
        cause = (f"the warm-up ({cfg.warmup_steps} steps) covered {'all' if cfg.warmup_steps >= steps else 'most'} "
                 f"of the {steps} steps; lower --warmup-steps or train longer (--epochs / --max-steps)")
    else:
        cause = f"{steps} steps at lr {cfg.lr:g} are too few or too small; train longer or raise --lr"
    return (f"the learned coefficients did not move from their init (max change {change:.1e}): this is the "
            f"init merge; likely cause: {cause}")


def coefficients_record(cfg: MergeConfig, moe_config: dict, coefficients: dict[int, list[float]] | None,
                        logits: dict[int, list[float]] | None) -> dict:
    """The content of merge_coefficients.json (`coefficients` None: a tensor-level method, which has none)."""
    record = {"method": cfg.method, "shared_weight": cfg.shared_weight, "source": cfg.moe,
              "num_experts": moe_config["num_experts"], "routing": moe_config["routing"],
              "coefficients": None if coefficients is None else {str(k): v for k, v in coefficients.items()}}
    if logits is not None:
        record["mixing_logits"] = {str(k): v for k, v in logits.items()}
    return record


def training_runs(cfg: MergeConfig) -> list[tuple[MergeConfig, object]]:
    """The Trainer runs of `cfg` (the learned merge's, the distillation's), each with how `xft merge` spells
    its schedule's settings (for the schedule checks' advice)."""
    runs = [(cfg, cli_flag)] if cfg.method == "learned" else []
    if cfg.distill_steps > 0:
        runs.append((cfg.distill_config(), lambda name, value=None: cli_flag(DISTILL_FLAGS.get(name, name), value)))
    return runs


def prepare_merge_data(cfg: MergeConfig, tokenizer):
    """(splits, collator, schedule warning or None) for the Trainer runs of `cfg`, each schedule checked
    (`check_schedule`) before anything trains; (None, None, None) when nothing trains."""
    runs = training_runs(cfg)
    if not runs:
        return None, None, None
    splits = load_splits(cfg.data, tokenizer)
    found = [w for c, flag in runs if (w := check_schedule(c, splits.stats.examples, flag=flag))]
    return splits, Collator(pad_token_id(tokenizer)), "; ".join(found) or None


def gap_batches(cfg: MergeConfig, splits, tokenizer) -> list | None:
    """Up to `cfg.gap_examples` validation examples as Collator batches for the merge-gap diagnostics; None
    without validation data (or with gap_examples 0)."""
    if not cfg.gap_examples or cfg.data is None or not (cfg.data.eval_path or cfg.data.eval_fraction):
        return None
    if splits is None:
        splits = load_splits(cfg.data, tokenizer)
    held_out = splits.eval.select(range(min(cfg.gap_examples, len(splits.eval))))
    return collate(held_out, Collator(pad_token_id(tokenizer)), cfg.micro_batch_size or 8)


def release(trainer) -> None:
    """Drop `trainer`'s references to its model (its state stays, for the records), so the memory is reused."""
    trainer.model = trainer.model_wrapped = None
    trainer.accelerator.free_memory()  # accelerate's own references; collects garbage, empties the device cache


@dataclass
class Inputs:
    """What a merge starts from, loaded and checked before anything trains."""

    path: str  # the resolved MoE
    tokenizer: object
    moe: object  # the MoE, loaded; a learned merge takes its modules over
    moe_config: dict  # its UpcycleConfig, as config.json records it
    dtype: object
    mixed: str | None
    splits: object = None  # training data, for a learned merge or a distillation
    collator: object = None
    warning: str | None = None  # the schedules' warning (check_schedule)
    batches: list | None = None  # held-out batches of the merge-gap diagnostics
    gap: object = None  # the merge gap, measured on the MoE before merging (`before_merge`)


def load_inputs(cfg: MergeConfig) -> Inputs:
    """The MoE, tokenizer, data and merge-gap batches of `cfg`; UserError if the model is not an xft MoE."""
    path = resolve_model(cfg.moe)
    if not xft.is_moe_checkpoint(path):
        raise UserError(f"{cfg.moe} is a dense model, not an xft MoE; train an upcycled model first")
    tokenizer = load_tokenizer(path)
    splits, collator, warning = prepare_merge_data(cfg, tokenizer)
    dtype, mixed = resolve_precision(cfg.precision)
    transformers.set_seed(cfg.seed)
    moe = xft.load(path, dtype=dtype, expert_impl=cfg.expert_impl)
    batches = gap_batches(cfg, splits, tokenizer)
    gap = before_merge(moe, batches)  # before the merge model takes the MoE's modules over
    return Inputs(path, tokenizer, moe, dict(moe.config.xft), dtype, mixed, splits, collator, warning, batches, gap)


@dataclass
class Merged:
    """A merge's result: the dense model and how it was made."""

    dense: object
    coefficients: dict[int, list[float]] | None  # per layer [N]; None for a tensor-level method
    logits: dict[int, list[float]] | None = None  # a learned merge's mixing logits
    change: float | None = None  # a learned merge: max change of a coefficient from its init
    trainer: object = None  # a learned merge's Trainer
    output: object = None  # its train output
    seconds: float = 0.0


def learned_merge(cfg: MergeConfig, inputs: Inputs, run: rundir.RunDir, resume: str | None) -> Merged:
    """Train the mixing logits of a merge model built on `inputs.moe` (which it takes over; resumes from
    `resume`), then compile it into a dense model. Warns when the coefficients did not move."""
    identical = experts_identical(inputs.moe)
    model = xft.build_merge_model(inputs.moe, cfg.shared_weight, cfg.learn_shared_weight)
    inputs.moe = None  # its modules are the merge model's now: not a teacher any more
    start = xft.merge_coefficients(model)
    trainer, output, seconds = run_trainer(model, cfg, run, resume, inputs.splits, inputs.collator,
                                           inputs.tokenizer, stage="merge", is_moe=False, mixed=inputs.mixed)
    coefficients = xft.merge_coefficients(model)
    change = coefficient_change(start, coefficients)
    if change < STILL:
        warning = still_warning(change, cfg, trainer.state.global_step, identical)
        warnings.warn(warning, stacklevel=3)
        inputs.warning = warning
    logits = {i: m.mixing_logits.detach().float().cpu().tolist() for i, m in merge_modules(model).items()}
    return Merged(xft.compile_merge(model), coefficients, logits, change, trainer, output, seconds)


def fixed_merge(cfg: MergeConfig, inputs: Inputs, run: rundir.RunDir) -> Merged:
    """Merge `inputs.moe` with a method that does not train (`xft.merge`), recording the run as started."""
    t0 = time.perf_counter()
    coefficients = fixed_coefficients(inputs.moe, cfg.method, cfg.shared_weight)
    dense = xft.merge(inputs.moe, cfg.method, shared_weight=cfg.shared_weight, **cfg.merge_options())
    if PartialState().is_main_process:
        rundir.start(run, cfg, "merge")
    return Merged(dense, coefficients, seconds=time.perf_counter() - t0)


@dataclass
class Distilled:
    """A distillation's Trainer, this session's seconds, and the checkpoint it resumed from (or None)."""

    trainer: object
    seconds: float
    resumed_from: str | None


def distill(cfg: MergeConfig, inputs: Inputs, merged: Merged, run: rundir.RunDir) -> Distilled:
    """Train `merged.dense` (in place) to match the MoE for `cfg.distill_steps` steps.

    Its checkpoints go to `<out>/distill/` and an interrupted distillation resumes from the last one.
    The validation KL (with validation data) is computed before the first step as well. After a learned
    merge, which took the MoE's modules over, the teacher is loaded again and the merge's Trainer let go.
    """
    if inputs.moe is None:
        release(merged.trainer)
        inputs.moe = xft.load(inputs.path, dtype=inputs.dtype, expert_impl=cfg.expert_impl)
    sub = rundir.RunDir(os.path.join(run.root, rundir.DISTILL))
    resume = sub.last_checkpoint()
    trainer, _, seconds = run_trainer(merged.dense, cfg.distill_config(), sub, resume, inputs.splits,
                                      inputs.collator, inputs.tokenizer, stage="distill", is_moe=False,
                                      mixed=inputs.mixed, trainer_cls=DistillTrainer,
                                      trainer_kwargs={"teacher": inputs.moe, "temperature": cfg.distill_temperature},
                                      evaluate_first=True)
    inputs.moe = None  # the teacher is not needed any more
    return Distilled(trainer, seconds, resume)


def tidy_distill(run: rundir.RunDir) -> None:
    """Delete a finished distillation's checkpoints and run file: `<out>/distill/` then keeps its logs, if any."""
    sub = rundir.RunDir(os.path.join(run.root, rundir.DISTILL))
    sub.remove_checkpoints()
    with contextlib.suppress(FileNotFoundError):
        os.remove(sub.run_file)
    with contextlib.suppress(OSError):
        os.rmdir(sub.root)  # only if nothing is left


def distill_record(cfg: MergeConfig, trainer, resumed_from: str | None) -> dict:
    """What xft_training.json records of a distillation: teacher, schedule, KL curves, log history, resume point."""
    return {"teacher": cfg.moe, "steps": trainer.state.global_step, "lr": cfg.distill_lr,
            "warmup_steps": cfg.distill_warmup_steps, "temperature": cfg.distill_temperature,
            "kl_curve": loss_curve(trainer), "validation_kl": validation_curve(trainer),
            "resumed_from": resumed_from, "log_history": trainer.state.log_history}


def learn_merge(config: MergeConfig) -> str:
    """Merge the MoE `config.moe` into a dense model (then distill it if `config.distill_steps`); return the
    path of the saved dense model.

    Re-running the same config after an interruption resumes the training
    runs (a learned merge, a distillation) from their last checkpoints in `config.out`.
    """
    cfg = config
    cfg.validate()
    plan = rundir.prepare_stage(cfg, "merge", "merge")
    if plan.done:
        return plan.run.final
    inputs = load_inputs(cfg)
    use_cache = inputs.moe.config.use_cache  # the base's (Trainer turns it off while training)
    # 1. the merge; 2. the distillation, if asked for; 3. the saved model and its summary.
    merged = learned_merge(cfg, inputs, plan.run, plan.resume) if cfg.method == "learned" else \
        fixed_merge(cfg, inputs, plan.run)
    distilled = distill(cfg, inputs, merged, plan.run) if cfg.distill_steps > 0 else None
    main = PartialState().is_main_process
    if inputs.batches and main and (distilled is None or PartialState().num_processes == 1):
        inputs.gap.merged_loss = held_out_loss(merged.dense, inputs.batches)  # (a sharded distilled model: not)
    saved = Output(source=inputs.path, tokenizer=inputs.tokenizer, use_cache=use_cache, dense=True,
                   records=merge_records(cfg, inputs, merged, distilled, plan.resume),
                   card=lambda tmp: write_card(tmp, cfg, inputs.path, merged.trainer, merged.change, plan.run.final,
                                               distilled and distilled.trainer))
    final = save_output(plan.run, saved, trainer=distilled and distilled.trainer, model=merged.dense,
                        keep_checkpoints=cfg.keep_checkpoints)
    if distilled is not None and main and not cfg.keep_checkpoints:
        tidy_distill(plan.run)
    print_summary(cfg, "xft merge: done", merge_rows(cfg, inputs, merged, distilled, final, plan.resume))
    return final


def merge_records(cfg: MergeConfig, inputs: Inputs, merged: Merged, distilled: Distilled | None,
                  resume: str | None) -> dict[str, dict]:
    """The JSON files saved beside the merged weights: coefficients, training record, merge gap."""
    coefficients = coefficients_record(cfg, inputs.moe_config, merged.coefficients, merged.logits)
    if merged.change is not None:
        coefficients["max_change_from_init"] = merged.change
    training = config_record(cfg, "merge", inputs.splits, merged.trainer, resume)
    if distilled is not None:
        trainer = distilled.trainer
        coefficients["distilled"] = {"teacher": cfg.moe, "steps": trainer.state.global_step,
                                     "note": "the saved weights are this merge, then distilled from the teacher"}
        training["distillation"] = distill_record(cfg, trainer, distilled.resumed_from)
        training["processes"] = trainer.args.world_size
        training["distributed"] = trainer.accelerator.distributed_type.value
    return {"merge_coefficients.json": coefficients, "xft_training.json": training,
            GAP_FILE: inputs.gap.to_dict()}


def merge_rows(cfg: MergeConfig, inputs: Inputs, merged: Merged, distilled: Distilled | None, final: str,
               resume: str | None) -> list[tuple[str, str]]:
    """The summary of `xft merge`: the model, the method and its coefficients, training, distillation, gap."""
    dense, coefficients = merged.dense, merged.coefficients
    rows = [("model saved to", final),
            ("dense model", f"{type(dense).__name__}, {sum(p.numel() for p in dense.parameters()):,} parameters, "
                            f"from {cfg.moe}{' (resumed)' if resume else ''}"),
            ("method", cfg.method + (f", shared weight {cfg.shared_weight}"
                                     if xft.MERGE_METHODS[cfg.method].uses_shared_weight else ""))]
    if coefficients is not None:
        first = [c[0] for c in coefficients.values()]
        others = max(max(c[1:]) for c in coefficients.values())
        rows.append(("coefficients", f"expert 0: {min(first):.4f}..{max(first):.4f}; "
                                     f"largest other expert {others:.4f} (merge_coefficients.json)"))
    if merged.change is not None:
        rows.append(("learned", f"max change of a coefficient from its init: {merged.change:.2e}"))
    options = cfg.merge_options()
    if options:
        rows.append(("options", ", ".join(f"{k} {v}" for k, v in options.items())))
    if merged.trainer is not None:
        rows += common_rows(cfg, merged.trainer, merged.output, merged.seconds, inputs.splits, final,
                            inputs.warning, resume)[1:]
    if distilled is not None:
        rows += distill_rows(cfg, distilled.trainer, distilled.seconds, inputs.splits, merged.trainer is None,
                             inputs.warning)
    return rows + inputs.gap.rows()


def distill_rows(cfg: MergeConfig, trainer, seconds: float, splits, data_row: bool,
                 warning: str | None) -> list[tuple[str, str]]:
    """Summary rows of a distillation (`data_row`: also the data, when no learned merge reported it)."""
    rows = []
    if data_row:
        rows = [r for r in common_rows(cfg.distill_config(), trainer, None, seconds, splits, "", warning)
                if r[0] in ("data", "WARNING")]
    rows.append(("distilled", f"{trainer.state.global_step} optimizer steps from the MoE {cfg.moe} (KL to its "
                              f"next-token distributions, T {cfg.distill_temperature:g}, lr {cfg.distill_lr:g})"))
    for name, curve in (("distill KL", loss_curve(trainer)), ("validation KL", validation_curve(trainer))):
        if curve:
            rows.append((name, f"{curve[0][1]:.3g} (step {curve[0][0]}) -> {curve[-1][1]:.3g} (step {curve[-1][0]})"))
    rows.append(("distill time", f"{seconds:.1f} s this session"))
    return rows


def write_card(directory: str, cfg: MergeConfig, moe_path: str, trainer, change: float | None,
               location: str, distiller=None) -> None:
    """The model card (README.md) of an `xft merge` output (`distiller`: the distillation's trainer, if any)."""
    merger = xft.MERGE_METHODS[cfg.method]
    how = {"learned": "per-layer mixing coefficients learned on data (only they were trained)",
           "init": "the initial coefficients, no training"}.get(cfg.method, merger.help)
    shared = (f" Shared expert weight λ = {cfg.shared_weight}"
              f"{' (learned per layer)' if cfg.learn_shared_weight else ''}." if merger.uses_shared_weight else "")
    options = cfg.merge_options()
    given = f" Options: {', '.join(f'{k} = {v}' for k, v in options.items())}." if options else ""
    where = (" The coefficients are in merge_coefficients.json." if merger.coefficients_fn is not None else "")
    details = f"Merge method `{cfg.method}`: {how}.{shared}{given}{where}"
    settings = {"merge method": cfg.method, "shared expert weight": cfg.shared_weight if merger.uses_shared_weight
                else None, **{f"merge {k}": v for k, v in options.items()}}
    results = {}
    if trainer is not None:
        settings.update({"learning rate": cfg.lr, "schedule": f"{cfg.lr_scheduler}, {cfg.warmup_steps} warm-up "
                         "steps", "optimizer": cfg.optimizer, "global batch": cfg.batch_size})
        results = {**card_results(trainer),
                   "max coefficient change from init": f"{change:.2e}" if change is not None else None}
    if distiller is not None:
        steps = distiller.state.global_step
        details += (f" Then distilled: all weights of the merged model were trained for {steps} steps to match "
                    f"the MoE {cfg.moe}'s next-token distributions on the data (KL on the response tokens, "
                    f"temperature {cfg.distill_temperature:g}).")
        settings.update({"distilled from": cfg.moe, "distillation steps": steps,
                         "distillation learning rate": cfg.distill_lr,
                         "distillation temperature": cfg.distill_temperature})
        kl, validation = loss_curve(distiller), validation_curve(distiller)
        results.update({"final distillation KL (training)": f"{kl[-1][1]:.3g}" if kl else None,
                        "validation KL to the MoE, before -> after distillation":
                            f"{validation[0][1]:.3g} -> {validation[-1][1]:.3g}" if validation else None})
    write_model_card(directory, kind="merged", base_model=base_model_of(moe_path), source=cfg.moe,
                     data=cfg.data.path if cfg.data else None, settings=settings, results=results, details=details,
                     location=location)

