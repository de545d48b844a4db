"""Merging (MoE -> dense, docs/method.md §3): fixed-coefficient merges and the learnable merge.

For each layer `l` the experts are mixed with coefficients `c^l ∈ R^N`:

* shared-expert routings: `c = [λ, (1-λ)·softmax(a^l)]`, `a^l ∈ R^{N-1}`
  (zeros = the paper's init merge, each routed expert `(1-λ)/(N-1)`);
* ``"sparse"`` (no shared expert): `c = softmax(a^l)`, `a^l ∈ R^N`;
* ``"uniform"``: `c = 1/N` (also EWA's final merge).

and every FFN parameter becomes `W^l = Σ_n c_n · W_n^l`. Merge methods are
entries of `MERGE_METHODS`. `merge` compiles directly; `build_merge_model`
turns an MoE (in place) into a model of the dense architecture whose FFN
weights are computed from the expert stacks and learnable `a^l` on the fly,
and `compile_merge` writes the learned result into a plain dense model of the
original class — no trace of xft in its config or modules.

Memory: the learnable merge keeps the stacks in the model's dtype (no fp32
copy) and materialises one merged weight per FFN parameter per forward; the
gradient w.r.t. `a^l` flows through it (`dL/dc_n = <dL/dW, W_n>`).
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from xft.ffn import FFNSpec
from xft.moe import MoEBlock
from xft.hfconfig import dense_config
from xft.upcycle import _add_balance_loss, moe_blocks


def coefficients(num_experts: int, shared_expert: bool, shared_weight: float | Tensor,
                 logits: Tensor) -> Tensor:
    """Mixing coefficients `[N]` (fp32) from the shared weight λ and mixing logits `a` ([N-1] or [N])."""
    if shared_expert:
        lam = torch.as_tensor(shared_weight, dtype=torch.float32, device=logits.device).reshape(1)
        return torch.cat([lam, (1 - lam) * logits.float().softmax(-1)])
    return logits.float().softmax(-1)


def _init(block: MoEBlock, shared_weight: float, logits: Tensor | None) -> Tensor:
    n, shared = block.num_experts, block.first_routed == 1
    zeros = torch.zeros(n - 1 if shared else n)
    return coefficients(n, shared, shared_weight, zeros)


def _uniform(block: MoEBlock, shared_weight: float, logits: Tensor | None) -> Tensor:
    return torch.full((block.num_experts,), 1.0 / block.num_experts)


def _learned(block: MoEBlock, shared_weight: float, logits: Tensor | None) -> Tensor:
    if logits is None:
        raise ValueError("method 'learned' needs mixing logits for every layer")
    n, shared = block.num_experts, block.first_routed == 1
    expected = n - 1 if shared else n
    if logits.shape != (expected,):
        raise ValueError(f"mixing logits of shape {tuple(logits.shape)}; expected ({expected},) "
                         f"for {n} experts with routing {block.config.routing!r}")
    return coefficients(n, shared, shared_weight, logits.detach().cpu())


# (block, shared weight λ, logits for that layer or None) -> coefficients [N]
MERGE_METHODS: dict[str, Callable[[MoEBlock, float, Tensor | None], Tensor]] = {
    "init": _init, "uniform": _uniform, "learned": _learned,
}


def merge(moe: nn.Module, shared_weight: float = 0.75, mixing_logits: dict[int, Tensor] | None = None,
          method: str | None = None) -> nn.Module:
    """A dense model of the MoE's original class and config whose FFNs are the merged experts.

    `method`: ``"init"`` (default without logits), ``"uniform"``, or
    ``"learned"`` (default with `mixing_logits`: layer index -> `a^l`).
    The MoE is left untouched.
    """
    method = method or ("learned" if mixing_logits is not None else "init")
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; expected one of {sorted(MERGE_METHODS)}")
    blocks = _blocks_to_merge(moe, shared_weight)
    logits = mixing_logits or {}
    if mixing_logits is not None and set(mixing_logits) != set(blocks):
        raise ValueError(f"mixing logits given for layers {sorted(mixing_logits)}; the model has "
                         f"layers {sorted(blocks)}")
    ffns = {}
    for i, block in blocks.items():
        c = MERGE_METHODS[method](block, shared_weight, logits.get(i))
        ffns[block] = merged_ffn(block.experts, c)
    return _dense_copy(moe, ffns)


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


@torch.no_grad()
def merged_ffn(experts: nn.Module, c: Tensor) -> nn.Module:
    """A copy of the FFN template `experts` whose parameters are `Σ_n c_n W_n` (computed in fp32)."""
    memo = {}
    for p in experts.parameters():
        acc = torch.zeros(p.shape[1:], dtype=torch.float32, device=p.device)
        for n in range(p.shape[0]):  # one fp32 temporary per parameter, not a fp32 copy of the stack
            acc.add_(p[n].float(), alpha=float(c[n]))
        memo[id(p)] = nn.Parameter(acc.to(p.dtype), requires_grad=p.requires_grad)
    return copy.deepcopy(experts, memo)


def _dense_copy(model: nn.Module, replacements: dict[nn.Module, nn.Module]) -> nn.Module:
    """A deep copy of `model` with the given modules replaced, stripped of xft's hooks and config entry."""
    from xft.upcycle import remove_balance_loss  # here, not at the top: this change stays inside the function

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
        self.experts = block.experts.requires_grad_(False)
        self.spec: FFNSpec | None = block.spec
        self.num_experts = block.num_experts
        self.shared_expert = block.first_routed == 1
        ref = next(self.experts.parameters())
        num_logits = self.num_experts - 1 if self.shared_expert else self.num_experts
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
        if self.spec is not None:
            shape = hidden.shape
            y = self.spec(w, hidden.reshape(-1, shape[-1])).reshape(shape)
            return self.spec.dropout(y) if self.spec.dropout is not None else y
        return functional_call(self.experts, w, (hidden, *extra))


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
        ffns = {m: merged_ffn(m.experts, m.coefficients().detach()) for m in modules.values()}
    return _dense_copy(model, ffns)
