"""Every config of xft, typed and validated on construction, and the one bridge to flags, YAML and `--set`.

* `UpcycleConfig`: how a dense model becomes an XFT MoE (docs/method.md §1);
  saved into the MoE's `config.json` under ``"xft"`` so `xft.load` rebuilds it.
* `DataConfig`: where training data is and how records become examples.
* `DecodingConfig`: how `xft eval` generates.
* `TrainConfig` and its stages `SFTConfig` (instruction tuning, §2) and
  `MergeConfig` (learning the merge, §3), with the paper's defaults. They
  compose the others: `SFTConfig.upcycle: UpcycleConfig | None`,
  `TrainConfig.data: DataConfig`.

Each field is declared once with `setting(default, help, choices=...)`;
choices that live in a registry are given as a function returning it, read
only when needed (so importing this module loads no torch).

The bridge: a config class has one *flat* namespace of settings, its own
fields plus those of the configs it composes (`xft train --num-experts`,
recipe key `train.num_experts`, `--set train.num_experts=4` all name
`SFTConfig.upcycle.num_experts`). `add_arguments` makes flags of it,
`from_flat` builds a validated config from a flat mapping (parsed flags, a
YAML section) and `to_flat` is its inverse, used for run records.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import importlib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields

from xft.errors import UserError
from xft.merge_methods import MERGE_METHODS, TIES_DENSITY, TIES_SCALE  # torch-free; it imports no xft.config


class ConfigError(UserError, ValueError):
    """An invalid configuration value or combination."""


def setting(default=MISSING, help: str = "", *, choices=None, flag: bool = True, flat: dict | None = None):
    """A config field with its one-line help.

    choices: the allowed values, or a function returning them (a registry, read on first use).
    flag: False for fields that are not settings of their own (positional arguments, derived values).
    flat: for a field holding a composed config, renames of its settings in the flat namespace
    (e.g. {"path": "data"}).
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "flat": flat or {}}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


def registry(module: str, name: str):
    """`choices` of a setting: the names of registry `module.name`, imported when first needed."""
    return lambda: tuple(getattr(importlib.import_module(module), name))


def registry_value(read, base=str):
    """argparse `type` of a registry setting: `base(text)`, checked against the registry `read()` returns.

    The registries live with the torch code they name; reading them while building a
    parser would make every `--help` import torch (~2 s), and argparse reads any
    `choices` to format help. A `type` runs only when the flag is given.
    """
    def convert(text):
        value, allowed = base(text), tuple(read())
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"invalid choice {value!r}; choose from {', '.join(map(str, allowed))}")
        return value
    convert.__name__ = base.__name__  # argparse names the type in its own messages
    return convert


def choices_of(f: dataclasses.Field) -> tuple | None:
    """The allowed values of field `f` (a registry is read now), or None if any value of its type goes."""
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def setting_of(cls, name: str):
    """A fresh field declaring what setting `name` of config class `cls` declares (default, help, choices):
    for a place that offers the same setting under its own section (a recipe's `eval`)."""
    f = cls.__dataclass_fields__[name]
    return setting(f.default, f.metadata["help"], choices=f.metadata["choices"])


def check_choices(config) -> None:
    """ConfigError unless every field of dataclass `config` with `choices` holds one of them."""
    for f in fields(config):
        if getattr(config, f.name) is None and f.default is None:
            continue  # an optional setting left unset (e.g. expert_impl: the model's own); no registry read
        allowed = choices_of(f)
        if allowed is not None and getattr(config, f.name) not in allowed:
            raise ConfigError(f"{f.name}={getattr(config, f.name)!r}; expected one of {', '.join(map(str, allowed))}")


# ---------------------------------------------------------------- upcycling


