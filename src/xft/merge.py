"""Merging (MoE -> dense, docs/method.md §3): the merge methods and the learnable merge.

For each layer a merge method turns the expert stacks `{name: [N, *shape]}`
into dense FFN weights `{name: [*shape]}` (`xft.merge_methods`, where the
methods are registered by name). The coefficient-based ones mix the experts
with coefficients `c^l ∈ R^N`:

* shared-expert routings: `c = [λ, (1-λ)·softmax(a^l)]`, `a^l ∈ R^{N-1}`
  (zeros = the paper's init merge, each routed expert `(1-λ)/(N-1)`);
* ``"sparse"`` (no shared expert): `c = softmax(a^l)`, `a^l ∈ R^N`;
* ``"uniform"``: `c = 1/N` (also EWA's final merge).

and every FFN parameter becomes `W^l = Σ_n c_n · W_n^l` (`weighted_sum`).
The tensor-level methods work on the experts' deltas `τ_i = W_i − B` to a base
`B` (the shared expert; without one, the experts' mean): ``"task_arithmetic"``
`B + α·Σ_i τ_i` and ``"ties"`` (trim, elect sign, disjoint mean), see
`task_arithmetic` and `ties` and docs/method.md "Beyond the paper".
A granular MoE (`xft.inits`) is merged as the N experts its shards came from:
each expert's G shards joined back into an FFN of the dense shapes
(`xft.inits.whole_experts`), so every method applies unchanged.
`merge` compiles directly; `build_merge_model` turns an MoE (in place) into a
model of the dense architecture whose FFN weights are computed from the expert
stacks and learnable `a^l` on the fly, and `compile_merge` writes the learned
result into a plain dense model of the original class — no trace of xft in its
config or modules.

Memory: the learnable merge keeps the stacks in the model's dtype (no fp32
copy) and materialises one merged weight per FFN parameter per forward; the
gradient w.r.t. `a^l` flows through it (`dL/dc_n = <dL/dW, W_n>`).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from xft.ffn import FFNSpec, call_ffn
from xft.hfconfig import dense_config
from xft.inits import whole_experts
# The registry, re-exported: `xft.merge.MERGE_METHODS` (= `xft.MERGE_METHODS`) is the list of merge methods.
from xft.merge_methods import (  # noqa: F401
    MERGE_METHODS, TIES_DENSITY, TIES_SCALE, MergeInput, MergeMethod, get_merge_method, register_merge_method,
)
from xft.moe import MoEBlock
from xft.upcycle import moe_blocks, remove_balance_loss


def coefficients(num_experts: int, shared_expert: bool, shared_weight: float | Tensor,
                 logits: Tensor) -> Tensor:
    """Mixing coefficients `[N]` (fp32) from the shared weight λ and mixing logits `a` ([N-1] or [N])."""
    if shared_expert:
        lam = torch.as_tensor(shared_weight, dtype=torch.float32, device=logits.device).reshape(1)
        return torch.cat([lam, (1 - lam) * logits.float().softmax(-1)])
    return logits.float().softmax(-1)


@torch.no_grad()
def weighted_sum(stacks: dict[str, Tensor], c: Tensor) -> dict[str, Tensor]:
    """{name: Σ_n c_n · stack[n]} for stacks [N, *shape] and coefficients [N]; fp32 sums, the stacks' dtype out."""
    merged = {}
    for name, s in stacks.items():
        if len(c) != s.shape[0]:
            raise ValueError(f"{len(c)} coefficients for the {s.shape[0]} experts of {name!r}")
        acc = torch.zeros(s.shape[1:], dtype=torch.float32, device=s.device)
        for n in range(s.shape[0]):  # one fp32 temporary per parameter, not a fp32 copy of the stack
            acc.add_(s[n].float(), alpha=float(c[n]))
        merged[name] = acc.to(s.dtype)
    return merged


# ----------------------------------------------------------------------------- built-in methods (xft.merge_methods)

def init_coefficients(layer: MergeInput) -> Tensor:
    """Zero logits: shared expert λ, each routed expert (1-λ)/(N-1) (softmax over all N without a shared one)."""
    return coefficients(layer.num_experts, layer.shared_expert, layer.shared_weight, torch.zeros(layer.config.num_routed))


def uniform_coefficients(layer: MergeInput) -> Tensor:
    """Every expert 1/N."""
    return torch.full((layer.num_experts,), 1.0 / layer.num_experts)


