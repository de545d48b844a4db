"""Memory plan: per-GPU memory of every XFT stage from a model's config alone (no weights, no torch).

For a Llama-style decoder (embeddings, attention with grouped KV heads, a
gated MLP, RMSNorms; `transformers` config keys) and a stage:

* ``dense-sft``: the base model, every parameter trained;
* ``moe-sft``: the upcycled MoE: N stacked copies of every FFN plus a router
  per layer, all trained; a token's activations hold K copies of the FFN's;
* ``merge``: the MoE's weights frozen, only the per-layer mixing logits train
  (tiny gradients and optimizer state), but every layer's merged FFN weight
  `Σ c_n W_n` is computed in the forward and kept for the backward;
* ``eval``: the merged dense model in bf16, generating (weights + KV cache);
* ``upcycle``: host memory of `xft upcycle` (CPU): the dense checkpoint and
  its private copy, then the MoE growing layer by layer;

the plan adds up, per GPU: weights, gradients, optimizer state, activations
and framework overhead, in bytes, and says whether that fits `gpu_memory`.

What it models (each term is one function below):

* precision: ``fp32`` 4-byte weights and gradients; ``bf16`` (mixed) 4-byte
  master weights and gradients, plus the bf16 copies autocast makes of the
  matmul weights (DDP: all of them, kept for the backward; FSDP / ZeRO-3: the
  gathered layers only); ``bf16-pure`` 2-byte weights and gradients;
* optimizers: Adafactor's factored second moment (rows + columns of every
  matrix, over the last two dims of a stacked `[N, out, in]` tensor; full
  size for vectors; fp32 even for bf16 weights) and its step's fp32
  temporaries of the largest tensor;
  AdamW's two moments in the parameters' dtype and, on CUDA, the foreach
  step's one full-size temporary;
* strategies: ``ddp`` one full replica per GPU, plus DDP's gradient buckets
  (a second copy of the gradients) with more than one GPU; ``fsdp`` /
  ``zero3`` shard weights, gradients and optimizer state over the GPUs and
  gather one decoder layer at a time (two live: the current one and the
  prefetched next), the embeddings and LM head for the whole step; under
  bf16 mixed precision ZeRO-3 also keeps a bf16 partition of the weights;
* activations, per token and decoder layer (counted from the tensors
  autograd saves, `benchmarks/bench_plan.py`): the two RMSNorms, attention
  (input, q, k, v, output; SDPA / flash attention, no `S x S` matrix), the
  FFN (input and four `I`-sized tensors; an MoE K copies of them and of the
  selected inputs); the LM head's fp32 log-softmax, and at the start of the
  backward two more fp32 `[T, vocab]` tensors. With gradient checkpointing
  only each layer's input is kept, and one layer is recomputed at a time;
* the peak is the larger of the backward's start (weights, optimizer state,
  all activations; gradients too when accumulating) and the optimizer step
  (weights, optimizer state, gradients, the step's temporaries);
* overhead: on CUDA 1 GiB (context, cuBLAS / NCCL workspaces) plus 5% of the
  rest (allocator fragmentation).

Limits: estimates, not measurements of a GPU run (validated on CPU against
measured peaks by `benchmarks/bench_plan.py`, numbers in docs/training.md); the eager attention
`S x S` matrix, CPU offload, pipeline or tensor parallelism, and DeepSpeed's
configurable buckets are not modelled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

from xft.config import ConfigError, check_choices, setting
from xft.errors import UserError

GiB = 2 ** 30
STAGES = ("upcycle", "dense-sft", "moe-sft", "merge", "eval")
STRATEGIES = ("ddp", "fsdp", "zero3")  # cheapest first: the order `suggest` tries them in
PRECISIONS = ("fp32", "bf16", "bf16-pure")
# optimizer -> (full-size state tensors per parameter, bytes per element; None: the parameter's dtype), or
# "factored": Adafactor's rows + columns.
OPTIMIZERS = {
    "adafactor": "factored",
    "adamw_torch": (2, None), "adamw_torch_fused": (2, None), "adamw_hf": (2, None), "adamw_apex_fused": (2, None),
    "adamw_bnb_8bit": (2, 1), "adamw_8bit": (2, 1), "paged_adamw_8bit": (2, 1),
    "sgd": (0, None),
}

CUDA_CONTEXT = 1.0 * GiB  # CUDA context + cuBLAS / NCCL workspaces (not in torch's allocated bytes)
FRAGMENTATION = 0.05  # caching-allocator slack, as a share of the allocated bytes
# Bytes per saved activation element for the attention / FFN tensors under each precision. bf16 mixed:
# autocast saves most matmul inputs in bf16 but some (e.g. a cast-back for SDPA, the SiLU's input) in fp32:
# measured 2.2-2.8 bytes per element on CPU (benchmarks/bench_plan.py's probe).
ACT_BYTES = {"fp32": 4.0, "bf16": 2.5, "bf16-pure": 2.0}
# Bytes per token per layer of the two RMSNorms (they compute in fp32): input + normalised output each.
NORM_BYTES = {"fp32": 16, "bf16": 16, "bf16-pure": 12}


@dataclass(kw_only=True)
class PlanConfig:
    """What to plan: the model, the stages, and how they would be trained."""

    model: str = setting(help="a Hub id, a model directory or a config.json path (only the config is read)",
                         flag=False)
    stage: str = setting("all", "which stage to plan", choices=STAGES + ("all",))
    strategy: str = setting("all", "distributed strategy to plan for (all: each of them)",
                            choices=STRATEGIES + ("all",))
    precision: str = setting("bf16", "fp32, bf16 (mixed, fp32 master weights) or bf16-pure (bf16 weights)",
                             choices=PRECISIONS)
    optimizer: str = setting("adafactor", "optimizer (transformers `optim` name)", choices=tuple(OPTIMIZERS))
    gpus: int = setting(8, "GPUs (processes) the stage runs on")
    gpu_memory: float = setting(80.0, "memory of one GPU, GiB")
    micro_batch: int = setting(8, "sequences per GPU per forward pass")
    seq_len: int = setting(1024, "tokens per sequence (the paper's max length)")
    grad_accum: int = setting(1, "gradient accumulation steps (above 1 the gradients stay alive during the "
                                 "forward and backward)")
    num_experts: int | None = setting(None, "experts per layer N (default: the MoE config's, else 8)")
    top_k: int | None = setting(None, "experts per token K, shared expert included (default: the MoE "
                                      "config's, else 6)")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass")
    device: str = setting("cuda", "cuda, or cpu (no CUDA context, no DDP buckets: what the CPU benchmark "
                                  "measures)", choices=("cuda", "cpu"))

    def __post_init__(self):
        for name, value in (("gpus", self.gpus), ("micro_batch", self.micro_batch), ("seq_len", self.seq_len),
                            ("grad_accum", self.grad_accum)):
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if self.gpu_memory <= 0:
            raise ConfigError(f"gpu memory must be positive, got {self.gpu_memory}")
        check_choices(self)


# ---------------------------------------------------------------- the model's shapes

@dataclass(frozen=True)
class Shape:
    """The sizes of a Llama-style decoder that memory depends on, and the MoE made of it."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    num_experts: int = 8
    top_k: int = 6
    shared_expert: bool = True
    router: str = "mlp"
    noisy: bool = True

    @classmethod
    def from_config(cls, c: dict, num_experts: int | None = None, top_k: int | None = None) -> "Shape":
        """From a `config.json` dict (a dense model, or an xft MoE, whose "xft" entry gives N, K and routing)."""
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if not isinstance(c.get(k), int)]
        if missing:
            raise UserError(f"the config has no {', '.join(missing)}: xft plan models Llama-style decoders "
                            f"(model type {c.get('model_type', '?')!r})")
        moe = c.get("xft") or {}
        heads = c["num_attention_heads"]
        n = num_experts or moe.get("num_experts", 8)
        k = top_k or moe.get("top_k", 6)
        if not 1 <= k <= n:
            raise UserError(f"top_k={k} must be between 1 and num_experts={n}")
        return cls(hidden=c["hidden_size"], intermediate=c["intermediate_size"], layers=c["num_hidden_layers"],
                   heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab=c["vocab_size"],
                   tied=bool(c.get("tie_word_embeddings", False)), num_experts=n, top_k=k,
                   shared_expert=moe.get("routing", "xft") != "sparse", router=moe.get("router", "mlp"),
                   noisy=moe.get("noisy_gating", True))

    @property
    def routed(self) -> int:
        return self.num_experts - 1 if self.shared_expert else self.num_experts

    def attention_shapes(self) -> list[tuple[int, ...]]:
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(q, d), (kv, d), (kv, d), (d, q)]

    def ffn_shapes(self, experts: int = 0) -> list[tuple[int, ...]]:
        """gate, up, down; stacked `[N, *shape]` when `experts`."""
        d, i = self.hidden, self.intermediate
        lead = (experts,) if experts else ()
        return [lead + (i, d), lead + (i, d), lead + (d, i)]

    def router_shapes(self) -> list[tuple[int, ...]]:
        d, r = self.hidden, self.routed
        shapes = [(r, d), (r, r)] if self.router == "mlp" else [(r, d)]
        return shapes + ([(r, d)] if self.noisy else [])

    def layer_shapes(self, moe: bool) -> list[tuple[int, ...]]:
        """One decoder layer's parameter shapes (dense or MoE)."""
        ffn = self.ffn_shapes(self.num_experts) + self.router_shapes() if moe else self.ffn_shapes()
        return self.attention_shapes() + ffn + [(self.hidden,), (self.hidden,)]

    def root_shapes(self) -> list[tuple[int, ...]]:
        """Parameters outside the decoder layers: embeddings, final norm, LM head (unless tied)."""
        return [(self.vocab, self.hidden), (self.hidden,)] + ([] if self.tied else [(self.vocab, self.hidden)])

    def shapes(self, moe: bool) -> list[tuple[int, ...]]:
        return self.root_shapes() + self.layer_shapes(moe) * self.layers

    def parameters(self, moe: bool) -> int:
        return sum(_numel(s) for s in self.shapes(moe))

    def active_parameters(self) -> int:
        """Parameters one token of the MoE runs through (K of the N experts; the routers)."""
        ffn = sum(_numel(s) for s in self.ffn_shapes())
        return self.parameters(True) - self.layers * (self.num_experts - self.top_k) * ffn


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def read_config(model: str) -> dict:
    """The `config.json` of a Hub id, a model directory (or finished xft run), a GGUF file (its metadata alone:
    nothing is dequantized) or a path to the file itself."""
    from xft.gguf import is_gguf_argument, read_config as gguf_config

    if is_gguf_argument(model):
        return gguf_config(model)
    if os.path.isfile(model):
        path = model
    else:
        from xft.artifacts import resolve_model

        where = resolve_model(model)
        if os.path.isdir(where):
            path = os.path.join(where, "config.json")
        else:
            from huggingface_hub import hf_hub_download

            try:
                path = hf_hub_download(where, "config.json")
            except Exception as e:  # offline, gated, no config.json: one line, not a traceback
                raise UserError(f"cannot fetch config.json of {where}: {str(e).splitlines()[0]}") from None
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read a model config from {path}: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a model config (a JSON object)")
    return config