@dataclass
class UpcycleConfig:
    """How to upcycle every FFN of a dense model into an MoE block (docs/method.md §1)."""

    num_experts: int = setting(8, "experts per layer N, each a copy of the dense FFN (the shared expert counts "
                                  "as one)")
    top_k: int = setting(6, "experts active per token K, counting the shared expert when there is one")
    routing: str = setting("xft", "'xft' (shared expert + routing-weight normalization), 'sparse' (no shared "
                                  "expert, Mixtral-style top-k), or 'unnormalized' (shared expert, raw "
                                  "probabilities)", choices=registry("xft.routing", "ROUTINGS"))
    router: str = setting("mlp", "'mlp' (Linear -> tanh -> Linear, as in the paper's code) or 'linear'",
                          choices=registry("xft.routing", "ROUTERS"))
    noisy_gating: bool = setting(True, "add learned Gaussian noise to the router logits during training "
                                       "(Shazeer et al.)")
    balance_loss_weight: float = setting(0.01, "weight of the per-layer load-balancing loss cv²(importance) + "
                                               "cv²(load) (with --balance switch: its α); 0 disables it")
    balance: str = setting("cv2", "load balancing: 'cv2' (the paper: cv²(importance) + cv²(load)), 'switch' "
                                  "(Fedus et al.: R·Σ f_i·P_i) or 'aux_free' (no loss: a per-expert bias on "
                                  "the selection scores, moved toward balance after each optimizer step; "
                                  "DeepSeek-V3)", choices=registry("xft.routing", "BALANCES"))
    balance_scope: str = setting("micro_batch", "statistics the balance loss is computed on: 'micro_batch' "
                                                "(each forward's) or 'global' (summed over the optimizer step's "
                                                "micro-batches and data-parallel processes)",
                                 choices=registry("xft.routing", "BALANCE_SCOPES"))
    balance_bias_rate: float = setting(1e-3, "aux_free: the step γ of each expert's selection bias per optimizer "
                                             "step, b_i += γ·sign(mean load − load_i)")
    load_estimate: str = setting("corrected", "noisy-gate load estimate: 'corrected' (Shazeer et al.) or "
                                              "'faithful' (the paper's code, which compares the noise term "
                                              "alone with the top-k threshold)",
                                 choices=registry("xft.routing", "LOAD_ESTIMATES"))
    expert_impl: str = setting("auto", "expert compute: 'fast' (recognised gated/plain MLPs, a matmul loop over "
                                       "experts), 'grouped_mm' (recognised MLPs, one torch._grouped_mm per "
                                       "layer: the GPU fast path), 'generic' (torch.func.functional_call on any "
                                       "FFN module), or 'auto' (grouped_mm on CUDA when the sizes fit, else fast; "
                                       "generic for FFNs it does not recognise); not part of the model: "
                                       "xft.load(path, expert_impl=...) overrides it",
                               choices=registry("xft.moe", "EXPERT_IMPLS"))
    seed: int = setting(0, "seed for the routers' random initialisation (and the drop init's draws)")
    init: str = setting("copy", "how the experts start from the dense FFN: 'copy' (identical copies, the paper), "
                                "'drop' (Drop-Upcycling: each routed expert re-draws a fraction drop_rate of its "
                                "neurons) or 'granular' (each copy split into granularity experts of 1/G the "
                                "intermediate size, top-k scaled by G); docs/method.md",
                        choices=registry("xft.inits", "INITS"))
    drop_rate: float | None = setting(None, "init 'drop' only: fraction in [0, 1] of each routed expert's "
                                            "intermediate neurons re-initialised (default 0.5, the paper's)")
    granularity: int | None = setting(None, "init 'granular' only (required there): fine-grained experts G per "
                                            "expert; G must divide the FFN's intermediate size")

    def __post_init__(self):
        try:
            check_choices(self)
        except ConfigError as e:
            raise ConfigError(f"invalid upcycle config: {e}") from None

        def bad(msg):
            raise ConfigError(f"invalid upcycle config: {msg}")

        if self.num_experts < 2:
            bad(f"num_experts={self.num_experts}; need at least 2 experts")
        if self.top_k > self.num_experts:
            bad(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.shared_expert and self.top_k < 2:
            bad(f"top_k={self.top_k} with routing={self.routing!r}: top_k counts the shared expert, "
                "so it must be at least 2 (the shared expert plus one routed expert)")
        if self.top_k < 1:
            bad(f"top_k={self.top_k}; must be at least 1")
        if self.balance_loss_weight < 0:
            bad(f"balance_loss_weight={self.balance_loss_weight}; must be >= 0")
        if not 0 <= self.balance_bias_rate < float("inf"):
            bad(f"balance_bias_rate={self.balance_bias_rate}; must be a finite number >= 0")
        if self.balance_method.selection_bias and self.balance_bias_rate == 0:
            bad(f"balance={self.balance!r} with balance_bias_rate=0 never moves its selection bias; for no load "
                "balancing at all use balance='cv2' with balance_loss_weight=0")
        self._check_init(bad)

    def _check_init(self, bad) -> None:
        """`drop_rate` and `granularity` belong to their init, with values it can use."""
        if self.init == "drop" and self.drop_rate is None:
            self.drop_rate = 0.5  # Drop-Upcycling's recommended rate
        if self.drop_rate is not None and self.init != "drop":
            bad(f"drop_rate={self.drop_rate} applies only to init='drop' (init={self.init!r})")
        if self.drop_rate is not None and not (type_ok(self.drop_rate, float) and 0 <= self.drop_rate <= 1):
            bad(f"drop_rate={self.drop_rate!r}; must be a fraction in [0, 1]")
        if self.granularity is not None and self.init != "granular":
            bad(f"granularity={self.granularity} applies only to init='granular' (init={self.init!r})")
        if self.init == "granular" and not (type_ok(self.granularity, int) and self.granularity >= 1):
            bad(f"init='granular' needs granularity=G, an integer >= 1 (got {self.granularity!r})")

    @property
    def scheme(self):
        """The `xft.routing.Routing` this config names: the one place the shared-expert arithmetic lives."""
        from xft.routing import ROUTINGS

        return ROUTINGS[self.routing]

    @property
    def balance_method(self):
        """The `xft.routing.Balance` this config names."""
        from xft.routing import BALANCES

        return BALANCES[self.balance]

    @property
    def shared_expert(self) -> bool:
        """Whether expert 0 is a shared expert that every token goes through."""
        return self.scheme.has_shared_expert

    @property
    def first_routed(self) -> int:
        """Index of the first routed expert (1 behind the shared expert, else 0)."""
        return self.scheme.first_routed

    @property
    def shards(self) -> int:
        """Stacked experts per expert: G with init 'granular' (each expert split G ways, xft.inits), else 1."""
        return self.granularity if self.init == "granular" else 1

    @property
    def num_routed(self) -> int:
        """Number of routed experts (the router's output size): R, or R·G for a granular init."""
        return self.scheme.num_routed(self.num_experts) * self.shards

    @property
    def routed_top_k(self) -> int:
        """Routed experts selected per token: k, or k·G for a granular init."""
        return self.scheme.routed_k(self.top_k) * self.shards

    def to_dict(self) -> dict:
        """Plain dict for `config.json`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UpcycleConfig":
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown xft config fields {unknown}; known: {sorted(known)}")
        return cls(**d)


# ---------------------------------------------------------------- data

KINDS = ("auto", "instruction", "chat", "prompt-completion", "text")


@dataclass
class DataConfig:
    """Where the data is and how to turn it into training examples (`xft.data`)."""

    path: str = setting(help="training data: JSONL, JSON or Parquet file, or a datasets.save_to_disk directory")
    kind: str = setting("auto", "record kind: instruction, chat (messages), prompt-completion (TRL), text "
                                "(pretraining, loss on all tokens) or auto (detected from the first record)",
                        choices=KINDS)
    instruction_field: str = setting("instruction", "data field holding the instruction")
    response_field: str = setting("response", "data field holding the response")
    messages_field: str = setting("messages", "data field holding a chat message list")
    text_field: str = setting("text", "data field holding plain text (kind text)")
    template: str = setting("magicoder", "prompt template (the paper's is magicoder; chat: the tokenizer's own "
                                         "chat template)", choices=registry("xft.data", "TEMPLATES"))
    max_length: int = setting(1024, "truncate examples to this many tokens (paper: 1024)")
    seed: int = setting(42, "seed of the shuffle and of the subset (in a training config: its seed)")
    subset: float | None = setting(None, "use only part of the data: a fraction in (0, 1] or a record count (> 1)")
    eval_path: str | None = setting(None, "validation data file (same formats): its loss is logged")
    eval_fraction: float | None = setting(None, "hold out this fraction of the data (seeded) as validation data")

    def __post_init__(self):
        check_choices(self)
        if not self.path:
            raise ConfigError("missing required setting: data")
        if self.max_length < 1:
            raise ConfigError(f"max_length must be at least 1, got {self.max_length}")
        if self.eval_path and self.eval_fraction:
            raise ConfigError("pass --eval-data or --eval-fraction, not both")
        if self.eval_fraction is not None and not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval fraction must be in (0, 1), got {self.eval_fraction}")
        if self.subset is not None and self.subset <= 0:
            raise ConfigError(f"subset must be a fraction in (0, 1] or a record count, got {self.subset}")


# ---------------------------------------------------------------- running a model

def _expert_impl_override():
    """The `expert_impl` setting of every command that runs a model (train, merge, eval; upcycle records it)."""
    return setting(None, "expert kernel of an MoE for this run: fast, grouped_mm, generic or auto (default: the one "
                         "its config.json records; see xft upcycle --expert-impl); changes speed, not results",
                   choices=registry("xft.moe", "EXPERT_IMPLS"))


def sandbox_levels() -> tuple[str, ...]:
    """`auto` (the strongest level this machine has) and the levels of the sandbox's registry."""
    return ("auto", *registry("xft.eval.sandbox", "LEVELS")())


@dataclass
class ExecutionConfig:
    """How `xft eval` runs the answers' tests."""

    sandbox: str = setting("auto", "isolation level of the sandbox the tests run in: auto (the strongest "
                                   "available), namespaces, userns or rlimits (docs/evaluation.md)",
                           choices=sandbox_levels)

    def __post_init__(self):
        check_choices(self)


# ---------------------------------------------------------------- evaluation

@dataclass
class DecodingConfig:
    """How `xft eval` generates answers; recorded in results.json."""

    prompt_style: str = setting("instruction", "instruction: the prompt in the template the model was trained "
                                               "with (instruction-tuned models); completion: continue the code "
                                               "prompt (base models)", choices=("instruction", "completion"))
    template: str = setting("magicoder", "instruction style: the template the model was trained with (chat: the "
                                         "tokenizer's own chat template)", choices=registry("xft.data", "TEMPLATES"))
    n_samples: int = setting(1, "samples per task (pass@k needs n >= k)")
    temperature: float = setting(0.0, "sampling temperature; 0 = greedy decoding")
    top_p: float = setting(0.95, "nucleus mass when sampling")
    max_new_tokens: int = setting(512, "generation length cap")
    batch_size: int = setting(8, "prompts per generate call (results do not depend on it)")
    seed: int = setting(0, "sampling seed")
    backend: str = setting("hf", "hf: transformers generate; vllm: vLLM (GPU, dense models, optional extra)",
                           choices=("hf", "vllm"))
    expert_impl: str | None = _expert_impl_override()

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """ConfigError on settings no generation could use."""
        check_choices(self)
        if self.n_samples < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("--n-samples, --batch-size and --max-new-tokens must be positive")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("--temperature must be >= 0 and --top-p in (0, 1]")
        if self.temperature == 0 and self.n_samples > 1:
            raise ConfigError("greedy decoding (--temperature 0) gives identical samples: "
                              "set --temperature > 0 for --n-samples > 1")


# ---------------------------------------------------------------- training stages

PRECISIONS = ("auto", "fp32", "bf16", "bf16-pure", "fp16")
DATA_FLAT = {"path": "data", "eval_path": "eval_data"}  # `--data FILE`, `--eval-data FILE`


@dataclass(kw_only=True)
class TrainConfig:
    """What every training stage shares: output directory, data, optimisation, logging."""

    out: str = setting(help="output directory: the finished model (from_pretrained(OUT) loads it), with "
                            "checkpoints in OUT/checkpoint-N while training and logs in OUT/logs")
    data: DataConfig | None = setting(None, "training data (a file path is short for DataConfig(path=...))",
                                      flat=DATA_FLAT)
    eval_steps: int | None = setting(None, "compute the validation loss every this many steps (default: at "
                                           "every checkpoint save) and at the end")
    # -- optimisation (paper defaults, docs/method.md §2)
    epochs: float = setting(4.0, "number of passes over the data (ignored when --max-steps is set)")
    max_steps: int = setting(-1, "stop after this many optimizer steps (-1: run --epochs)")
    lr: float = setting(5e-5, "peak learning rate")
    lr_scheduler: str = setting("linear", "learning-rate schedule after warm-up (transformers scheduler name)")
    warmup_steps: int = setting(500, "linear warm-up steps")
    optimizer: str = setting("adafactor", "optimizer (transformers `optim` name, e.g. adafactor, adamw_torch)")
    weight_decay: float = setting(0.0, "weight decay")
    max_grad_norm: float = setting(0.0, "gradient clipping norm (0: no clipping, as the paper)")
    batch_size: int = setting(64, "global batch size in examples per optimizer step, over all processes")
    micro_batch_size: int | None = setting(None, "examples per process per forward pass (default: "
                                                 "batch/(processes*grad-accum), at most 8)")
    grad_accum: int | None = setting(None, "gradient accumulation steps (default: derived from the batch sizes)")
    seed: int = setting(42, "random seed: data order, router init, router noise")
    precision: str = setting("auto", "auto (bf16 mixed precision on GPUs that support it, else fp32), fp32, "
                                     "bf16 (mixed, fp32 weights), bf16-pure (bf16 weights, as the paper's code), "
                                     "fp16 (mixed, CUDA GPUs only); the one used is recorded in "
                                     "xft_training.json", choices=PRECISIONS)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass to save memory")
    # -- output directory and logging
    save_steps: int = setting(500, "save a resumable checkpoint every this many optimizer steps")
    save_total_limit: int = setting(2, "keep at most this many checkpoints")
    logging_steps: int = setting(10, "log loss, learning rate and expert load every this many steps")
    report_to: str = setting("none", "where else to log: none, tensorboard, wandb, ... (transformers report_to; "
                                     "comma-separated for several); TensorBoard logs go to OUT/logs")
    num_workers: int = setting(0, "dataloader worker processes")
    keep_checkpoints: bool = setting(False, "keep OUT/checkpoint-N after the run finishes (default: delete them)")
    overwrite: bool = setting(False, "replace the output of another command in OUT instead of stopping")
    progress: bool = setting(True, "show progress bars and the end-of-run summary")
    expert_impl: str | None = _expert_impl_override()

    def __post_init__(self):
        if isinstance(self.data, (str, bytes)) or hasattr(self.data, "__fspath__"):
            self.data = DataConfig(path=str(self.data))
        if self.data is not None:
            self.data.seed = self.seed  # the data order is the run's: one seed per run
        self.validate()

    def validate(self) -> None:
        """ConfigError on values no run could use (construction calls it; again after changing fields)."""
        if not self.out:
            raise ConfigError("missing required setting: out")
        check_choices(self)
        optional = ("micro_batch_size", "grad_accum", "eval_steps")
        for name in ["batch_size", "save_steps", "logging_steps"] + [n for n in optional
                                                                    if getattr(self, n) is not None]:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError("set a positive number of epochs or max steps")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup steps must be 0 or more, got {self.warmup_steps}")
        check_report_to(self.report_to)


@dataclass(kw_only=True)
class SFTConfig(TrainConfig):
    """Instruction-tune a dense or MoE model (detected), optionally upcycling it first or with EWA."""

    model: str = setting(help="dense or MoE model: a local directory, a finished xft output, or a Hub id",
                         flag=False)
    upcycle: UpcycleConfig | None = setting(None, "upcycle a dense MODEL to an MoE before training (else train "
                                                  "it as it is); True is short for UpcycleConfig()")
    ewa_share_rate: float = setting(0.0, "EWA baseline: after every optimizer step pull each expert toward the "
                                         "experts' mean by this rate, and average the experts at the end (0: off)")

    def __post_init__(self):
        if self.upcycle is True:
            self.upcycle = UpcycleConfig()
        elif self.upcycle is False:
            self.upcycle = None
        if self.upcycle is not None:
            self.upcycle.seed = self.seed  # the routers' init follows the run's seed
            if self.expert_impl is not None:  # one --expert-impl: the run's kernel is the upcycled MoE's
                self.upcycle.expert_impl = self.expert_impl
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if not self.model:
            raise ConfigError("missing required setting: model")
        if self.data is None:
            raise ConfigError("missing required setting: data")
        if not 0.0 <= self.ewa_share_rate <= 1.0:
            raise ConfigError(f"ewa share rate must be in [0, 1], got {self.ewa_share_rate}")


# Merge option (xft.merge_methods.MergeMethod.options) -> the MergeConfig setting that gives it.
MERGE_OPTION_SETTINGS = {"scale": "merge_scale", "density": "merge_density"}


@dataclass(kw_only=True)
class MergeConfig(TrainConfig):
    """Merge a trained MoE into a dense model (learned or fixed coefficients, or a tensor-level merge), and
    optionally distill the MoE into it."""

    moe: str = setting(help="trained MoE: a local directory, a finished xft output, or a Hub id", flag=False)
    method: str = setting("learned", "how to merge (xft.merge.MERGE_METHODS): learned (train the mixing logits, "
                                     "the paper's), or a fixed merge that needs no data",
                          choices=registry("xft.merge_methods", "MERGE_METHODS"))
    shared_weight: float = setting(0.75, "merge weight of the shared expert (lambda; paper: 0.75)")
    learn_shared_weight: bool = setting(False, "also learn the shared expert's weight (paper: fixed)")
    merge_scale: float | None = setting(None, "task_arithmetic and ties: the scale alpha on the experts' merged "
                                              "deltas to the shared expert (default: task_arithmetic 1/(N-1), "
                                              f"the routed experts' mean; ties {TIES_SCALE:g})")
    merge_density: float | None = setting(None, "ties: the fraction of each expert delta's entries kept, the "
                                                f"largest in magnitude (default {TIES_DENSITY})")
    # The merge's own schedule, the paper's (docs/method.md §3): declared here, so it is never inherited
    # from an SFT's settings (a recipe's `merge` section over `train`, see xft.pipeline.recipe.LAYERS).
    epochs: float = setting(1.0, "passes over the data (paper: 1; ignored when --max-steps is set)")
    max_steps: int = setting(-1, "stop after this many optimizer steps (-1: run --epochs)")
    lr: float = setting(1e-5, "peak learning rate of the mixing logits (paper: 1e-5)")
    lr_scheduler: str = setting("linear", "learning-rate schedule after warm-up (transformers scheduler name)")
    warmup_steps: int = setting(125, "linear warm-up steps (paper: 125)")
    # Distillation after the merge (not in the paper; docs/method.md "Beyond the paper").
    distill_steps: int = setting(0, "after the merge, train the whole dense model this many optimizer steps to "
                                    "match the MoE's next-token distributions on --data (KL on response tokens; "
                                    "0: off)")
    distill_lr: float = setting(1e-5, "peak learning rate of the distillation (all dense parameters train)")
    distill_warmup_steps: int = setting(0, "linear warm-up steps of the distillation")
    distill_temperature: float = setting(1.0, "softmax temperature T of teacher and student in the distillation "
                                              "loss (T^2 KL)")
    gap_examples: int = setting(128, "merge-gap diagnostics: validation examples (--eval-data / --eval-fraction) "
                                     "the MoE's and the merged model's held-out loss and the routing spread are "
                                     "measured on (0: only the expert drift)")

    def validate(self) -> None:
        super().validate()
        if not self.moe:
            raise ConfigError("missing required setting: moe")
        if self.learns and self.data is None:
            raise ConfigError(f"method {self.method!r} trains on data: pass --data (or use a fixed method)")
        if self.distill_steps > 0 and self.data is None:
            raise ConfigError("distillation (distill_steps > 0) trains on data: pass --data")
        if not 0.0 <= self.shared_weight <= 1.0:
            raise ConfigError(f"shared weight must be in [0, 1], got {self.shared_weight}")
        if self.distill_steps < 0 or self.distill_warmup_steps < 0:
            raise ConfigError("distill steps and distill warmup steps must be 0 or more")
        if self.distill_lr <= 0:
            raise ConfigError(f"distill lr must be positive, got {self.distill_lr}")
        if self.gap_examples < 0:
            raise ConfigError(f"gap examples must be 0 or more, got {self.gap_examples}")
        if not self.distill_temperature > 0:
            raise ConfigError(f"distill temperature must be positive, got {self.distill_temperature}")
        try:  # the method's own check (xft.merge_methods.OPTIONS), in the settings' names
            MERGE_METHODS[self.method].check_options(self.merge_options(),
                                                       spell=lambda n: MERGE_OPTION_SETTINGS.get(n, n))
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @property
    def learns(self) -> bool:
        """Whether the method trains (needs data and a Trainer run)."""
        return MERGE_METHODS[self.method].learns

    def merge_options(self) -> dict:
        """The options given to the merge method (`xft.merge(moe, method, **options)`): the settings that are set."""
        return {option: getattr(self, name) for option, name in MERGE_OPTION_SETTINGS.items()
                if getattr(self, name) is not None}

    def distill_config(self) -> MergeConfig:
        """This config with the distillation's schedule as the training schedule (what its Trainer runs)."""
        return dataclasses.replace(self, max_steps=self.distill_steps, lr=self.distill_lr,
                                   warmup_steps=self.distill_warmup_steps)


# `report_to` integration -> (modules any one of which makes it work, pip package to install). TensorBoard's
# module is one of its generated protobuf files: `import tensorboard` succeeds with a protobuf too old for it
# (as installing evalplus leaves it), and the writer would fail only once the model is loaded.
INTEGRATIONS = {
    "tensorboard": (("tensorboard.compat.proto.event_pb2", "tensorboardX"), "tensorboard"),
    **{name: ((name,), name) for name in ("wandb", "mlflow")},  # the module and the package named alike
    "comet_ml": (("comet_ml",), "comet-ml"),
    **{name: ((name,), name) for name in ("neptune", "clearml", "dvclive", "codecarbon", "swanlab", "trackio",
                                          "dagshub")},
    "azure_ml": (("azureml",), "azureml-core"),
    "flyte": (("flytekit",), "flytekit"),
}


def report_targets(report_to: str) -> list[str]:
    """The integrations named by `report_to` ("none" -> [], "a,b" -> ["a", "b"]); "all" stays as is."""
    names = [n.strip() for n in str(report_to).split(",") if n.strip()]
    return [] if names in ([], ["none"]) else names


def check_report_to(report_to: str) -> None:
    """ConfigError unless every integration in `report_to` is known and its package imports.

    Checked before anything is loaded: transformers would fail with a traceback
    once the model is built. An installed package that does not import (a
    dependency too old or too new for it) is named with the import's error.
    """
    for name in report_targets(report_to):
        if name == "all":
            continue
        if name not in INTEGRATIONS:
            raise ConfigError(f"unknown --report-to {name!r}; choose none, all or one or more (comma-separated) "
                              f"of {', '.join(INTEGRATIONS)}")
        modules, package = INTEGRATIONS[name]
        errors = [e for e in map(_import_error, modules) if e != "absent"]
        if not errors:
            raise ConfigError(f"--report-to {name} needs the {package} package: pip install {package}")
        if None not in errors:
            also = " protobuf" if "protobuf" in errors[0].lower() else ""
            raise ConfigError(f"--report-to {name}: {package} is installed but does not import ({errors[0]}); "
                              f"pip install -U {package}{also}")


def _import_error(module: str) -> str | None:
    """None if `module` imports, "absent" if it is not installed, else the error's first line."""
    import importlib.util

    try:
        if importlib.util.find_spec(module) is None:
            return "absent"
        importlib.import_module(module)
        return None
    except ModuleNotFoundError as e:
        return "absent" if e.name and module.startswith(e.name) else f"{type(e).__name__}: {e}".splitlines()[0]
    except Exception as e:  # any failure of a third-party import: ImportError, TypeError from protobuf, ...
        return f"{type(e).__name__}: {e}".splitlines()[0]


# ---------------------------------------------------------------- the bridge: flat settings

@dataclass(frozen=True)
class Slot:
    """One flat setting: where it lives in the nested config, its field and type."""

    path: tuple[str, ...]  # attribute path, e.g. ("upcycle", "num_experts")
    field: dataclasses.Field
    type: object  # the annotation, Optional included


def _is_config(tp) -> bool:
    return dataclasses.is_dataclass(_base_type(tp))


def _base_type(tp):
    """`int | None` -> int; plain types pass through."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 and typing.get_origin(tp) in (typing.Union, types.UnionType) else tp


@functools.cache
def flat_settings(cls) -> dict[str, Slot]:
    """Flat name -> `Slot` of every setting of config class `cls`, composed configs included.

    A composed config's settings join the namespace under their own names
    (or the field's `flat` renames); one the outer config also has (`seed`)
    is the outer one's. An optional composed config (`upcycle`) also gets a
    switch of its own name. Positional fields (flag=False) are included.
    """
    hints = typing.get_type_hints(cls)
    out: dict[str, Slot] = {}
    nested = []
    for f in fields(cls):
        if _is_config(hints[f.name]):
            nested.append(f)
            if type(None) in typing.get_args(hints[f.name]) and f.name not in f.metadata.get("flat", {}).values():
                out[f.name] = Slot((f.name,), f, bool)  # the switch: present or not
        else:
            out[f.name] = Slot((f.name,), f, hints[f.name])
    for f in nested:
        renames = f.metadata.get("flat", {})
        for name, slot in flat_settings(_base_type(hints[f.name])).items():
            name = renames.get(name, name)
            if name not in out:
                out[name] = Slot((f.name,) + slot.path, slot.field, slot.type)
    return out


def type_ok(value, tp) -> bool:
    """Whether `value` fits annotation `tp` (int is accepted for float, None for Optional)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, tp) if isinstance(tp, type) else True


def coerce(value, tp):
    """YAML 1.1 reads `5e-5` as a string: give float settings their number back; an empty section is {}."""
    if value is None and tp in (dict, list):
        return tp()
    if isinstance(value, str) and float in (typing.get_args(tp) or (tp,)):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def type_name(tp) -> str:
    """`int | None` -> "int or None"."""
    args = typing.get_args(tp)
    return " or ".join(type_name(a) for a in args) if args else getattr(tp, "__name__", str(tp))


# What other tools call xft's settings (transformers' TrainingArguments, TRL, MoE configs) -> the flat setting.
# The one table behind "did you mean" for flags (`--learning-rate`), recipe keys and `--set train.learning_rate`.
ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "micro_batch_size",
    "per_device_eval_batch_size": "micro_batch_size", "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "lr_scheduler", "optim": "optimizer",
    "warmup_ratio": "warmup_steps", "output_dir": "out", "model_name_or_path": "model",
    "dataset_name": "data", "dataset_path": "data", "train_file": "data", "validation_file": "eval_data",
    "eval_dataset": "eval_data", "max_seq_length": "max_length", "dataset_text_field": "text_field",
    "bf16": "precision", "fp16": "precision", "eval_strategy": "eval_steps", "evaluation_strategy": "eval_steps",
    "save_strategy": "save_steps", "logging_strategy": "logging_steps", "overwrite_output_dir": "overwrite",
    "num_local_experts": "num_experts", "n_routed_experts": "num_experts", "num_experts_per_tok": "top_k",
    "router_aux_loss_coef": "balance_loss_weight", "aux_loss_coef": "balance_loss_weight",
    "dataloader_num_workers": "num_workers", "max_new_token": "max_new_tokens", "num_samples": "n_samples",
}


