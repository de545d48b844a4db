"""Typed configs of the training stages, one source of truth for the library, CLI and recipes.

`SFTConfig` (instruction tuning, docs/method.md §2) and `MergeConfig` (learning
the merge, §3) default to the paper's settings. Every field carries help text;
`add_arguments` turns a config class into argparse flags and `from_args` /
`from_dict` build a validated config from parsed flags or a YAML mapping.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

from xft.data import KINDS, TEMPLATES, DataConfig, get_template
from xft.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "bf16-pure", "fp16")
MERGE_METHODS = ("learned", "init", "uniform")


def _f(default, help: str, choices=None, flag: bool = True):
    """A dataclass field with help text (and optional choices) for the CLI."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


@dataclass(kw_only=True)
class CommonConfig:
    """Fields shared by both training stages: data, optimisation, run directory."""

    data: str | None = _f(None, "training data: JSONL, JSON or Parquet file, or a datasets.save_to_disk directory")
    out: str | None = _f(None, "output directory: the finished model (from_pretrained(OUT) loads it), with "
                                "checkpoints in OUT/checkpoint-N while training and logs in OUT/logs")
    # -- data
    kind: str = _f("auto", "record kind: instruction, chat (messages), prompt-completion (TRL), text "
                           "(pretraining) or auto", KINDS)
    instruction_field: str = _f("instruction", "data field holding the instruction")
    response_field: str = _f("response", "data field holding the response")
    messages_field: str = _f("messages", "data field holding a chat message list")
    text_field: str = _f("text", "data field holding plain text (kind text)")
    template: str = _f("magicoder", f"prompt template from xft.data.TEMPLATES ({', '.join(TEMPLATES)}; "
                                    "the paper's is magicoder; chat: the tokenizer's own chat template)")
    max_length: int = _f(1024, "truncate examples to this many tokens (paper: 1024)")
    subset: float | None = _f(None, "train on part of the data: a fraction in (0, 1] or a record count (> 1)")
    eval_data: str | None = _f(None, "validation data file (same formats as --data): its loss is logged")
    eval_fraction: float | None = _f(None, "hold out this fraction of --data (seeded) as validation data")
    eval_steps: int | None = _f(None, "compute the validation loss every this many steps (default: at every "
                                      "checkpoint save) and at the end")
    # -- optimisation (paper defaults, docs/method.md §2)
    epochs: float = _f(4.0, "number of passes over the data (ignored when --max-steps is set)")
    max_steps: int = _f(-1, "stop after this many optimizer steps (-1: run --epochs)")
    lr: float = _f(5e-5, "peak learning rate")
    lr_scheduler: str = _f("linear", "learning-rate schedule after warm-up (transformers scheduler name)")
    warmup_steps: int = _f(500, "linear warm-up steps")
    optimizer: str = _f("adafactor", "optimizer (transformers `optim` name, e.g. adafactor, adamw_torch)")
    weight_decay: float = _f(0.0, "weight decay")
    max_grad_norm: float = _f(0.0, "gradient clipping norm (0: no clipping, as the paper)")
    batch_size: int = _f(64, "global batch size in examples per optimizer step, over all processes")
    micro_batch_size: int | None = _f(None, "examples per process per forward pass (default: batch/(processes"
                                            "*grad-accum), at most 8)")
    grad_accum: int | None = _f(None, "gradient accumulation steps (default: derived from the batch sizes)")
    seed: int = _f(42, "random seed: data order, router init, router noise")
    precision: str = _f("auto", "auto (bf16 mixed precision on GPUs that support it, else fp32), fp32, "
                                "bf16 (mixed, fp32 weights), bf16-pure (bf16 weights, as the paper's code), "
                                "fp16 (mixed)", PRECISIONS)
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")
    # -- run directory and logging
    save_steps: int = _f(500, "save a resumable checkpoint every this many optimizer steps")
    save_total_limit: int = _f(2, "keep at most this many checkpoints")
    logging_steps: int = _f(10, "log loss, learning rate and expert load every this many steps")
    report_to: str = _f("none", "where else to log: none, tensorboard, wandb, ... (transformers report_to; "
                                "comma-separated for several); TensorBoard logs go to OUT/logs")
    num_workers: int = _f(0, "dataloader worker processes")
    keep_checkpoints: bool = _f(False, "keep OUT/checkpoint-N after the run finishes (default: delete them)")
    overwrite: bool = _f(False, "replace a finished or differently-configured run in OUT instead of stopping")
    progress: bool = _f(True, "show progress bars and the end-of-run summary")

    def data_config(self) -> DataConfig:
        """The `xft.data.DataConfig` these fields describe."""
        return DataConfig(path=self.data, kind=self.kind, instruction_field=self.instruction_field,
                          response_field=self.response_field, messages_field=self.messages_field,
                          text_field=self.text_field, template=self.template, max_length=self.max_length,
                          seed=self.seed, subset=self.subset, eval_path=self.eval_data,
                          eval_fraction=self.eval_fraction)

    def validate(self) -> None:
        """Raise UserError on values no run could use (checked before anything is loaded)."""
        for name in ("data", "out"):
            if not getattr(self, name):
                raise UserError(f"missing required setting: {name}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"{f.name} must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}")
        positive = ["batch_size", "max_length", "save_steps", "logging_steps"]
        optional = ("micro_batch_size", "grad_accum", "eval_steps")
        for name in positive + [n for n in optional if getattr(self, n) is not None]:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise UserError("set a positive number of epochs or max steps")
        if self.warmup_steps < 0:
            raise UserError(f"warmup steps must be 0 or more, got {self.warmup_steps}")
        if self.eval_data and self.eval_fraction:
            raise UserError("pass --eval-data or --eval-fraction, not both")
        if self.eval_fraction is not None and not 0 < self.eval_fraction < 1:
            raise UserError(f"eval fraction must be in (0, 1), got {self.eval_fraction}")
        get_template(self.template)  # UserError naming the registered templates
        check_report_to(self.report_to)