# ---------------------------------------------------------------- the plan of one stage

@dataclass(frozen=True)
class StagePlan:
    """Per-GPU bytes of one stage under one strategy (at the peak), and whether they fit."""

    stage: str
    strategy: str
    parameters: int  # of the model the stage holds
    trainable: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float
    limit: float  # GPU memory, bytes
    phase: str  # where the peak is: "backward" or "optimizer step" ("inference" for eval)
    state: float = 0.0  # the training state per GPU: weights (own shard) + all gradients + optimizer state

    @property
    def allocated(self) -> float:
        """What torch allocates (torch.cuda.max_memory_allocated's counterpart): everything but overhead."""
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def total(self) -> float:
        return self.allocated + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.limit


def _optimizer_state(shapes: list[tuple[int, ...]], optimizer: str, pbytes: int) -> float:
    """Bytes of optimizer state for trainable tensors `shapes` whose dtype has `pbytes` bytes."""
    kind = OPTIMIZERS[optimizer]
    if kind == "factored":  # transformers' Adafactor: row and column second moments, fp32 (it upcasts bf16 grads)
        return 4 * sum(_numel(s[:-1]) + _numel(s[:-2] + s[-1:]) if len(s) >= 2 else _numel(s) for s in shapes)
    tensors, nbytes = kind  # AdamW: exp_avg and exp_avg_sq, like the parameter (8-bit ones: 1 byte each)
    return tensors * (nbytes or pbytes) * sum(_numel(s) for s in shapes)