def closest_name(name: str, known) -> str | None:
    """The setting among `known` that `name` means: another tool's name for it (`ALIASES`) or a near miss."""
    known = list(known)
    alias = ALIASES.get(name.replace("-", "_"))
    if alias in known:
        return alias
    match = difflib.get_close_matches(name, known, n=1)
    return match[0] if match else None


def closest(name: str, known) -> str:
    """" (did you mean 'x'?)" for what `name` may mean among `known` (`closest_name`), else ""."""
    match = closest_name(name, known)
    return f" (did you mean {match!r}?)" if match else ""


def suggest_option(option: str, options) -> str:
    """" (did you mean --lr?)" for an unknown command-line `option` (`--learning-rate[=X]`) among a command's
    `options`, else ""."""
    names = {o.lstrip("-").replace("-", "_"): o for o in options if o.startswith("--")}
    match = closest_name(option.split("=", 1)[0].lstrip("-").replace("-", "_"), names)
    return f" (did you mean {names[match]}?)" if match else ""


def check_flat(cls, values: dict, where: str = "", skip=frozenset(), what: str = "setting") -> dict:
    """`values` with every key a flat setting of `cls` and every value of its type; ConfigError otherwise.

    Keys may use dashes; `where` prefixes names in messages (a recipe section),
    `what` names a key in them; keys in `skip` are settings the caller sets
    itself and may not be given.
    """
    slots = flat_settings(cls)
    out = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        label = f"{where}.{name}" if where else name
        if name in skip:
            raise ConfigError(f"{what} {label} cannot be set: it is set for you (per stage)")
        if name not in slots:
            raise ConfigError(f"unknown {what} {label}{closest(name, set(slots) - set(skip))}")
        value = coerce(value, slots[name].type)
        if not type_ok(value, slots[name].type):
            raise ConfigError(f"{label}: expected {type_name(slots[name].type)}, got {value!r}")
        out[name] = value
    return out


