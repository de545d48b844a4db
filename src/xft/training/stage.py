"""Plumbing shared by the training stages: inputs, the Trainer run, the final artifacts, the summary.

A stage (`train_sft`, `learn_merge`) is: validate everything (no writes:
config, data, `check_schedule`) -> build the model -> `run_trainer` (resumes
from OUT/checkpoint-N) -> `save_output` (the model, its companions, records and
model card, moved into OUT on the main process, config.json last) ->
`print_summary`. `xft.training.rundir` describes the layout.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from accelerate import PartialState
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from xft.artifacts import atomic_write_json, atomic_write_text, copy_companions, update_config
from xft.data import Collator, load_splits, pad_token_id
from xft.errors import UserError
from xft.training import rundir
from xft.config import report_targets, to_flat
from xft.training.trainer import (
    XFTTrainer, batch_plan, make_trainer, planned_steps, precision_used, training_arguments, world_size,
)

# A warm-up longer than this share of the run leaves little of it at the full learning rate.
WARMUP_WARN_SHARE = 0.5


def prepare_data(cfg, tokenizer):
    """Tokenized data (`xft.data.Splits`: training and optional validation) and collator for `cfg`.

    Validated before any training, including the schedule (`check_schedule`).
    Returns (splits, collator, schedule warning or None).
    """
    splits = load_splits(cfg.data, tokenizer)
    return splits, Collator(pad_token_id(tokenizer)), check_schedule(cfg, splits.stats.examples)


def cli_flag(name: str, value=None) -> str:
    """How `xft train`/`xft merge` spell setting `name` (with `value`): `--warmup-steps 3`."""
    flag = "--" + name.replace("_", "-")
    return flag if value is None else f"{flag} {value}"


def check_schedule(cfg, examples: int, processes: int | None = None, flag=cli_flag) -> str | None:
    """UserError when the warm-up takes the whole run; a warning (returned, and warned) when most of it.

    With an epoch-based run the number of steps follows from the data, and a
    warm-up at least that long means the learning rate never reaches `cfg.lr`:
    an error. With an explicit `max_steps` (e.g. a smoke test) the same case is
    only a warning, as is a warm-up longer than half the run.
    """
    steps = planned_steps(examples, cfg, processes or world_size())
    if cfg.warmup_steps <= 0:
        return None
    how = (f"{flag('max_steps', cfg.max_steps)}" if cfg.max_steps > 0 else
           f"{examples} examples, batch {cfg.batch_size}, {cfg.epochs:g} epoch{'s' if cfg.epochs != 1 else ''}")
    fix = flag("warmup_steps", steps // 10) + (" (about 10% of the run)" if steps >= 10 else " (no warm-up)")
    if cfg.warmup_steps >= steps and cfg.max_steps <= 0:
        raise UserError(f"the learning-rate warm-up ({cfg.warmup_steps} steps) is as long as the whole run "
                        f"({steps} optimizer steps: {how}), so the learning rate would never reach {cfg.lr:g}; "
                        f"pass {fix}, or train longer with {flag('epochs')} / {flag('max_steps')}")
    if cfg.warmup_steps > WARMUP_WARN_SHARE * steps:
        message = (f"the learning-rate warm-up ({cfg.warmup_steps} steps) takes "
                   f"{min(cfg.warmup_steps / steps, 1):.0%} of the run ({steps} optimizer steps: {how}); "
                   + (f"the learning rate never reaches {cfg.lr:g}" if cfg.warmup_steps >= steps else
                      f"the learning rate reaches {cfg.lr:g} only at step {cfg.warmup_steps}")
                   + f"; consider {fix}")
        warnings.warn(message, stacklevel=2)
        return message
    return None


def run_trainer(model, cfg, run: rundir.RunDir, resume: str | None, splits, collator, tokenizer, *,
                stage: str, is_moe: bool, mixed: str | None, ewa_share_rate: float = 0.0,
                trainer_cls=None, trainer_kwargs: dict | None = None, evaluate_first: bool = False):
    """Create the run directory, train (resuming from `resume`), return (trainer, train output, seconds).

    With validation data its loss is computed every `cfg.eval_steps` and once more at the end, and
    with `evaluate_first` also before the first step (of a run that does not resume). `trainer_cls`
    (default `XFTTrainer`) is built with `trainer_kwargs`.
    """
    micro, accum = batch_plan(cfg.batch_size, cfg.micro_batch_size, cfg.grad_accum, world_size())
    logs = run.logs
    args = training_arguments(cfg, run.checkpoints, micro, accum, mixed, evaluate=splits.eval is not None,
                              logging_dir=logs, evaluate_first=evaluate_first and not resume)
    routing_log = os.path.join(run.root, rundir.ROUTING_LOG) if is_moe else None
    state = PartialState()
    if state.is_main_process:
        rundir.start(run, cfg, stage)
        # Logs of steps this session will (re)run are stale: after the resumed checkpoint's step, or all
        # of them when starting over (an --overwrite, or an interrupted run that saved no checkpoint).
        if routing_log:
            truncate_log(routing_log, checkpoint_step(resume) if resume else 0)
        if not resume:
            shutil.rmtree(logs, ignore_errors=True)
    state.wait_for_everyone()
    trainer = make_trainer(model, args, splits.train, collator, tokenizer, ewa_share_rate=ewa_share_rate,
                           routing_log=routing_log, progress=cfg.progress, eval_dataset=splits.eval,
                           logging_dir=logs, trainer_cls=trainer_cls or XFTTrainer, **(trainer_kwargs or {}))
    whole = None
    if stage == "merge" and trainer.is_fsdp_enabled:
        # xft.compile_merge deep-copies the trained model, which FSDP2 modules refuse: train a sharded copy and
        # load its weights back into `model`, which stays whole (as under DDP: only the mixing logits train).
        whole = model
        trainer.model = trainer.model_wrapped = copy.deepcopy(model)
    t0 = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    if whole is not None:
        whole.load_state_dict(get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True)))
    if splits.eval is not None and not any(h.get("step") == trainer.state.global_step and "eval_loss" in h
                                           for h in trainer.state.log_history):
        trainer.evaluate()  # the final validation loss, unless the last step already computed it
    return trainer, output, time.perf_counter() - t0


def checkpoint_step(checkpoint: str) -> int:
    """The optimizer step a Trainer checkpoint was saved at."""
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        return int(json.load(f)["global_step"])


def truncate_log(path: str, step: int) -> None:
    """Drop the lines of JSONL log `path` logged after `step` (a resumed run logs those steps again)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    # A line cut off by the kill that interrupted the run is dropped too.
    kept = [line for line in lines if line.endswith("\n") and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


def finalize(run: rundir.RunDir, save, keep_checkpoints: bool = True) -> str:
    """Write the finished model into OUT (`rundir.publish`: config.json last); `save(tmp_dir)` writes its files.

    `save` runs on every process (sharded models gather inside it); the move
    and the checkpoint clean-up run on the main process only.
    """
    state = PartialState()
    tmp = os.path.join(run.root, rundir.STAGING)
    if state.is_main_process:
        rundir.staging(run)
    state.wait_for_everyone()
    save(tmp)
    state.wait_for_everyone()
    if state.is_main_process:
        rundir.publish(run, tmp)
        if not keep_checkpoints:
            run.remove_checkpoints()
    state.wait_for_everyone()
    return run.final


@dataclass
class Output:
    """What a stage writes into OUT beside the weights."""

    source: str  # the resolved model the stage started from: its tokenizer and generation config are copied
    tokenizer: object  # saved instead when `source` is a Hub id (no files to copy)
    use_cache: bool  # the source's: Trainer turns it off while training, and the saved config must not keep that
    dense: bool  # a dense model: config.json also gets `torch_dtype` for older tools
    records: dict  # file name -> JSON content (xft_training.json, merge_coefficients.json, ...)
    card: Callable[[str], None]  # writes the model card into the directory it is given


def save_output(run: rundir.RunDir, output: Output, *, trainer=None, model=None,
                keep_checkpoints: bool = True) -> str:
    """Write the finished model into OUT (`finalize`); return its path.

    The weights are `trainer`'s model (its `save_model` gathers sharded FSDP / ZeRO-3 weights, on every
    process) or, without a trainer, `model`, saved by the main process.
    """
    def save(tmp: str) -> None:
        main = PartialState().is_main_process
        if trainer is not None:
            trainer.save_model(tmp)
            if main and os.path.exists(f"{tmp}/training_args.bin"):
                os.remove(f"{tmp}/training_args.bin")  # a pickle; the config is in xft_training.json
        elif main:
            model.save_pretrained(tmp)
        if main:
            copy_companions(output.source, tmp, output.tokenizer)  # tokenizer, generation config: byte for byte
            update_config(tmp, use_cache=output.use_cache, torch_dtype_alias=output.dense)
            for name, record in output.records.items():
                atomic_write_json(os.path.join(tmp, name), record)
            output.card(tmp)

    return finalize(run, save, keep_checkpoints=keep_checkpoints)


def print_summary(cfg, title: str, rows: list[tuple[str, str]]) -> None:
    """The end-of-run summary, printed once (main process) unless `cfg.progress` is off."""
    if cfg.progress and PartialState().is_main_process:
        print(summary(title, rows), flush=True)


def card_results(trainer) -> dict:
    """What a model card reports of a finished training run: steps, final training and validation loss."""
    curve, validation = loss_curve(trainer), validation_curve(trainer)
    return {"optimizer steps": trainer.state.global_step,
            "final training loss": round(curve[-1][1], 4) if curve else None,
            "final validation loss": round(validation[-1][1], 4) if validation else None}


def loss_curve(trainer) -> list[tuple[int, float]]:
    """(step, logged training loss) pairs of the run, resumed parts included."""
    return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]