@dataclass(kw_only=True)
class SFTConfig(CommonConfig):
    """Instruction-tune a dense or MoE model (detected), optionally upcycling it first or with EWA."""

    model: str | None = _f(None, "dense or MoE model: a local directory, a finished xft run, or a Hub id", flag=False)
    ewa_share_rate: float = _f(0.0, "EWA baseline: after every optimizer step pull each expert toward the "
                                    "experts' mean by this rate, and average the experts at the end (0: off)")
    upcycle: bool = _f(False, "upcycle a dense MODEL to an MoE before training (else train it as it is)")
    num_experts: int = _f(8, "experts per layer when upcycling (paper: 8)")
    top_k: int = _f(6, "active experts per token, counting the shared one, when upcycling (paper: 6)")
    # Checked against the registries (xft.ROUTINGS / xft.ROUTERS) in validate(): listing them here would need
    # torch, which `xft train --help` does not load; `xft upcycle --help` lists them.
    routing: str = _f("xft", "routing when upcycling (an xft.ROUTINGS name: xft = the paper's shared expert with "
                             "normalized weights; see xft upcycle --help)")
    router: str = _f("mlp", "router when upcycling (an xft.ROUTERS name: mlp = the paper's)")

    def upcycle_config(self):
        """The `xft.UpcycleConfig` of `upcycle=True` (ConfigError on a bad value; imports torch)."""
        from xft.config import UpcycleConfig

        return UpcycleConfig(num_experts=self.num_experts, top_k=self.top_k, routing=self.routing,
                             router=self.router, seed=self.seed)

    def validate(self) -> None:
        super().validate()
        if not self.model:
            raise UserError("missing required setting: model")
        if not 0.0 <= self.ewa_share_rate <= 1.0:
            raise UserError(f"ewa share rate must be in [0, 1], got {self.ewa_share_rate}")
        if self.upcycle:
            self.upcycle_config()


