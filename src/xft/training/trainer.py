"""`transformers.Trainer` set up for XFT: paper defaults, MoE routing logs, EWA, compact progress.

Everything distributed (DDP, FSDP, DeepSpeed via `accelerate launch`), mixed
precision, checkpointing and resume comes from `Trainer`; this module only

* maps a config onto `TrainingArguments` (global batch -> micro batch x
  gradient accumulation x processes; precision chosen once, here);
* logs MoE routing: per logging step the mean balance loss and expert-load
  imbalance in the Trainer logs, and per-layer expert loads in
  `OUT/routing.jsonl` (the balance loss itself is already inside
  `outputs.loss`, added by the core's forward hook, token-weighted over the
  accumulation window);
* runs EWA's expert averaging step and `xft.balance_step` (aux-free bias
  update) after every optimizer step (callbacks);
* plans the run before it starts (`planned_steps`: the optimizer steps Trainer
  will take, from the data size) and keeps TensorBoard logs out of the
  checkpoint folder (`OUT/logs`, which survives the run);
* makes an FSDP launch on CPUs really shard (`fsdp_on_cpu`: accelerate would
  otherwise run it as plain gloo DDP).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.optimization import Adafactor
from transformers.trainer_callback import PrinterCallback, ProgressCallback

import xft
from xft.errors import UserError
from xft.merge import LearnableMerge
from xft.moe import MoEBlock
from xft.config import report_targets


# ---------------------------------------------------------------- arguments

_ARG_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}


def world_size() -> int:
    """Number of training processes of this launch (accelerate / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def batch_plan(batch_size: int, micro: int | None, accum: int | None, processes: int) -> tuple[int, int]:
    """(micro batch per process, gradient accumulation steps) giving global batch `batch_size`.

    micro x accum x processes must equal batch_size exactly (the paper's 64).
    """
    if batch_size % processes:
        raise UserError(f"batch size {batch_size} is not divisible by the {processes} processes")
    per = batch_size // processes
    if micro is not None and accum is not None:
        if micro * accum != per:
            raise UserError(f"micro batch {micro} x grad accum {accum} x {processes} processes = "
                            f"{micro * accum * processes}, but the batch size is {batch_size}")
        return micro, accum
    if micro is not None:
        if per % micro:
            raise UserError(f"micro batch {micro} does not divide the per-process batch {per}")
        return micro, per // micro
    if accum is not None:
        if per % accum:
            raise UserError(f"grad accum {accum} does not divide the per-process batch {per}")
        return per // accum, accum
    micro = max(d for d in range(1, min(per, 8) + 1) if per % d == 0)
    return micro, per // micro


def planned_steps(examples: int, cfg, processes: int) -> int:
    """Optimizer steps `Trainer` will run for `examples` training examples under config `cfg`.

    Trainer's own arithmetic: each process gets ceil(batches / processes) micro
    batches per epoch (accelerate repeats a few to even the last round), an
    epoch is ceil(micro batches / accumulation) steps, the run ceil(epochs x that).
    """
    if cfg.max_steps > 0:
        return cfg.max_steps
    micro, accum = batch_plan(cfg.batch_size, cfg.micro_batch_size, cfg.grad_accum, processes)
    batches = math.ceil(math.ceil(examples / micro) / processes)
    per_epoch = max(math.ceil(batches / accum), 1)
    return math.ceil(cfg.epochs * per_epoch)


def precision_used(precision: str) -> str:
    """The precision a config's `precision` means on this machine: "auto" is bf16 (mixed) on a CUDA GPU
    that supports it, else fp32; any other value is itself."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def resolve_precision(precision: str) -> tuple[torch.dtype, str | None]:
    """(dtype to load weights in, mixed-precision mode or None) for a config's `precision`.

    "bf16" is mixed precision: fp32 weights (and optimizer updates), forward and
    backward under bf16 autocast, on CPU as on GPU. "bf16-pure" loads bf16 weights.
    """
    return {"fp32": (torch.float32, None), "bf16": (torch.float32, "bf16"), "fp16": (torch.float32, "fp16"),
            "bf16-pure": (torch.bfloat16, None)}[precision_used(precision)]


def training_arguments(cfg, output_dir: str, micro: int, accum: int, mixed: str | None,
                       evaluate: bool = False, logging_dir: str | None = None,
                       evaluate_first: bool = False) -> TrainingArguments:
    """`TrainingArguments` for config `cfg` (an `xft.config.TrainConfig`).

    `evaluate`: compute the validation loss every `cfg.eval_steps` (default:
    every checkpoint save), and with `evaluate_first` also before the first
    step. `logging_dir`: where TensorBoard writes (transformers 4.x field; 5.x
    sets it on the callback, see `make_trainer`).
    """
    # Recompute activations in backward; non-reentrant so DDP's unused-parameter detection works.
    # (`activation_checkpointing` is the newer name of `gradient_checkpointing`.)
    ckpt = "activation_checkpointing" if "activation_checkpointing" in _ARG_FIELDS else "gradient_checkpointing"
    checkpointing = {ckpt: cfg.gradient_checkpointing,
                     f"{ckpt}_kwargs": {"use_reentrant": False} if cfg.gradient_checkpointing else None}
    # Several processes on a machine without CUDA (torchrun, accelerate launch --multi_gpu): without
    # use_cpu they would not join a process group and would each train alone; with it they use gloo.
    # bf16 mixed precision on CPU: Trainer refuses bf16 without a GPU unless told it trains on the CPU.
    use_cpu = not torch.cuda.is_available() and (world_size() > 1 or mixed == "bf16")
    if mixed == "fp16" and not torch.cuda.is_available():
        raise UserError("--precision fp16 (mixed, with a loss scaler) needs a CUDA GPU; on CPU use bf16 "
                        "(mixed) or bf16-pure")
    extra = dict(checkpointing)
    if evaluate:
        extra.update(eval_strategy="steps", eval_steps=cfg.eval_steps or cfg.save_steps,
                     per_device_eval_batch_size=micro, prediction_loss_only=True,  # loss only: no logits kept
                     eval_on_start=evaluate_first)
    if logging_dir and "logging_dir" in _ARG_FIELDS:
        extra["logging_dir"] = logging_dir
    try:
        args = _training_arguments(cfg, output_dir, micro, accum, mixed, extra, use_cpu)
    except ValueError as e:  # e.g. an unknown --optimizer or --lr-scheduler name
        raise UserError(f"invalid training setting: {str(e).splitlines()[0]}") from None
    if args.world_size != world_size():
        raise UserError(f"{world_size()} processes were launched but training sees {args.world_size}; "
                        "launch with torchrun or accelerate launch (see docs/training.md)")
    return args


def _training_arguments(cfg, output_dir, micro, accum, mixed, extra, use_cpu) -> TrainingArguments:
    return TrainingArguments(
        **extra,
        use_cpu=use_cpu,
        output_dir=output_dir,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        optim=cfg.optimizer,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=mixed == "bf16",
        fp16=mixed == "fp16",
        # Every MoE parameter gets a gradient each step, even an expert that received no token (its
        # slice of the stacked tensor is zero), so DDP needs no search for unused parameters.
        ddp_find_unused_parameters=False,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        report_to=report_targets(cfg.report_to),
        disable_tqdm=not cfg.progress,
        dataloader_num_workers=cfg.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        include_num_input_tokens_seen=True,
    )


# ---------------------------------------------------------------- routing logs

class RoutingMeter:
    """Averages `xft.routing_stats` over the training forwards between two log steps."""

    def __init__(self):
        self.sums: dict[int, dict[str, torch.Tensor]] = {}
        self.count = 0

    def add(self, stats: dict[int, dict[str, torch.Tensor]]) -> None:
        if not stats:
            return
        for layer, s in stats.items():
            acc = self.sums.setdefault(layer, {})
            for key, value in s.items():
                v = value.detach().float()  # stays on its device: no sync per micro-batch
                acc[key] = acc[key] + v if key in acc else v
        self.count += 1

    def flush(self) -> tuple[dict[str, float], dict[int, dict]]:
        """(scalar logs, per-layer detail) averaged since the last flush; resets the meter."""
        if not self.count:
            return {}, {}
        layers = {}
        for layer, acc in self.sums.items():
            acc = {k: v.cpu() for k, v in acc.items()}
            load = acc["load"] / self.count  # [R] tokens routed to each expert (noise-smoothed)
            share = (load / load.sum().clamp_min(1e-9)).tolist()  # fraction of routed tokens per expert
            layers[layer] = {"load_share": [round(x, 5) for x in share],
                             "balance_loss": float(acc["balance_loss"]) / self.count}
            if "bias_spread" in acc:  # aux_free: max - min of the selection bias
                layers[layer]["bias_spread"] = float(acc["bias_spread"]) / self.count
        self.sums, self.count = {}, 0
        num = len(next(iter(layers.values()))["load_share"])
        logs = {
            "balance_loss": sum(v["balance_loss"] for v in layers.values()),
            # busiest expert's share relative to a perfectly even split (1.0 = balanced), worst layer
            "max_expert_load": max(max(v["load_share"]) for v in layers.values()) * num,
        }
        spreads = [v["bias_spread"] for v in layers.values() if "bias_spread" in v]
        if spreads:
            logs["bias_spread"] = max(spreads)  # worst layer
        return logs, layers


class XFTTrainer(Trainer):
    """`Trainer` that also logs MoE routing statistics (no change to the loss or the loop)."""

    def __init__(self, *args, routing_log: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._meter = RoutingMeter()
        self._routing_log = routing_log
        if self.is_deepspeed_enabled:
            zero3_leaves(self.model)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if fsdp_on_cpu(self.accelerator, self.args):
            self.is_fsdp_enabled = True

    def get_optimizer_cls_and_kwargs(self, args, model=None):  # a staticmethod in Trainer
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        if self.is_fsdp_enabled and cls is Adafactor:
            cls = WholeTensorAdafactor
        return cls, kwargs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self._meter.add(xft.routing_stats(self.model))
        return result

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            scalars, layers = self._meter.flush()
            logs.update({k: round(v, 6) for k, v in scalars.items()})
            if layers and self._routing_log and self.is_world_process_zero():
                with open(self._routing_log, "a") as f:
                    f.write(json.dumps({"step": self.state.global_step, "layers": layers}) + "\n")
        super().log(logs, start_time)


# ---------------------------------------------------------------- sharding

def fsdp_requested(args: TrainingArguments) -> bool:
    """Whether this launch asks for FSDP: `accelerate launch` with an FSDP config, or TrainingArguments.fsdp."""
    return args.fsdp_plugin_args is not None or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_on_cpu(accelerator, args: TrainingArguments) -> bool:
    """Make a multi-process CPU launch that asks for FSDP run FSDP; True if it did.

    accelerate turns a launch into FSDP only on GPU-like devices (`AcceleratorState`);
    on CPUs the processes silently run as gloo DDP, each holding the whole model,
    whatever the config says. FSDP2's `fully_shard` works on CPU with gloo, so the
    state is switched to FSDP here, before the model is prepared, with the plugin
    accelerate would have built (from the launch's config) and its mixed precision.
    Then `accelerator.prepare` shards the model as on GPUs: each decoder layer (from
    `_no_split_modules`; an MoE block's stacked experts live inside it) is one unit.
    """
    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or not fsdp_requested(args):
        return False
    plugin = FullyShardedDataParallelPlugin(**(args.fsdp_plugin_args or {}))
    if plugin.fsdp_version != 2:
        raise UserError("FSDP on CPU needs FSDP2 (fsdp_version: 2 in the accelerate config, as in "
                        "`python -m xft.configs fsdp`)")
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    # Both shared states: every later `AcceleratorState()` copies PartialState's fields over its own.
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    return True


def zero3_leaves(model: torch.nn.Module) -> list[type]:
    """Register xft's MoE and learnable-merge blocks in `model` as DeepSpeed ZeRO-3 leaf modules.

    ZeRO-3 gathers a module's parameters when that module is called, and
    prefetches by the order modules were called before. An MoE block reads its
    stacked experts directly (their container is never called) and its experts
    run in a data-dependent order; a learnable merge reads the stacks the same
    way. As leaves, each block is gathered whole when it is entered. Returns the
    classes registered (those present in `model`).
    """
    from deepspeed.utils import set_z3_leaf_modules

    classes = [c for c in (MoEBlock, LearnableMerge)
               if any(isinstance(m, c) for m in model.modules())]
    if classes:
        set_z3_leaf_modules(model, classes)
    return classes


class WholeTensorAdafactor(Adafactor):
    """transformers' Adafactor (the paper's optimizer) for FSDP2-sharded (DTensor) parameters.

    Adafactor's statistics are means over a matrix's rows and columns and the RMS
    of its whole update, which one shard does not have (and transformers' step
    mixes DTensors with plain tensors). So each parameter is gathered with its
    gradient, one at a time, updated by the unchanged Adafactor step, and its own
    shard written back: the same update as on one process. The factored state (a
    row and a column vector per matrix) is kept whole on every process; it is
    small. Cost: one all-gather of each parameter and gradient per optimizer step,
    and one whole parameter in memory at a time.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        groups = self.param_groups
        try:
            for group in groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self._step_whole(group, p)
        finally:
            self.param_groups = groups
        return loss

    def _step_whole(self, group: dict, p: torch.Tensor) -> None:
        if not isinstance(p, DTensor):
            self.param_groups = [{**group, "params": [p]}]
            super().step()
            return
        whole = p.full_tensor()  # a collective: every process visits the parameters in the same order
        whole.grad = p.grad.full_tensor()
        if p in self.state:
            self.state[whole] = self.state.pop(p)
        self.param_groups = [{**group, "params": [whole]}]
        super().step()
        self.state[p] = self.state.pop(whole)
        # This process's shard of the updated tensor (src_data_rank=None: cut locally, no communication).
        p.to_local().copy_(distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local())


# ---------------------------------------------------------------- callbacks

class EWACallback(TrainerCallback):
    """EWA (docs/method.md §3): after every optimizer step, pull each expert toward the experts' mean."""

    def __init__(self, share_rate: float):
        self.share_rate = share_rate

    def on_step_end(self, args, state, control, model=None, **kwargs):
        xft.ewa_step(model, self.share_rate)


class BalanceCallback(TrainerCallback):
    """After every optimizer step: `xft.balance_step` (aux-free bias update; ends a global-scope step)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        xft.balance_step(model)


class CompactProgress(ProgressCallback):
    """The Trainer's progress bar (with ETA), printing one short line per log step."""

    # Grad norms print in 3 significant digits: a learned merge's are ~1e-5, which a fixed-point
    # format would show as 0.000 while the model is changing.
    KEYS = (("loss", "loss {:.4f}"), ("eval_loss", "validation loss {:.4f}"), ("learning_rate", "lr {:.2e}"),
            ("balance_loss", "balance {:.4f}"), ("max_expert_load", "max load {:.2f}x"),
            ("bias_spread", "bias spread {:.3g}"), ("grad_norm", "grad {:.3g}"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "loss" not in logs and "eval_loss" not in logs:
            return
        parts = [f"step {state.global_step}/{state.max_steps}"]
        parts += [fmt.format(logs[k]) for k, fmt in self.KEYS
                  if isinstance(logs.get(k), (int, float)) and math.isfinite(logs[k])]
        self.training_bar.write(" | ".join(parts))


def make_trainer(model, args: TrainingArguments, dataset, collator, tokenizer, *, ewa_share_rate: float = 0.0,
                 routing_log: str | None = None, progress: bool = True, eval_dataset=None,
                 logging_dir: str | None = None, trainer_cls: type[XFTTrainer] = XFTTrainer,
                 **trainer_kwargs) -> XFTTrainer:
    """An `XFTTrainer` (or `trainer_cls`, given `trainer_kwargs`) with the compact progress display and, if
    asked, EWA and a validation set.

    TensorBoard writes to `logging_dir` (unless TENSORBOARD_LOGGING_DIR says otherwise): its default
    is inside `args.output_dir`, the checkpoint folder, which is deleted when the run finishes.
    """
    callbacks = [EWACallback(ewa_share_rate)] if ewa_share_rate > 0 else []
    if xft.is_moe(model):
        callbacks.append(BalanceCallback())
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, data_collator=collator,
                          eval_dataset=eval_dataset, processing_class=tokenizer, callbacks=callbacks,
                          routing_log=routing_log, **trainer_kwargs)
    for cb in trainer.callback_handler.callbacks:
        if type(cb).__name__ == "TensorBoardCallback" and logging_dir and getattr(cb, "logging_dir", None) is None:
            cb.logging_dir = logging_dir
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if progress:
        trainer.add_callback(CompactProgress())
    if trainer.is_deepspeed_enabled and args.optim == "adafactor":
        warnings.warn("DeepSpeed hands the optimizer flat 1-D partitions of the parameters, so Adafactor keeps no "
                      "factored row/column statistics there and updates differently from one process; for the "
                      "paper's Adafactor use FSDP (python -m xft.configs fsdp), or pass --optimizer adamw_torch",
                      stacklevel=2)
    if ewa_share_rate > 0 and (trainer.is_fsdp_enabled or _is_zero3(trainer)):
        raise UserError("EWA needs whole (unsharded) expert weights on every process; "
                        "use DDP, not FSDP or DeepSpeed ZeRO-3")
    return trainer


def _is_zero3(trainer: Trainer) -> bool:
    if not trainer.is_deepspeed_enabled:
        return False
    plugin = trainer.accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3