def summary(title: str, rows: list[tuple[str, str]]) -> str:
    """A one-screen, aligned summary block."""
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * len(title)] + [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def validation_curve(trainer) -> list[tuple[int, float]]:
    """(step, validation loss) pairs of the run."""
    return [(h["step"], h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h]


def mean_loss(trainer, output, resumed_from: str | None = None) -> float | None:
    """The training loss averaged over every step of the run, the steps before a resume included.

    Trainer's `training_loss` averages this session's steps only. The steps before `resumed_from` are in
    the log history the checkpoint restored: each logged loss is the mean over the steps since the
    previous log, so it is weighted by their number.
    """
    session = getattr(output, "training_loss", None)
    if not session or not resumed_from:
        return session
    # The folder's name, not its trainer_state.json: the finished run has deleted its checkpoints by now.
    start, steps = int(os.path.basename(resumed_from).rsplit("-", 1)[1]), trainer.state.global_step
    # This session's summed per-step loss: `training_loss` divides it by this session's steps in current
    # transformers but by all the run's steps in 5.5 (our lower bound); the sum means the same in both.
    total = getattr(trainer, "_total_loss_scalar", None)
    total = session * (steps - start) if total is None else total
    logged, covered, previous = 0.0, 0, 0
    for step, loss in loss_curve(trainer):
        if step <= start:
            logged, covered, previous = logged + loss * (step - previous), step, step
    return (logged + total) / (covered + steps - start)


def common_rows(cfg, trainer, output, seconds: float, splits, final: str,
                warning: str | None = None, resumed_from: str | None = None) -> list[tuple[str, str]]:
    """Summary rows every stage reports (`warning`: the schedule warning of `check_schedule`; `resumed_from`:
    the checkpoint this session started from, so the mean loss covers the whole run)."""
    curve = loss_curve(trainer)
    tokens = trainer.state.num_input_tokens_seen or 0
    data_stats = splits.stats
    rows = [("model saved to", final),
            ("data", f"{data_stats.path}: {data_stats.examples} examples ({data_stats.kind}), "
                     f"{data_stats.truncated} truncated, {data_stats.dropped_no_target} dropped"),
            ("steps", f"{trainer.state.global_step} optimizer steps, {trainer.state.epoch or 0:.2f} epochs, "
                      f"global batch {cfg.batch_size}")]
    if curve:
        mean = mean_loss(trainer, output, resumed_from)
        rows.append(("training loss", f"{curve[0][1]:.4f} (step {curve[0][0]}) -> {curve[-1][1]:.4f} "
                                      f"(step {curve[-1][0]})" + (f"; mean {mean:.4f}" if mean else "")))
    validation = validation_curve(trainer)
    if validation:
        first = f"{validation[0][1]:.4f} (step {validation[0][0]}) -> " if len(validation) > 1 else ""
        rows.append(("validation loss", f"{first}{validation[-1][1]:.4f} (step {validation[-1][0]}) on "
                                        f"{splits.eval_stats.examples} examples of {splits.eval_stats.path}"))
    if warning:
        rows.append(("WARNING", warning))
    targets = report_targets(cfg.report_to)
    if targets:
        where = "; TensorBoard logs in " + os.path.join(final, rundir.LOGS) if (
            "tensorboard" in targets or "all" in targets) else ""
        rows.append(("logged to", ", ".join(targets) + where))
    rows.append(("time", f"{seconds:.1f} s this session"
                         + (f", {tokens / seconds:,.0f} tokens/s" if tokens and seconds > 0 else "")))
    return rows


def config_record(cfg, stage: str, splits, trainer, resumed_from: str | None = None) -> dict:
    """What goes into OUT/xft_training.json: config, data stats, validation, log history, resume point."""
    validation = None
    if splits is not None and splits.eval_stats is not None and trainer is not None:
        curve = validation_curve(trainer)
        validation = {"data": asdict(splits.eval_stats), "loss": curve[-1][1] if curve else None,
                      "curve": curve}
    return {"stage": stage, "config": to_flat(cfg), "data": asdict(splits.stats) if splits else None,
            "validation": validation, "resumed_from": resumed_from,
            "log_history": trainer.state.log_history if trainer else [],
            "processes": trainer.args.world_size if trainer else 1,
            # how the processes shared the work: "NO" (one process), "MULTI_GPU"/"MULTI_CPU" (DDP), "FSDP", ...
            "distributed": trainer.accelerator.distributed_type.value if trainer else "NO",
            "precision": precision_used(cfg.precision),  # "auto" resolved on this machine
            "torch": torch.__version__}