def _is_switch(cls, slot: Slot) -> bool:
    """Whether `slot` is the on/off switch of an optional composed config (`upcycle`)."""
    return len(slot.path) == 1 and _is_config(typing.get_type_hints(cls)[slot.path[0]])


def from_flat(cls, values: dict, where: str = ""):
    """A validated config of class `cls` from a flat mapping of settings (unset ones keep their defaults)."""
    slots, hints = flat_settings(cls), typing.get_type_hints(cls)
    # None for a composed config's setting is its default, or (to_flat of an absent config) no value at all.
    values = check_flat(cls, {k: v for k, v in values.items()
                              if not (v is None and k in slots and len(slots[k].path) > 1)}, where)
    kwargs: dict = {}
    parts: dict[str, dict] = {}
    for name, value in values.items():
        path = slots[name].path
        if len(path) == 1:
            kwargs[path[0]] = value
        else:
            parts.setdefault(path[0], {})[name] = value
    for outer, inner in parts.items():
        switch = slots.get(outer)
        if switch is not None and _is_switch(cls, switch) and not kwargs.get(outer):
            names = ", ".join(("" if where else "--") + n.replace("_", "-" if not where else "_") for n in inner)
            raise ConfigError(f"{names} only appl{'ies' if len(inner) == 1 else 'y'} with "
                              f"{where + '.' if where else '--'}{outer}")
        sub = _base_type(hints[outer])
        kwargs[outer] = sub(**{slots[n].path[1]: v for n, v in inner.items()})
    return cls(**kwargs)


