"""Plumbing shared by the training stages: inputs, the Trainer run, the final artifacts, the summary.

A stage (`train_sft`, `learn_merge`) is: validate everything (no writes) ->
build the model -> `run_trainer` (resumes from OUT/checkpoints) -> `finalize`
(OUT/final written atomically on the main process) -> `summary`.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict

import torch
from accelerate import PartialState
from transformers import AutoTokenizer

from xft.data import Collator, load_dataset, pad_token_id
from xft.errors import UserError
from xft.training import rundir
from xft.training.trainer import batch_plan, make_trainer, training_arguments, world_size


def load_tokenizer(path: str):
    """The tokenizer saved with model `path`; UserError if there is none."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from None


def prepare_data(cfg, tokenizer):
    """Tokenized dataset, collator and stats for `cfg` (validated before any training)."""
    dataset, stats = load_dataset(cfg.data_config(), tokenizer)
    return dataset, Collator(pad_token_id(tokenizer)), stats


def run_trainer(model, cfg, run: rundir.RunDir, resume: str | None, dataset, collator, tokenizer, *,
                stage: str, is_moe: bool, mixed: str | None, ewa_share_rate: float = 0.0):
    """Create the run directory, train (resuming from `resume`), return (trainer, train output, seconds)."""
    micro, accum = batch_plan(cfg.batch_size, cfg.micro_batch_size, cfg.grad_accum, world_size())
    args = training_arguments(cfg, run.checkpoints, micro, accum, mixed)
    state = PartialState()
    if state.is_main_process:
        rundir.start(run, cfg, stage)
    state.wait_for_everyone()
    trainer = make_trainer(model, args, dataset, collator, tokenizer, ewa_share_rate=ewa_share_rate,
                           routing_log=os.path.join(run.root, "routing.jsonl") if is_moe else None,
                           progress=cfg.progress)
    t0 = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    return trainer, output, time.perf_counter() - t0


def finalize(run: rundir.RunDir, save, keep_checkpoints: bool = True) -> str:
    """Write the finished model to OUT/final atomically; `save(tmp_dir)` writes its files.

    `save` runs on every process (sharded models gather inside it); the rename
    and the checkpoint clean-up run on the main process only.
    """
    state = PartialState()
    tmp = os.path.join(run.root, ".final.tmp")
    if state.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    state.wait_for_everyone()
    save(tmp)
    state.wait_for_everyone()
    if state.is_main_process:
        if os.path.exists(run.final):  # only with --overwrite: replace it now the new one is complete
            shutil.rmtree(run.final)
        os.rename(tmp, run.final)
        if not keep_checkpoints:
            shutil.rmtree(run.checkpoints, ignore_errors=True)
    state.wait_for_everyone()
    return run.final


def loss_curve(trainer) -> list[tuple[int, float]]:
    """(step, logged training loss) pairs of the run, resumed parts included."""
    return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]


def summary(title: str, rows: list[tuple[str, str]]) -> str:
    """A one-screen, aligned summary block."""
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * len(title)] + [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def common_rows(cfg, trainer, output, seconds: float, data_stats, final: str) -> list[tuple[str, str]]:
    """Summary rows every stage reports."""
    curve = loss_curve(trainer)
    tokens = trainer.state.num_input_tokens_seen or 0
    rows = [("model saved to", final),
            ("data", f"{data_stats.path}: {data_stats.examples} examples ({data_stats.kind}), "
                     f"{data_stats.truncated} truncated, {data_stats.dropped_no_target} dropped"),
            ("steps", f"{trainer.state.global_step} optimizer steps, {trainer.state.epoch or 0:.2f} epochs, "
                      f"global batch {cfg.batch_size}")]
    if curve:
        mean = getattr(output, "training_loss", None)
        rows.append(("training loss", f"{curve[0][1]:.4f} (step {curve[0][0]}) -> {curve[-1][1]:.4f} "
                                      f"(step {curve[-1][0]})" + (f"; mean {mean:.4f}" if mean else "")))
    rows.append(("time", f"{seconds:.1f} s this session"
                         + (f", {tokens / seconds:,.0f} tokens/s" if tokens and seconds > 0 else "")))
    return rows


def config_record(cfg, stage: str, data_stats, trainer, resumed_from: str | None = None) -> dict:
    """What goes into OUT/final/xft_training.json: config, data stats, log history, resume point."""
    return {"stage": stage, "config": asdict(cfg), "data": asdict(data_stats) if data_stats else None,
            "resumed_from": resumed_from,
            "log_history": trainer.state.log_history if trainer else [],
            "processes": trainer.args.world_size if trainer else 1,
            "torch": torch.__version__}
