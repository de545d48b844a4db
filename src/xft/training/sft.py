"""`train_sft`: instruction-tune a dense or MoE model (docs/method.md §2), and the EWA baseline.

The model at `config.model` is trained as it is: dense (the SFT baseline) or
an xft MoE (detected from its config). With `upcycle=True` a dense model is
upcycled first; with `ewa_share_rate > 0` the experts are pulled toward their
mean after every step and averaged into a dense model at the end (EWA).
"""

from __future__ import annotations

import transformers

import xft
from xft.artifacts import resolve_model
from xft.checkpoint import load_tokenizer
from xft.errors import UserError
from xft.modelcard import base_model_of, write_model_card
from xft.training import rundir
from xft.config import SFTConfig
from xft.training.stage import (
    Output, card_results, common_rows, config_record, prepare_data, print_summary, run_trainer,
    save_output,
)
from xft.training.trainer import resolve_precision


def build_model(cfg: SFTConfig, path: str, dtype):
    """The model to train: loaded (dense or MoE), upcycled first if `cfg.upcycle`."""
    transformers.set_seed(cfg.seed)
    model = xft.load(path, dtype=dtype, expert_impl=cfg.expert_impl)
    if cfg.upcycle:
        if xft.is_moe(model):
            raise UserError(f"{path} is already an MoE; drop --upcycle to train it")
        xft.upcycle(model, cfg.upcycle)
    if cfg.ewa_share_rate > 0 and not xft.is_moe(model):
        raise UserError("EWA (--ewa-share-rate) trains an MoE; upcycle the model first (or pass --upcycle)")
    return model


def train_sft(config: SFTConfig) -> str:
    """Instruction-tune `config.model` on `config.data`; return the path of the finished model.

    Re-running with the same config after an interruption resumes from the last
    checkpoint in `config.out`, and re-running it after it finished does nothing.
    The finished model (MoE, dense, or for EWA the averaged dense model) and its
    tokenizer are `config.out` itself.
    """
    cfg = config
    cfg.validate()
    plan = rundir.prepare_stage(cfg, "sft", "train")
    if plan.done:
        return plan.run.final
    run, resume = plan.run, plan.resume
    path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(path)
    splits, collator, warning = prepare_data(cfg, tokenizer)
    dtype, mixed = resolve_precision(cfg.precision)
    model = build_model(cfg, path, dtype)
    is_moe, use_cache = xft.is_moe(model), model.config.use_cache
    if cfg.gradient_checkpointing:
        model.config.use_cache = False

    trainer, output, seconds = run_trainer(model, cfg, run, resume, splits, collator, tokenizer, stage="sft",
                                           is_moe=is_moe, mixed=mixed, ewa_share_rate=cfg.ewa_share_rate)
    final_model = xft.average_experts(model) if cfg.ewa_share_rate > 0 else None
    kind = "ewa" if final_model is not None else "moe" if is_moe else "dense"
    saved = Output(source=path, tokenizer=tokenizer, use_cache=use_cache, dense=kind != "moe",
                   records={"xft_training.json": config_record(cfg, "sft", splits, trainer, resume)},
                   card=lambda tmp: write_card(tmp, cfg, path, kind, trainer, run.final))
    # EWA saves the averaged dense model (unsharded, see make_trainer), every other run the Trainer's.
    final = save_output(run, saved, trainer=trainer if final_model is None else None, model=final_model,
                        keep_checkpoints=cfg.keep_checkpoints)
    rows = common_rows(cfg, trainer, output, seconds, splits, final, warning, resume)
    described = {"ewa": "EWA-averaged dense", "moe": "MoE", "dense": "dense"}[kind]
    rows.insert(1, ("model", f"{described}, {sum(p.numel() for p in (final_model or model).parameters()):,} "
                             f"parameters, from {cfg.model}" + (" (resumed)" if resume else "")))
    print_summary(cfg, "xft train: done", rows)
    return final


def write_card(directory: str, cfg: SFTConfig, model_path: str, kind: str, trainer, location: str) -> None:
    """The model card (README.md) of an `xft train` output (`model_path`: the resolved `cfg.model`)."""
    up = cfg.upcycle
    settings = {"upcycled here": f"{up.num_experts} experts, top-{up.top_k}, routing {up.routing}" if up else None,
                "EWA share rate": cfg.ewa_share_rate if cfg.ewa_share_rate > 0 else None,
                "template": cfg.data.template, "epochs": cfg.epochs if cfg.max_steps <= 0 else None,
                "max steps": cfg.max_steps if cfg.max_steps > 0 else None, "learning rate": cfg.lr,
                "schedule": f"{cfg.lr_scheduler}, {cfg.warmup_steps} warm-up steps", "optimizer": cfg.optimizer,
                "global batch": cfg.batch_size, "max length": cfg.data.max_length}
    write_model_card(directory, kind=kind, base_model=base_model_of(model_path), source=cfg.model, data=cfg.data.path,
                     settings=settings, results=card_results(trainer), location=location)