def to_flat(config) -> dict:
    """The flat settings of `config` (plain values): the inverse of `from_flat`, and what run records hold."""
    cls, out = type(config), {}
    for name, slot in flat_settings(cls).items():
        value = config
        for part in slot.path:
            value = None if value is None else getattr(value, part)
        out[name] = (value is not None) if _is_switch(cls, slot) else value
    return out


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
                  required: tuple[str, ...] = ()) -> None:
    """Add one `--flag` per flat setting of config class `cls` (flag=True ones), with its help and choices.

    Unset flags stay out of the parsed namespace (`from_args` then keeps the
    config's defaults), so the defaults live in the config class only.
    """
    hints, groups = typing.get_type_hints(cls), {}
    for name, slot in flat_settings(cls).items():
        if not slot.field.metadata.get("flag", True) or name in skip:
            continue
        if len(slot.path) > 1 and slot.path[0] not in groups:  # a composed config's settings: their own group
            sub = _base_type(hints[slot.path[0]])
            own = flat_settings(cls).get(slot.path[0])
            switch = f" (with --{slot.path[0]})" if own is not None and own.path == (slot.path[0],) else ""
            groups[slot.path[0]] = parser.add_argument_group(
                f"{slot.path[0]} settings{switch}", f"{sub.__name__}: {sub.__doc__.splitlines()[0]}")
        group = groups.get(slot.path[0], parser) if len(slot.path) > 1 else parser
        flag = "--" + name.replace("_", "-")
        help_ = slot.field.metadata.get("help", "")
        if _base_type(slot.type) is bool:
            default = False if _is_switch(cls, slot) else slot.field.default
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"{help_} (default: {'on' if default else 'off'})")
            continue
        default = slot.field.default
        choices, kind = slot.field.metadata.get("choices"), _base_type(slot.type)
        if callable(choices):  # a registry: read when the flag is given, not for --help
            choices, kind = None, registry_value(choices, kind)
        group.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=choices,
                            required=name in required, metavar=None if choices else name.upper(),
                            help=help_ + ("" if default in (None, MISSING) else f" (default: {default})"))


def from_args(cls, args: argparse.Namespace, **extra):
    """A validated config of class `cls` from parsed flags (entries that are not its settings are ignored)."""
    slots = flat_settings(cls)
    values = {k: v for k, v in vars(args).items() if k in slots}
    values.update(extra)
    return from_flat(cls, values, where="")