@dataclass(kw_only=True)
class MergeConfig(CommonConfig):
    """Merge a trained MoE into a dense model: learn the mixing coefficients (or use fixed ones)."""

    moe: str | None = _f(None, "trained MoE: a local directory, a finished xft run, or a Hub id", flag=False)
    method: str = _f("learned", "learned (train the mixing logits), init (the initial coefficients), "
                                "uniform (plain average of all experts)", MERGE_METHODS)
    shared_weight: float = _f(0.75, "merge weight of the shared expert (lambda; paper: 0.75)")
    learn_shared_weight: bool = _f(False, "also learn the shared expert's weight (paper: fixed)")
    # Paper settings for the merge stage (docs/method.md §3) override the SFT defaults.
    epochs: float = _f(1.0, "passes over the data (paper: 1; ignored when --max-steps is set)")
    lr: float = _f(1e-5, "peak learning rate of the mixing logits (paper: 1e-5)")
    warmup_steps: int = _f(125, "linear warm-up steps (paper: 125)")

    def validate(self) -> None:
        if self.method != "learned":
            self.data = self.data or ""  # fixed-coefficient merges need no data
            if not self.out:
                raise UserError("missing required setting: out")
        else:
            if not self.data:
                raise UserError("method 'learned' trains on data: pass --data (or use --method init/uniform)")
            super().validate()
        if not self.moe:
            raise UserError("missing required setting: moe")
        if not 0.0 <= self.shared_weight <= 1.0:
            raise UserError(f"shared weight must be in [0, 1], got {self.shared_weight}")


# `report_to` integration -> (modules any one of which makes it work, pip package to install).
INTEGRATIONS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "neptune": (("neptune",), "neptune"),
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
    "codecarbon": (("codecarbon",), "codecarbon"),
    "swanlab": (("swanlab",), "swanlab"),
    "trackio": (("trackio",), "trackio"),
    "dagshub": (("dagshub",), "dagshub"),
    "azure_ml": (("azureml",), "azureml-core"),
    "flyte": (("flytekit",), "flytekit"),
}


def report_targets(report_to: str) -> list[str]:
    """The integrations named by `report_to` ("none" -> [], "a,b" -> ["a", "b"]); "all" stays as is."""
    names = [n.strip() for n in str(report_to).split(",") if n.strip()]
    return [] if names in ([], ["none"]) else names


def check_report_to(report_to: str) -> None:
    """UserError unless every integration in `report_to` is known and its package importable.

    Checked before anything is loaded: transformers would fail with a traceback
    once the model is built.
    """
    import importlib.util

    for name in report_targets(report_to):
        if name == "all":
            continue
        if name not in INTEGRATIONS:
            raise UserError(f"unknown --report-to {name!r}; choose none, all or one or more (comma-separated) "
                            f"of {', '.join(INTEGRATIONS)}")
        modules, package = INTEGRATIONS[name]
        if not any(importlib.util.find_spec(m) for m in modules):
            raise UserError(f"--report-to {name} needs the {package} package: pip install {package}")


# ---------------------------------------------------------------- argparse / dict bridge

def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _base_type(tp):
    """`int | None` -> int; plain types pass through."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
                  required: tuple[str, ...] = ()) -> None:
    """Add one `--flag` per field of config class `cls` (those marked flag=True), with its help.

    Fields named in `required` become required flags.
    """
    hints = _hints(cls)
    common = {f.name for f in dataclasses.fields(CommonConfig)}
    # --data and --out, then the stage's own fields (e.g. --method, --shared-weight), then the shared ones.
    def rank(f):
        return 0 if f.name in ("data", "out") else 1 if f.name not in common or f.name in cls.__annotations__ else 2
    own_first = sorted(dataclasses.fields(cls), key=rank)
    for f in own_first:
        if not f.metadata.get("flag", True) or f.name in skip:
            continue
        tp = _base_type(hints[f.name])
        name = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
            continue
        default_txt = "" if f.default is None else f" (default: {f.default})"
        parser.add_argument(name, type=tp, default=f.default, choices=f.metadata.get("choices"),
                            help=help_ + default_txt, required=f.name in required, metavar=f.name.upper() if not f.metadata.get("choices")
                            else None)


def from_args(cls, args: argparse.Namespace, **extra):
    """A config of class `cls` from parsed flags (unknown namespace entries are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(extra)
    return cls(**values)


def from_dict(cls, values: dict):
    """A config of class `cls` from a mapping (e.g. a YAML recipe); unknown keys are a UserError."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(k.replace("-", "_") for k in values) - names)
    if unknown:
        raise UserError(f"unknown {cls.__name__} setting(s): {', '.join(unknown)}")
    return cls(**{k.replace("-", "_"): v for k, v in values.items()})