def learned_coefficients(layer: MergeInput) -> Tensor:
    """From the layer's learned mixing logits (`xft.build_merge_model`, or given to `merge`)."""
    if layer.logits is None:
        raise ValueError("method 'learned' needs mixing logits for every layer")
    expected = layer.config.num_routed
    if layer.logits.shape != (expected,):
        raise ValueError(f"mixing logits of shape {tuple(layer.logits.shape)}; expected ({expected},) "
                         f"for {layer.num_experts} experts with routing {layer.config.routing!r}")
    return coefficients(layer.num_experts, layer.shared_expert, layer.shared_weight, layer.logits.detach().cpu())


# ----------------------------------------------------------------------------- task vectors (tensor-level methods)

def task_vectors(stack: Tensor, shared_expert: bool) -> tuple[Tensor, Tensor]:
    """(base B [*shape], deltas τ [R, *shape]) in fp32 of one expert stack [N, *shape] (for task arithmetic).

    With a shared expert B = W_0 and τ_i = W_i − W_0 for the R = N−1 routed
    experts; without one (sparse routing) B = mean_n W_n and τ_n = W_n − B for all N.
    """
    w = stack.float()
    base = w[0] if shared_expert else w.mean(0)
    return base, (w[1:] if shared_expert else w) - base


@torch.no_grad()
def task_arithmetic(layer: MergeInput) -> dict[str, Tensor]:
    """Task arithmetic (Ilharco et al. 2023): W = B + α·Σ_i τ_i, α = option "scale" (default 1/R).

    The default α = 1/R gives the mean of the experts the deltas come from (the
    routed ones): it never leaves the experts' convex hull, whatever N, where
    the paper tunes α on validation data that a fixed merge does not have.
    Without a shared expert the deltas to the experts' mean sum to zero, so
    every α gives that mean (the uniform merge).
    """
    merged = {}
    for name, s in layer.stacks.items():
        base, tau = task_vectors(s, layer.shared_expert)  # [*shape], [R, *shape]
        alpha = layer.options.get("scale", 1.0 / tau.shape[0])
        merged[name] = (base + alpha * tau.sum(0)).to(s.dtype)
    return merged


def trim_mask(delta: Tensor, density: float) -> Tensor:
    """Bool mask [*shape] of the k = max(1, round(density·numel)) entries of `delta` largest in magnitude.

    Equal magnitudes at the threshold are broken toward the lower flat
    (row-major) index, so the mask keeps exactly k entries and is deterministic.
    """
    a = delta.abs().flatten()  # [P]
    k = min(a.numel(), max(1, round(density * a.numel())))
    t = a.kthvalue(a.numel() - k + 1).values  # the k-th largest magnitude
    above, tie = a > t, a == t
    keep = above | (tie & (tie.cumsum(0) <= k - above.sum()))
    return keep.view(delta.shape)


def ties_deltas(tau: Tensor, density: float) -> Tensor:
    """TIES' merged delta [*shape] of deltas τ [R, *shape]: trim each τ_i, elect signs, disjoint mean.

    τ̂_i = τ_i on its `trim_mask` (else 0); γ = sign(Σ_i τ̂_i); the result is the
    mean of the τ̂_i whose sign is γ (nonzero ones only), 0 where none is.
    """
    trimmed = torch.stack([t * trim_mask(t, density) for t in tau])  # [R, *shape], one mask at a time
    elected = trimmed.sum(0).sign()  # [*shape]; 0 where the trimmed deltas cancel (then none agrees)
    agree = (trimmed.sign() == elected) & (trimmed != 0)  # [R, *shape]
    return (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)


@torch.no_grad()
def ties(layer: MergeInput) -> dict[str, Tensor]:
    """TIES (Yadav et al. 2023) per FFN parameter: W = B + α·ties_deltas(τ, density).

    Options "density" (default `TIES_DENSITY`) and "scale" α (default
    `TIES_SCALE`). Trimming is per parameter tensor and per delta (the paper
    trims each flattened task vector as a whole). Computed in float64, where
    the deltas of fp32/bf16 weights and their sums are exact, so deltas that
    cancel elect no sign rather than the sign of a rounding error (2 and −2;
    without a shared expert, every entry that no delta trims away, as the
    deltas to the mean sum to zero there).
    """
    density = layer.options.get("density", TIES_DENSITY)
    alpha = layer.options.get("scale", TIES_SCALE)
    merged = {}
    for name, s in layer.stacks.items():
        w = s.double()  # [N, *shape]
        if layer.shared_expert:  # τ_i = W_i − W_0, i = 1..N−1
            base, deltas, n = w[0], w[1:] - w[0], 1
        else:  # n·τ_m = n·W_m − Σ W: the deltas to the mean B = Σ W / n, scaled by n to stay exact
            total, n = w.sum(0), w.shape[0]
            base, deltas = total / n, n * w - total
        # ties_deltas commutes with a positive scale (magnitude ranks, signs, means), so /n undoes the n·τ.
        merged[name] = (base + alpha * ties_deltas(deltas, density) / n).to(s.dtype)
    return merged


