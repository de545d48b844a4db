"""`learn_merge`: merge a trained MoE back into a dense model (docs/method.md §3).

* "learned": `xft.build_merge_model` -> train only the mixing logits with the
  LM loss (paper: 1 epoch, lr 1e-5, 125 warm-up steps) -> `xft.compile_merge`;
* any other method of `xft.MERGE_METHODS` ("init": the initial coefficients,
  shared λ and routed (1-λ)/(N-1); "uniform": the plain average of all
  experts; or one registered at runtime): `xft.merge`, no training.

The result is a dense model of the MoE's original class and config, saved with
the tokenizer in `<out>` itself, and `merge_coefficients.json` next to its
weights: per layer the N coefficients (expert 0 = shared; null for a
tensor-level method, which has none) and, for "learned", the mixing logits, so
`xft.merge(moe, mixing_logits=...)` reproduces it.
"""

from __future__ import annotations

import time
import warnings

import transformers
from accelerate import PartialState

import xft
from xft.artifacts import atomic_write_json, copy_companions, resolve_model, servable_config
from xft.errors import UserError
from xft.merge import merge_inputs, merge_modules
from xft.modelcard import base_model_of, write_model_card
from xft.training import rundir
from xft.config import MergeConfig
from xft.training.stage import (
    card_results, common_rows, config_record, finalize, load_tokenizer, prepare_data, run_trainer, summary,
)
from xft.training.trainer import resolve_precision


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


def learn_merge(config: MergeConfig) -> str:
    """Merge the MoE `config.moe` into a dense model; return the path of the saved dense model.

    With method "learned", re-running the same config after an interruption
    resumes from the last checkpoint in `config.out`.
    """
    cfg = config
    cfg.validate()
    plan = rundir.prepare_stage(cfg, "merge", "merge")
    if plan.done:
        return plan.run.final
    run, resume = plan.run, plan.resume
    path = resolve_model(cfg.moe)
    if not xft.is_moe_checkpoint(path):
        raise UserError(f"{cfg.moe} is a dense model, not an xft MoE; train an upcycled model first")
    tokenizer = load_tokenizer(path)
    splits = warning = None
    if cfg.method == "learned":
        splits, collator, warning = prepare_data(cfg, tokenizer)
    dtype, mixed = resolve_precision(cfg.precision)
    transformers.set_seed(cfg.seed)
    moe = xft.load(path, dtype=dtype)
    moe_config = dict(moe.config.xft)

    trainer = output = None
    seconds, change = 0.0, None
    if cfg.method == "learned":
        identical = experts_identical(moe)
        model = xft.build_merge_model(moe, cfg.shared_weight, cfg.learn_shared_weight)
        start = xft.merge_coefficients(model)
        trainer, output, seconds = run_trainer(model, cfg, run, resume, splits, collator, tokenizer,
                                               stage="merge", is_moe=False, mixed=mixed)
        dense = xft.compile_merge(model)
        coefficients = xft.merge_coefficients(model)
        logits = {i: m.mixing_logits.detach().float().cpu().tolist() for i, m in merge_modules(model).items()}
        change = coefficient_change(start, coefficients)
        if change < STILL:
            warning = still_warning(change, cfg, trainer.state.global_step, identical)
            warnings.warn(warning, stacklevel=2)
    else:
        t0 = time.perf_counter()
        coefficients = fixed_coefficients(moe, cfg.method, cfg.shared_weight)
        dense = xft.merge(moe, shared_weight=cfg.shared_weight, method=cfg.method)
        logits, seconds = None, time.perf_counter() - t0
        if PartialState().is_main_process:
            rundir.start(run, cfg, "merge")
    record = coefficients_record(cfg, moe_config, coefficients, logits)
    if change is not None:
        record["max_change_from_init"] = change
    main = PartialState().is_main_process

    def save(tmp: str) -> None:
        if main:
            dense.save_pretrained(tmp)
            copy_companions(path, tmp, tokenizer)  # the MoE's (so the base's) tokenizer files, byte for byte
            servable_config(tmp)
            atomic_write_json(f"{tmp}/merge_coefficients.json", record)
            atomic_write_json(f"{tmp}/xft_training.json", config_record(cfg, "merge", splits, trainer, resume))
            write_card(tmp, cfg, path, trainer, change, run.final)

    final = finalize(run, save, keep_checkpoints=cfg.keep_checkpoints)
    if cfg.progress and main:
        n_params = sum(p.numel() for p in dense.parameters())
        rows = [("model saved to", final),
                ("dense model", f"{type(dense).__name__}, {n_params:,} parameters, from {cfg.moe}"
                                f"{' (resumed)' if resume else ''}"),
                ("method", f"{cfg.method}, shared weight {cfg.shared_weight}")]
        if coefficients is not None:
            first = [c[0] for c in coefficients.values()]
            others = max(max(c[1:]) for c in coefficients.values())
            rows.append(("coefficients", f"expert 0: {min(first):.4f}..{max(first):.4f}; "
                                         f"largest other expert {others:.4f} (merge_coefficients.json)"))
        if change is not None:
            rows.append(("learned", f"max change of a coefficient from its init: {change:.2e}"))
        if trainer is not None:
            rows += common_rows(cfg, trainer, output, seconds, splits, final, warning)[1:]
        print(summary("xft merge: done", rows), flush=True)
    return final


def write_card(directory: str, cfg: MergeConfig, moe_path: str, trainer, change: float | None,
               location: str) -> None:
    """The model card (README.md) of an `xft merge` output."""
    how = {"learned": "per-layer mixing coefficients learned on data (only they were trained)",
           "init": "the initial coefficients, no training"}.get(cfg.method, xft.MERGE_METHODS[cfg.method].help)
    shared = ("" if cfg.method == "uniform" else f" Shared expert weight λ = {cfg.shared_weight}"
              f"{' (learned per layer)' if cfg.learn_shared_weight else ''}.")
    details = (f"Merge method `{cfg.method}`: {how}.{shared} The coefficients are in "
               "merge_coefficients.json.")
    settings = {"merge method": cfg.method, "shared expert weight": None if cfg.method == "uniform" else
                cfg.shared_weight}
    results = {}
    if trainer is not None:
        settings.update({"learning rate": cfg.lr, "schedule": f"{cfg.lr_scheduler}, {cfg.warmup_steps} warm-up "
                         "steps", "optimizer": cfg.optimizer, "global batch": cfg.batch_size})
        results = {**card_results(trainer),
                   "max coefficient change from init": f"{change:.2e}" if change is not None else None}
    write_model_card(directory, kind="merged", base_model=base_model_of(moe_path), source=cfg.moe,
                     data=cfg.data.path if cfg.data else None, settings=settings, results=results, details=details,
                     location=location)