def _step_temporaries(shapes: list[tuple[int, ...]], optimizer: str, pbytes: int, device: str) -> float:
    """Bytes the optimizer step allocates on top of its state, at its largest."""
    if not shapes:
        return 0.0
    largest = max(_numel(s) for s in shapes)
    if optimizer == "adafactor":  # per tensor: fp32 grad**2, the approximated update, fp32 copies in bf16
        return largest * 4 * (2 if pbytes == 4 else 4)
    if optimizer in ("adamw_torch", "adamw_hf") and device == "cuda":  # foreach: one full-size list at once
        return pbytes * sum(_numel(s) for s in shapes)
    return largest * pbytes * 2


def _activations(shape: Shape, cfg: PlanConfig, stage: str) -> float:
    """Bytes of activations alive at the start of the backward, per GPU (one micro batch)."""
    d, i, L = shape.hidden, shape.intermediate, shape.layers
    p = cfg.precision
    tokens = cfg.micro_batch * cfg.seq_len
    if stage == "eval":  # generating: bf16 KV cache of every layer, one layer's prefill temporaries
        kv = 2 * L * shape.kv_heads * shape.head_dim * tokens * 2
        return kv + tokens * (4 * i + 3 * d) * 2 + cfg.micro_batch * shape.vocab * 4
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = 3 * q + 2 * kv  # saved elements per token: input, q, k, v, output
    if stage == "moe-sft":  # shared expert on every token + K-1 routed selections, each with its input and output
        ffn = shape.top_k * (4 * i + 2 * d) + 5.5 * d
    else:
        ffn = d + 4 * i
    per_layer = NORM_BYTES[p] * d + ACT_BYTES[p] * (attention + ffn)  # bytes per token
    resid = 2 if p == "bf16-pure" else 4  # the residual stream's dtype
    # The final norm, the LM head's input and the fp32 log-softmax saved for the loss.
    head = tokens * (NORM_BYTES[p] // 2 * d + resid * d + 4 * shape.vocab)
    head_backward = tokens * 2 * 4 * shape.vocab  # fp32 d(logits) and d(log-softmax) at the backward's start
    # The merge model keeps each layer's merged FFN weights (the stacks' dtype; plus autocast's bf16 copy).
    merged = sum(_numel(s) for s in shape.ffn_shapes()) * (_weight_bytes(p) + (2 if p == "bf16" else 0))
    if cfg.gradient_checkpointing:  # layer inputs only; one layer recomputed at a time
        layers = tokens * (L * resid * d + per_layer) + (merged if stage == "merge" else 0)
    else:
        layers = tokens * L * per_layer + (L * merged if stage == "merge" else 0)
    return layers + head + head_backward


def _weight_bytes(precision: str) -> int:
    return 2 if precision == "bf16-pure" else 4


def plan_stage(shape: Shape, cfg: PlanConfig, stage: str, strategy: str) -> StagePlan:
    """The per-GPU memory of `stage` under `strategy` (one of STRATEGIES; ignored for eval)."""
    if stage == "eval":
        return _plan_eval(shape, cfg)
    if stage == "upcycle":
        return _plan_upcycle(shape, cfg)
    moe = stage != "dense-sft"
    p, g = cfg.precision, cfg.gpus
    wb = _weight_bytes(p)
    shapes = shape.shapes(moe)
    params = sum(_numel(s) for s in shapes)
    if stage == "merge":  # mixing logits: N-1 per layer (N without a shared expert); routers dropped
        train_shapes = [(shape.routed,)] * shape.layers
        params -= shape.layers * sum(_numel(s) for s in shape.router_shapes())
    else:
        train_shapes = shapes
    trainable = sum(_numel(s) for s in train_shapes)
    shard = g if strategy in ("fsdp", "zero3") else 1
    weights = params * wb / shard
    grads = trainable * wb / shard
    optimizer = _optimizer_state(train_shapes, cfg.optimizer, wb) / shard
    # Parameters present whole on a GPU at a time: sharded strategies gather the root (embeddings, head)
    # and two decoder layers, in the compute dtype (bf16 under mixed precision, else the weights').
    compute = 2 if p != "fp32" else 4
    if shard > 1:
        layer = sum(_numel(s) for s in shape.layer_shapes(moe))
        root = sum(_numel(s) for s in shape.root_shapes())
        weights += (2 * layer + root) * compute
        if stage != "merge":
            grads += layer * wb  # one layer's unsharded gradients before their reduce-scatter
        if strategy == "zero3" and p == "bf16":
            weights += params * 2 / shard  # DeepSpeed's bf16 partition beside the fp32 master partition
    elif p == "bf16":
        weights += params * 2  # autocast's bf16 copies of the weights, saved for the backward
    activations = _activations(shape, cfg, stage)
    step = _step_temporaries(train_shapes, cfg.optimizer, wb, cfg.device)
    head_grads = 0 if stage == "merge" or shape.tied else shape.vocab * shape.hidden * wb / shard
    copies = params * 2 if p == "bf16" and shard == 1 else 0  # autocast's copies: gone after the backward
    # The peak: the backward's start (all activations; gradients only when accumulating, else the LM
    # head's, the first computed) or the optimizer step (all gradients and the step's temporaries).
    all_grads = grads
    state = params * wb / shard + trainable * wb / shard + optimizer
    backward = (weights, grads if cfg.grad_accum > 1 else head_grads, optimizer, activations)
    step_ = (weights - copies, grads, optimizer + step, 0.0)
    (weights, grads, optimizer, activations), phase = max(
        (backward, "backward"), (step_, "optimizer step"), key=lambda x: sum(x[0]))
    overhead = 0.0
    if cfg.device == "cuda":
        buckets = all_grads if strategy == "ddp" and g > 1 else 0.0  # DDP's gradient buckets
        overhead = CUDA_CONTEXT + buckets + FRAGMENTATION * (weights + grads + optimizer + activations + buckets)
    return StagePlan(stage, strategy, params, trainable, weights, grads, optimizer, activations, overhead,
                     cfg.gpu_memory * GiB, phase, state)


def _plan_eval(shape: Shape, cfg: PlanConfig) -> StagePlan:
    params = shape.parameters(False)
    acts = _activations(shape, cfg, "eval")
    weights = params * 2  # the merged dense model served in bf16
    overhead = (CUDA_CONTEXT + FRAGMENTATION * (weights + acts)) if cfg.device == "cuda" else 0.0
    return StagePlan("eval", "-", params, 0, weights, 0.0, 0.0, acts, overhead, cfg.gpu_memory * GiB, "inference",
                     weights)


def _plan_upcycle(shape: Shape, cfg: PlanConfig) -> StagePlan:
    """Host memory of `xft upcycle`: the larger of the dense weights twice (copied out of the checkpoint's
    memory map) and the MoE plus one dense FFN (replaced layer by layer); saving adds nothing."""
    wb = _weight_bytes(cfg.precision)
    dense, moe = shape.parameters(False), shape.parameters(True)
    ffn = sum(_numel(s) for s in shape.ffn_shapes())
    weights = max(2 * dense, moe + ffn) * wb
    return StagePlan("upcycle", "cpu", moe, 0, weights, 0.0, 0.0, 0.0, 0.0, math.inf, "host memory", moe * wb)


# ---------------------------------------------------------------- the whole plan

def plan(cfg: PlanConfig, config: dict | None = None) -> list[StagePlan]:
    """Every requested stage under every requested strategy (`config`: the model's config.json dict)."""
    shape = Shape.from_config(config if config is not None else read_config(cfg.model), cfg.num_experts, cfg.top_k)
    stages = STAGES if cfg.stage == "all" else (cfg.stage,)
    strategies = STRATEGIES if cfg.strategy == "all" else (cfg.strategy,)
    return [plan_stage(shape, cfg, s, t) for s in stages
            for t in (("-",) if s in ("eval", "upcycle") else strategies)]


def suggest(shape: Shape, cfg: PlanConfig, stage: str) -> str:
    """The cheapest way `stage` fits: DDP, FSDP, ZeRO-3, then each with gradient checkpointing, then a smaller
    micro batch; a sentence."""
    if stage == "upcycle":
        return "runs on the CPU (host memory, no GPU)"
    if stage == "eval":
        return "fits one GPU" if plan_stage(shape, cfg, stage, "-").fits else "does not fit one GPU in bf16"
    for ckpt in (cfg.gradient_checkpointing, True):
        for strategy in STRATEGIES:
            c = dataclasses.replace(cfg, gradient_checkpointing=ckpt)
            if plan_stage(shape, c, stage, strategy).fits:
                return f"{strategy}" + (" with --gradient-checkpointing" if ckpt and not cfg.gradient_checkpointing
                                        else "")
    micro = cfg.micro_batch // 2
    while micro >= 1:
        for strategy in STRATEGIES:
            c = dataclasses.replace(cfg, gradient_checkpointing=True, micro_batch=micro)
            if plan_stage(shape, c, stage, strategy).fits:
                return f"{strategy} with --gradient-checkpointing and micro batch {micro}"
        micro //= 2
    return "nothing fits: more GPUs, bf16-pure, or a smaller model"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_plan(cfg: PlanConfig, config: dict) -> str:
    """The plan as a text table with a suggestion per stage (what `xft plan` prints)."""
    shape = Shape.from_config(config, cfg.num_experts, cfg.top_k)
    rows = plan(cfg, config)
    out = [f"{cfg.model}: {_count(shape.parameters(False))} dense parameters; MoE with {shape.num_experts} "
           f"experts, top-{shape.top_k}: {_count(shape.parameters(True))} "
           f"({_count(shape.active_parameters())} active per token)",
           f"per GPU, GiB (estimates): {cfg.gpus} x {cfg.gpu_memory:g} GiB, {cfg.precision}, {cfg.optimizer}, "
           f"micro batch {cfg.micro_batch} x {cfg.seq_len} tokens, gradient accumulation {cfg.grad_accum}, "
           f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}", ""]
    head = ("stage", "strategy", "weights", "grads", "optimizer", "activations", "overhead", "total", "fits",
            "peak at")
    table = [head] + [(r.stage, r.strategy, *(f"{v / GiB:.1f}" for v in (r.weights, r.gradients, r.optimizer,
                                                                         r.activations, r.overhead, r.total)),
                       "yes" if r.fits else "NO", r.phase) for r in rows]
    widths = [max(len(row[j]) for row in table) for j in range(len(head))]
    out += ["  ".join(c.ljust(w) if j < 2 or j == 9 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
            .rstrip() for row in table]
    out += ["", "Each row is the step's peak: at the backward's start the gradients are not there yet (only the "
            "LM head's, unless accumulating); at the optimizer step the activations are gone.", ""]
    for stage in dict.fromkeys(r.stage for r in rows):
        out.append(f"{stage}: cheapest that fits: {suggest(shape, cfg, stage)}")
    return "\n".join(out)