# ----------------------------------------------------------------------------- fixed merges

def merge(moe: nn.Module, method: str | None = None, *, shared_weight: float = 0.75,
          mixing_logits: dict[int, Tensor] | None = None, **options) -> nn.Module:
    """A dense model of the MoE's original class and config whose FFNs are the merged experts.

    `method`: a name of `MERGE_METHODS` — ``"init"`` (default without
    logits), ``"uniform"``, ``"learned"`` (default with `mixing_logits`:
    layer index -> `a^l`), ``"task_arithmetic"``, ``"ties"``, or one
    registered at runtime. `options`: the method's own (`MergeMethod.options`,
    e.g. ``density=0.5`` for ties); another name or a bad value is a
    ValueError. The MoE is left untouched.
    """
    merger = get_merge_method(method or ("learned" if mixing_logits is not None else "init"))
    merger.check_options(options)
    with torch.no_grad():  # layer by layer: a granular layer's joined experts live only while it is merged
        ffns = {block: _ffn_with(experts, merger(layer), merger.name)
                for _, block, experts, layer in _layers(moe, shared_weight, mixing_logits, options)}
    return _dense_copy(moe, ffns)


def merge_inputs(moe: nn.Module, shared_weight: float = 0.75, mixing_logits: dict[int, Tensor] | None = None,
                 options: dict | None = None) -> dict[int, MergeInput]:
    """Layer index -> what a merge method gets for that layer, after checking the arguments."""
    return {i: layer for i, _, _, layer in _layers(moe, shared_weight, mixing_logits, options)}


def _layers(moe: nn.Module, shared_weight: float, mixing_logits: dict[int, Tensor] | None,
            options: dict | None = None):
    """After checking the arguments, per layer in order: (index, block, its experts as N whole FFNs, MergeInput)."""
    blocks = _blocks_to_merge(moe, shared_weight)
    if mixing_logits is not None and set(mixing_logits) != set(blocks):
        raise ValueError(f"mixing logits given for layers {sorted(mixing_logits)}; the model has "
                         f"layers {sorted(blocks)}")
    logits = mixing_logits or {}
    for i, block in blocks.items():
        experts, config = whole_experts(block)
        stacks = {name: p.detach() for name, p in experts.named_parameters()}
        yield i, block, experts, MergeInput(stacks, config, shared_weight, logits.get(i), dict(options or {}))


def _blocks_to_merge(moe: nn.Module, shared_weight: float) -> dict[int, MoEBlock]:
    """The MoE blocks of `moe`, after checking the merge arguments."""
    if not 0.0 <= shared_weight <= 1.0:
        raise ValueError(f"shared_weight must be in [0, 1], got {shared_weight}")
    blocks = moe_blocks(moe)
    if not blocks:
        raise ValueError(f"{type(moe).__name__} has no MoE blocks to merge")
    return blocks


def average_experts(moe: nn.Module) -> nn.Module:
    """EWA's final merge: the plain average of all experts (`merge(method="uniform")`)."""
    return merge(moe, method="uniform")


def _ffn_with(experts: nn.Module, weights: dict[str, Tensor], method: str = "") -> nn.Module:
    """A copy of the FFN template `experts` (stacks [N, *shape]) with each stack replaced by `weights[name]`."""
    stacks = dict(experts.named_parameters())
    if set(weights) != set(stacks):
        raise ValueError(f"merge method {method!r} returned weights {sorted(weights)}; the FFN has {sorted(stacks)}")
    memo = {}
    for name, p in stacks.items():
        w = weights[name]
        if tuple(w.shape) != tuple(p.shape[1:]):
            raise ValueError(f"merge method {method!r} returned {name!r} of shape {tuple(w.shape)}; "
                             f"expected {tuple(p.shape[1:])}")
        w = w.detach().to(device=p.device, dtype=p.dtype)
        if w.untyped_storage().data_ptr() == p.untyped_storage().data_ptr():
            w = w.clone()  # a view of the stack (e.g. one expert's slice): the dense model gets its own copy
        memo[id(p)] = nn.Parameter(w, requires_grad=p.requires_grad)
    return copy.deepcopy(experts, memo)


