"""`MoEBlock`: the drop-in replacement for a dense FFN (docs/method.md §1).

router -> routing weights -> experts -> weighted sum. Every FFN parameter of
the `N` experts is stored as one stacked tensor `[N, *shape]` inside
`block.experts`, a parameter-for-parameter twin of the original FFN module
(so `block.experts.gate_proj.weight` is `[N, I, d]`); expert `e` is the FFN
run with the `e`-th slices. The experts module is only a container and a
template for `functional_call`; it is never called directly.

Compute, per forward (T tokens): the shared expert (if any) runs as one dense
matmul on all tokens; routed selections are sorted by expert once, then each
routed expert runs on its contiguous group of tokens (`index_select` →
FFN → scale → `index_add_`). The stacks are `unbind`-ed once per forward:
indexing `W[e]` inside the loop would make every backward write a full-size
`[N, ...]` gradient (see shared/MEASURED.md).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.func import functional_call

from xft.config import UpcycleConfig

EXPERT_IMPLS = ("auto", "fast", "grouped_mm", "generic")  # expert compute strategies (see UpcycleConfig.expert_impl)
from xft.ffn import FFNSpec, recognize
from xft.routing import NoisyTopKGate, balance_loss, get_routing, per_token_load


class MoEBlock(nn.Module):
    """N experts (copies of one FFN) behind a router; `forward(x [..., d]) -> [..., d]`."""

    def __init__(self, ffn: nn.Module, hidden_size: int, config: UpcycleConfig):
        super().__init__()
        self.config = config
        self.routing = get_routing(config.routing)
        self.num_experts = config.num_experts
        self.k = config.routed_top_k
        self.first_routed = 1 if config.shared_expert else 0
        spec = recognize(ffn, hidden_size) if config.expert_impl != "generic" else None
        if config.expert_impl in ("fast", "grouped_mm") and spec is None:
            raise ValueError(f"expert_impl={config.expert_impl!r} but {type(ffn).__name__} is not a "
                             "recognised gated/plain MLP; use expert_impl='auto' or 'generic'")
        self.spec: FFNSpec | None = spec
        # grouped: always torch._grouped_mm (when the sizes fit); auto_grouped: on CUDA only, where it was
        # measured faster (H100 bf16: 0.9-1.5x the ideal vs 1.7-2.7x for the loop; fp32 on par; docs/CORE_API.md)
        self.grouped = config.expert_impl == "grouped_mm"
        self.auto_grouped = config.expert_impl == "auto" and spec is not None and hasattr(torch, "_grouped_mm")
        ref = next(ffn.parameters())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            gate = NoisyTopKGate(config.router, hidden_size, config.num_routed, config.noisy_gating)
        self.gate = gate.to(device=ref.device, dtype=ref.dtype)
        self.experts = _stack_parameters(ffn, config.num_experts)
        # Feature sizes of the stacked matrices (fixed from here on), for `_grouped_mm_fits` on every forward.
        self._matrix_sizes = sorted({n for p in self.experts.parameters() if p.dim() == 3 for n in p.shape[1:]})
        # Filled by forward, consumed by the model-level hook (balance loss, logging): [T, R] each.
        self._routed_weights: Tensor | None = None
        self._load_per_token: Tensor | None = None
        self.stats: dict[str, Tensor] = {}
        # DeepSpeed ZeRO-3 gathers only the parameters of the module being called; the stacks live in
        # `self.experts`, which is never called, so mark the block a "leaf" to gather all of it at once.
        self._z3_leaf = True

    def expert_parameters(self) -> dict[str, nn.Parameter]:
        """FFN parameter name (as in the original FFN) -> live stacked parameter `[N, *shape]`."""
        return dict(self.experts.named_parameters())

    def forward(self, hidden: Tensor, *extra: Tensor) -> Tensor:
        """hidden [..., d] -> [..., d]. `extra`: token-aligned tensors the FFN also takes (Bloom's residual)."""
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])  # [T, d]
        extra = tuple(e.reshape(x.shape[0], *e.shape[len(shape) - 1:]) for e in extra)
        clean, logits, std = self.gate(x)  # [T, R] each; std None without noise
        weights, top_i = self.routing.combine(logits.float(), self.k)  # [T, N] fp32, [T, k]
        self._record_routing(weights, top_i, clean.float(), logits.float(), std)
        grouped = ((self.grouped and self._grouped_mm_fits(x))
                   or (self.auto_grouped and x.is_cuda and self._grouped_mm_fits(x, warn=False)))
        run = self._run_grouped if grouped else self._run_experts
        y = run(x, extra, weights.to(x.dtype), top_i)
        if self.spec is not None and self.spec.dropout is not None:
            y = self.spec.dropout(y)
        return y.reshape(shape)

    def _record_routing(self, weights: Tensor, top_i: Tensor, clean: Tensor, noisy: Tensor,
                        std: Tensor | None) -> None:
        self._routed_weights = weights[:, self.first_routed:]
        self._load_per_token = per_token_load(top_i, clean.shape[-1], clean, noisy, std,
                                              self.config.load_estimate)

    def finish_balance_loss(self, token_mask: Tensor | None) -> Tensor:
        """This forward's balance loss over the tokens where `token_mask` [T] is true (all if None)."""
        w, load = self._routed_weights, self._load_per_token
        if token_mask is not None:
            w, load = w[token_mask], load[token_mask]
        importance, load = w.sum(0), load.sum(0)  # [R] each
        loss = balance_loss(importance, load, self.config.balance_loss_weight)
        self.stats = {"importance": importance.detach(), "load": load.detach(), "balance_loss": loss.detach()}
        self._routed_weights = self._load_per_token = None
        return loss

    def _run_experts(self, x: Tensor, extra: tuple[Tensor, ...], weights: Tensor, top_i: Tensor) -> Tensor:
        """x [T, d], weights [T, N], top_i [T, k] (routed indices) -> Σ_e weights[:, e] · FFN_e(x)."""
        params = {name: p.unbind(0) for name, p in self.experts.named_parameters()}
        run = self._expert_fn(params)
        s = self.first_routed
        out = run(0, x, *extra) * weights[:, :1] if s else torch.zeros_like(x)
        flat = top_i.flatten()  # [T*k] routed index of each selection
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=weights.shape[-1] - s).tolist()  # one host sync
        token = order // self.k  # [T*k] token of each selection, grouped by expert
        gate = weights[:, s:].gather(1, top_i).flatten()[order]  # [T*k] matching weights
        start = 0
        for r, count in enumerate(counts):
            if count:
                idx, g = token[start:start + count], gate[start:start + count, None]
                rows = (t.index_select(0, idx) for t in (x, *extra))
                out.index_add_(0, idx, run(r + s, *rows) * g)
                start += count
        return out

    def _grouped_mm_fits(self, x: Tensor, warn: bool = True) -> bool:
        """Whether `torch._grouped_mm` takes this block's matrices in `x`'s dtype.

        It needs every matrix row to be a multiple of 16 bytes, in fp32 and bf16, on CUDA (H100, torch
        2.11) and on CPU (torch 2.13): an FFN size of 30 fails with "strides should be multiple of 16
        bytes". Group offsets need no alignment and empty groups are fine. When the sizes do not fit,
        the block runs the loop kernel, which computes the same, and warns.
        """
        sizes = self._matrix_sizes
        if all(n * x.element_size() % 16 == 0 for n in sizes):
            return True
        if warn:
            warnings.warn(f"expert_impl='grouped_mm' needs FFN sizes whose {x.dtype} rows are multiples of "
                          f"16 bytes (sizes {sizes}); running the per-expert loop instead", stacklevel=3)
        return False

    def _run_grouped(self, x: Tensor, extra: tuple[Tensor, ...], weights: Tensor, top_i: Tensor) -> Tensor:
        """Same result as `_run_experts`, routed experts as one `torch._grouped_mm` per linear layer.

        The GPU fast path (no host sync, one kernel per layer); needs feature sizes whose rows are
        multiples of 16 bytes (`_grouped_mm_fits`). Shared expert: one dense matmul on all tokens.
        """
        spec, s, k = self.spec, self.first_routed, self.k
        stacks = dict(self.experts.named_parameters())
        out = spec({n: p[0] for n, p in stacks.items()}, x) * weights[:, :1] if s else torch.zeros_like(x)
        flat = top_i.flatten()
        order = flat.argsort(stable=True)
        token = order // k  # [T*k] selections grouped by expert
        counts = torch.bincount(flat, minlength=weights.shape[-1] - s)  # [R]
        offs = counts.cumsum(0).to(torch.int32)

        def linear(name: str, h: Tensor) -> Tensor:  # h [T*k, in] -> [T*k, out], row i with its expert
            w = stacks[f"{name}.weight"][s:]  # [R, out, in] (Linear) or [R, in, out] (Conv1D)
            y = torch._grouped_mm(h, w if name in spec.transposed else w.transpose(-2, -1), offs=offs)
            bias = stacks.get(f"{name}.bias")
            if bias is not None:
                y = y + bias[s:].repeat_interleave(counts, dim=0, output_size=h.shape[0])
            return y

        xs = x.index_select(0, token)
        h = linear(spec.up, xs)
        h = spec.act(h) if spec.gate is None else spec.act(linear(spec.gate, xs)) * h
        gate = weights[:, s:].gather(1, top_i).flatten()[order, None]  # [T*k, 1]
        return out.index_add_(0, token, linear(spec.down, h) * gate)

    def _expert_fn(self, params: dict[str, tuple[Tensor, ...]]):
        """(e, x [t, d], *extra) -> expert e's FFN output [t, d], through the fast spec or `functional_call`."""
        if self.spec is not None:
            return lambda e, x: self.spec({n: w[e] for n, w in params.items()}, x)
        return lambda e, *xs: functional_call(self.experts, {n: w[e] for n, w in params.items()}, xs)

    def extra_repr(self) -> str:
        c = self.config
        return (f"num_experts={c.num_experts}, top_k={c.top_k}, routing={c.routing!r}, "
                f"impl={'grouped_mm' if self.grouped else 'auto (grouped_mm on CUDA, else fast)' if self.auto_grouped else 'fast' if self.spec is not None else 'generic'}")


def _stack_parameters(ffn: nn.Module, n: int) -> nn.Module:
    """Turn `ffn` in place into the experts container: each parameter p -> independent [n, *p.shape] copies.

    One FFN parameter at a time, so peak memory is one stack plus the original.
    """
    for name, p in list(ffn.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        owner = ffn.get_submodule(owner_name) if owner_name else ffn
        # `clone` of an expanded view materialises n independent copies (no shared storage).
        stack = p.detach().unsqueeze(0).expand(n, *p.shape).clone()
        setattr(owner, leaf, nn.Parameter(stack, requires_grad=p.requires_grad))
    return ffn