@torch.no_grad()
def merged_ffn(experts: nn.Module, c: Tensor) -> nn.Module:
    """A copy of the FFN template `experts` whose parameters are `Σ_n c_n W_n` (computed in fp32)."""
    return _ffn_with(experts, weighted_sum(dict(experts.named_parameters()), c))


def _dense_copy(model: nn.Module, replacements: dict[nn.Module, nn.Module]) -> nn.Module:
    """A deep copy of `model` with the given modules replaced, stripped of xft's hooks and config entry."""
    memo = {id(old): new for old, new in replacements.items()}
    dense = copy.deepcopy(model, memo)
    remove_balance_loss(dense)  # the copy's handles point into the copy's hook dicts
    dense_config(dense.config)
    for p in dense.parameters():
        p.requires_grad_(True)
    return dense


# ----------------------------------------------------------------------------- learnable merge

class LearnableMerge(nn.Module):
    """Dense FFN whose weights are `Σ_n c_n(a) W_n` from frozen expert stacks; only `a` (and optionally λ) train."""

    def __init__(self, block: MoEBlock, shared_weight: float, learn_shared_weight: bool):
        super().__init__()
        experts, config = whole_experts(block)  # a granular block's shards joined into N whole experts
        self.experts = experts.requires_grad_(False)
        self.spec: FFNSpec | None = block.spec
        self.num_experts = config.num_experts
        self.shared_expert = config.shared_expert
        ref = next(self.experts.parameters())
        num_logits = config.num_routed
        # fp32 even for a bf16 model: updates of ~1e-5 would vanish in bf16.
        self.mixing_logits = nn.Parameter(torch.zeros(num_logits, dtype=torch.float32, device=ref.device))
        self.shared_weight = float(shared_weight)
        self._z3_leaf = True  # ZeRO-3: gather the stacks when this module is called (see MoEBlock)
        self.shared_logit = None
        if learn_shared_weight and self.shared_expert:  # λ = sigmoid(b), b initialised to logit(λ)
            lam = min(max(shared_weight, 1e-6), 1 - 1e-6)
            self.shared_logit = nn.Parameter(torch.tensor(math.log(lam / (1 - lam)), device=ref.device))

    def coefficients(self) -> Tensor:
        """Current mixing coefficients `[N]` (fp32, differentiable)."""
        lam = self.shared_logit.sigmoid() if self.shared_logit is not None else self.shared_weight
        return coefficients(self.num_experts, self.shared_expert, lam, self.mixing_logits)

    def forward(self, hidden: Tensor, *extra: Tensor) -> Tensor:
        """hidden [..., d] -> [..., d]; `extra` as for `MoEBlock` (token-aligned FFN arguments)."""
        stacks = dict(self.experts.named_parameters())
        c = self.coefficients().to(next(iter(stacks.values())).dtype)
        # [N] · [N, *shape] -> [*shape]: one merged weight per parameter; grads reach c only.
        w = {name: torch.tensordot(c, s, dims=1) for name, s in stacks.items()}
        return call_ffn(self.spec, self.experts, w, hidden, *extra)


def build_merge_model(moe: nn.Module, shared_weight: float = 0.75, learn_shared_weight: bool = False) -> nn.Module:
    """Turn `moe` (in place) into the learnable merge model and return it.

    Every MoE block becomes a `LearnableMerge`; all parameters are frozen
    except the mixing logits (and the per-layer shared weight if
    `learn_shared_weight`). Routers are dropped: the merged model has none.
    """
    _blocks_to_merge(moe, shared_weight)  # validates
    moe.requires_grad_(False)
    for parent in list(moe.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoEBlock):
                setattr(parent, name, LearnableMerge(child, shared_weight, learn_shared_weight).train(child.training))
    return moe


def merge_modules(model: nn.Module) -> dict[int, LearnableMerge]:
    """Layer index -> `LearnableMerge` module of a merge model."""
    return dict(enumerate(m for m in model.modules() if isinstance(m, LearnableMerge)))


def merge_coefficients(model: nn.Module) -> dict[int, list[float]]:
    """{layer: [c_0, ..., c_{N-1}]} of a merge model (c_0 is the shared expert's when there is one)."""
    with torch.no_grad():
        return {i: m.coefficients().tolist() for i, m in merge_modules(model).items()}


def compile_merge(model: nn.Module) -> nn.Module:
    """The learned merge as a plain dense model of the original class (the merge model is left as is)."""
    modules = merge_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} is not a merge model (see build_merge_model)")
    with torch.no_grad():
        ffns = {m: merged_ffn(m.experts, m.coefficients()) for m in modules.values()}
    return _dense_copy(model, ffns)
