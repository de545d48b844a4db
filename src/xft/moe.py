"""`MoEBlock`: the drop-in replacement for a dense FFN (docs/method.md §1).

router -> routing weights -> experts -> weighted sum. Every FFN parameter of
the `N` experts is stored as one stacked tensor `[N, *shape]` inside
`block.experts`, a parameter-for-parameter twin of the original FFN module
(so `block.experts.gate_proj.weight` is `[N, I, d]`); expert `e` is the FFN
run with the `e`-th slices. How the stacks start is the config's `init`
(`xft.inits`): a granular block stacks `N·G` experts of intermediate size I/G,
the shared expert's G shards first. The experts module is only a container and a
template for `functional_call`; it is never called directly.

How the experts run is an entry of `EXPERT_IMPLS`, resolved once when the
block is built (or `block.expert_impl` is set); per forward only what depends
on the input (its device and dtype) is looked at:

* ``"fast"``: recognised MLPs (`xft.ffn.FFNSpec`), a matmul loop over experts;
* ``"grouped_mm"``: recognised MLPs, one `torch._grouped_mm` per linear layer;
* ``"generic"``: a loop of `torch.func.functional_call` on any FFN module;
* ``"auto"``: grouped_mm on CUDA when the sizes fit, else the loop (generic
  for FFNs that are not recognised).

Every kernel shares one `Dispatch` (T tokens, k routed experts per token): the
rows of all experts grouped by expert — the shared expert's T rows (every
token; T per shard of a granular block) first, then the T·k routed selections
sorted by expert — gathered once, each expert's FFN run on its contiguous
group, and the rows scaled by their routing weights and added back to their
tokens (`index_add_`).

Gradients of the stacks: the loop hands each expert a view of its slice and
writes that expert's weight gradient straight into one `[N, ...]` buffer
(`_ExpertViews`, `_ExpertLinear`); indexing `W[e]` would make every backward
write a full-size gradient per expert, and plain `unbind` views a stacking
copy of the whole gradient (docs/CORE_API.md, "Expert kernels"). The generic loop uses
`unbind`; grouped_mm takes the stacks whole.

The routing record (the per-token quantities `[T, R]` the balance method sums:
routed weights and load for cv2) that the model-level balance loss consumes is
built only when gradients are on or `record_routing` asks for it (the model's
hook sets it when labels are given). With ``balance="aux_free"`` the block also
holds `selection_bias` [R], added to the selection scores only (saved with the
model), and counts the load of the current optimizer step for its update
(`xft.balance_step`).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xft.ffn import FFNSpec, call_ffn, neuron_layout, recognize
from xft.inits import INITS, stack_weights, tie_groups
from xft.routing import NoisyTopKGate, get_balance, get_routing, token_quantities

if TYPE_CHECKING:  # xft.config imports this module for EXPERT_IMPLS
    from xft.config import UpcycleConfig


@dataclass
class RoutingRecord:
    """One forward's routing, for the balance loss and for logging (fp32, with the router's gradient)."""

    # name -> [T, R]: the per-token quantities the block's balance method sums (`xft.routing.token_quantities`;
    # cv2: "importance", the routed weights, and "load")
    quantities: dict[str, Tensor]

    @property
    def tokens(self) -> int:
        """T, the number of tokens routed."""
        return next(iter(self.quantities.values())).shape[0]

    def sums(self, token_mask: Tensor | None) -> dict[str, Tensor]:
        """name -> per-expert sum [R] over the tokens where `token_mask` [T] is true (all if None)."""
        return {k: (q if token_mask is None else q[token_mask]).sum(0) for k, q in self.quantities.items()}


class MoEBlock(nn.Module):
    """N experts (started from one FFN by `config.init`) behind a router; `forward(x [..., d]) -> [..., d]`.

    `generator`: the init's random draws (drop; default: one seeded with `config.seed`); `init_weights`
    False builds the structure only, for weights loaded next (no random draws).
    """

    def __init__(self, ffn: nn.Module, hidden_size: int, config: UpcycleConfig,
                 generator: torch.Generator | None = None, init_weights: bool = True):
        super().__init__()
        self.config = config
        self.routing = get_routing(config.routing)
        self.balance = get_balance(config.balance)
        self.num_experts = config.num_experts
        self.k = config.routed_top_k
        self.first_routed = config.first_routed
        self.shards = config.shards  # stacked experts per expert (granular: G)
        self.num_shared = config.first_routed * self.shards  # stacked experts every token goes through
        # Recognised once, before the parameters become stacks; `expert_impl` decides whether it is used.
        self._recognized: FFNSpec | None = recognize(ffn, hidden_size)
        ref = next(ffn.parameters())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            routed = config.scheme.num_routed(config.num_experts)  # R
            gate = NoisyTopKGate(config.router, hidden_size, routed, config.noisy_gating)
            if self.shards > 1:  # granular: the copy init's router, each output repeated for the G shards
                gate = tie_groups(gate, NoisyTopKGate(config.router, hidden_size, routed * self.shards,
                                                      config.noisy_gating), self.shards)
        self.gate = gate.to(device=ref.device, dtype=ref.dtype)
        init = INITS[config.init]
        # Where the FFN's parameters hold its intermediate neurons (inits that split or re-draw neurons).
        self.layout = neuron_layout(ffn, hidden_size, self._recognized) if init.needs_layout else None
        if init_weights and generator is None:
            generator = torch.Generator().manual_seed(config.seed)
        self.experts = init.build(ffn, config, self.layout, generator if init_weights else None)
        # Feature sizes of the stacked matrices (fixed from here on) and, per element size, whether
        # torch._grouped_mm takes them (`_grouped_mm_fits`).
        self._matrix_sizes = sorted({n for p in self.experts.parameters() if p.dim() == 3 for n in p.shape[1:]})
        self._grouped_fits: dict[int, bool] = {}
        self.expert_impl = config.expert_impl  # resolves `spec` and the kernel
        # Set per forward by the model's balance-loss hook: build the routing record even without gradients.
        self.record_routing = False
        self._record: RoutingRecord | None = None
        self.stats: dict[str, Tensor] = {}  # from the last `balance_term`: the sums [R], load [R], loss
        # aux_free: a per-expert bias [R] on the selection scores (None otherwise), a buffer so that checkpoints
        # and resumed runs keep it; fp32 like the routing math in any model dtype, so that steps of ~1e-3 are not
        # rounded away. `step_load` [R]: the load counted in this optimizer step's training forwards.
        self.register_buffer("selection_bias", torch.zeros(config.num_routed, device=ref.device, dtype=torch.float32)
                             if self.balance.selection_bias else None)
        self.step_load: Tensor | None = None
        # DeepSpeed ZeRO-3 gathers only the parameters of the module being called; the stacks live in
        # `self.experts`, which is never called, so mark the block a "leaf" to gather all of it at once.
        self._z3_leaf = True

    @property
    def expert_impl(self) -> str:
        """The expert kernel's name in `EXPERT_IMPLS` (setting it resolves the kernel; results do not change)."""
        return self._impl

    @expert_impl.setter
    def expert_impl(self, name: str) -> None:
        if name not in EXPERT_IMPLS:
            raise ValueError(f"unknown expert_impl {name!r}; expected one of {', '.join(EXPERT_IMPLS)}")
        impl = EXPERT_IMPLS[name]
        if impl.needs_spec and self._recognized is None:
            raise ValueError(f"expert_impl={name!r} but the FFN is not a recognised gated/plain MLP; "
                             "use expert_impl='auto' or 'generic'")
        # The FFN as direct matmuls, or None: `functional_call` on the experts template.
        self.spec: FFNSpec | None = None if name == "generic" else self._recognized
        self._impl = name
        self._kernel = impl.resolve(self)

    def expert_parameters(self) -> dict[str, nn.Parameter]:
        """FFN parameter name (as in the original FFN) -> live stacked parameter `[N, *shape]` (granular:
        `[N·G, *shard shape]`, see `xft.inits`)."""
        return dict(self.experts.named_parameters())

    def forward(self, hidden: Tensor, *extra: Tensor) -> Tensor:
        """hidden [..., d] -> [..., d]. `extra`: token-aligned tensors the FFN also takes (Bloom's residual)."""
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])  # [T, d]
        extra = tuple(e.reshape(x.shape[0], *e.shape[len(shape) - 1:]) for e in extra)
        clean, logits, std = self.gate(x)  # [T, R] each; std None without noise
        logits = logits.float()
        weights, top_i = self.routing.combine(logits, self.k, self.selection_bias)  # [T, N] fp32, [T, k]
        if torch.is_grad_enabled() or self.record_routing:
            self._record = RoutingRecord(token_quantities(self.balance.sums, weights[:, self.first_routed:], top_i,
                                                          clean.float(), logits, std, self.config.load_estimate))
        if self.shards > 1:  # granular: one weight per stacked expert; a shard carries 1/G of the extra inputs
            weights = stack_weights(weights, self.first_routed, self.shards)
            extra = tuple(e / self.shards for e in extra)
        y = self._kernel(self, x, extra, weights.to(x.dtype), top_i)
        if self.spec is not None and self.spec.dropout is not None:
            y = self.spec.dropout(y)
        return y.reshape(shape)

    def routing_record(self) -> RoutingRecord | None:
        """The last forward's routing record, unless consumed or not built (no gradients, not asked for)."""
        return self._record

    def drop_routing_record(self) -> None:
        """Forget the last forward's routing record (nothing will consume it)."""
        self._record = None

    def finish_balance_loss(self, token_mask: Tensor | None) -> Tensor:
        """This forward's balance loss over the tokens where `token_mask` [T] is true (all if None).

        Consumes the routing record and keeps its stats in `self.stats`.
        """
        return self.balance_term(self.balance_sums(token_mask))

    def balance_sums(self, token_mask: Tensor | None) -> dict[str, Tensor]:
        """This forward's per-expert sums [R] (`Balance.sums`) over the tokens where `token_mask` [T] is true.

        Consumes the routing record. In training, an aux-free block adds the load to `step_load`.
        """
        sums = self._record.sums(token_mask)
        self._record = None
        if self.selection_bias is not None and self.training:
            load = sums[self.balance.load].detach()
            self.step_load = load if self.step_load is None else self.step_load + load
        return sums

    def balance_term(self, sums: dict[str, Tensor], earlier: dict[str, Tensor] | None = None) -> Tensor:
        """The balance loss of `sums` {name: [R]}, less that of `earlier` (sums already counted, detached).

        Keeps the stats of `sums` (detached, with the loss and, for aux_free, the bias spread) in `self.stats`.
        """
        loss = self.balance.loss(sums, self.config.balance_loss_weight)
        self.stats = {**{k: v.detach() for k, v in sums.items()}, "load": sums[self.balance.load].detach(),
                      "balance_loss": loss.detach()}
        if self.selection_bias is not None:
            self.stats["bias_spread"] = self.selection_bias.max() - self.selection_bias.min()
        if earlier is not None:
            loss = loss - self.balance.loss(earlier, self.config.balance_loss_weight)
        return loss

    def _grouped_mm_fits(self, x: Tensor, warn: bool = True) -> bool:
        """Whether `torch._grouped_mm` takes this block's matrices in `x`'s dtype.

        It needs every matrix row to be a multiple of 16 bytes, in fp32 and bf16, on CUDA (H100, torch
        2.11) and on CPU (torch 2.13): an FFN size of 30 fails with "strides should be multiple of 16
        bytes". Group offsets need no alignment and empty groups are fine. When the sizes do not fit,
        the block runs the loop kernel, which computes the same (and warns, when grouped_mm was asked for).
        """
        size = x.element_size()
        fits = self._grouped_fits.get(size)
        if fits is None:
            fits = self._grouped_fits[size] = all(n * size % 16 == 0 for n in self._matrix_sizes)
        if not fits and warn:
            warnings.warn(f"expert_impl='grouped_mm' needs FFN sizes whose {x.dtype} rows are multiples of "
                          f"16 bytes (sizes {self._matrix_sizes}); running the per-expert loop instead",
                          stacklevel=4)
        return fits

    def extra_repr(self) -> str:
        c = self.config
        init = f", init={c.init!r}" + (f", granularity={c.granularity}" if c.init == "granular" else "")
        return (f"num_experts={c.num_experts}, top_k={c.top_k}, routing={c.routing!r}{init}, "
                f"expert_impl={self.expert_impl!r}")


# ----------------------------------------------------------------------------- dispatch

class Dispatch:
    """One forward's selections as groups of rows, one per stacked expert in order (N, or N·G granular).

    The `num_shared` shared groups (the shared expert, or its G shards) come first, each every token (weight
    `weights[:, s]`); then the T·k routed selections sorted by expert (stable: by token within an expert).
    Row j is token `token[j]` with weight `gate[j]`.
    """

    def __init__(self, weights: Tensor, top_i: Tensor, num_shared: int):
        """weights [T, S + R] (one per stacked expert, x's dtype), top_i [T, k] routed indices, S = num_shared."""
        tokens, k = top_i.shape
        flat = top_i.flatten()  # [T*k] routed index of each selection, token-major
        order = flat.argsort(stable=True)  # [T*k]
        token = order // k  # [T*k] token of each sorted selection
        gate = weights[:, num_shared:].gather(1, top_i).flatten()[order]  # [T*k]
        counts = torch.bincount(flat, minlength=weights.shape[1] - num_shared)  # [R] routed group sizes
        if num_shared:  # the shared groups: every token, in order, per shared expert
            token = torch.cat([torch.arange(tokens, device=token.device).repeat(num_shared), token])
            gate = torch.cat([weights[:, :num_shared].t().flatten(), gate])
            counts = torch.cat([counts.new_full((num_shared,), tokens), counts])
        self.token = token  # [M] row -> token, M = T·k (+ S·T)
        self.gate = gate[:, None]  # [M, 1]
        self.counts = counts  # [S + R] rows per stacked expert

    def groups(self, sizes: list[int]) -> list[tuple[int, slice]]:
        """(expert, its rows) of the non-empty groups, from the group sizes on the host (`counts.tolist()`)."""
        starts = itertools.accumulate(sizes, initial=0)
        return [(e, slice(a, a + n)) for e, (a, n) in enumerate(zip(starts, sizes)) if n]

    def gather(self, t: Tensor, rows: slice = slice(None)) -> Tensor:
        """t [T, ...] -> [m, ...]: the token of each of these rows (all M by default)."""
        return t.index_select(0, self.token[rows])

    def scatter(self, out: Tensor, y: Tensor, rows: slice = slice(None)) -> Tensor:
        """out [T, d] += these rows' outputs y [m, d] scaled by their weights, added to their tokens."""
        return out.index_add_(0, self.token[rows], y * self.gate[rows])


class _StackGrad:
    """The gradient `[N, *shape]` of one expert stack, written expert by expert in the backward."""

    def __init__(self, stack: Tensor):
        # Shape, dtype and device as in the forward (ZeRO-3 may hold the parameter partitioned in between).
        self.shape, self.like = stack.shape, {"dtype": stack.dtype, "device": stack.device}
        self.buf: Tensor | None = None
        self.written: set[int] = set()

    def slot(self, e: int) -> Tensor:
        """Where expert e's gradient `[*shape]` goes."""
        if self.buf is None:
            self.buf = torch.empty(self.shape, **self.like)
        self.written.add(e)
        return self.buf[e]

    def take(self, grads: tuple[Tensor | None, ...]) -> Tensor:
        """The whole gradient: the written slots, plus `grads` [N] of the views (None: unused), zeros elsewhere."""
        buf, written = self.buf, self.written
        self.buf, self.written = None, set()  # a second backward (retain_graph) starts afresh
        if buf is None:
            buf = torch.empty(self.shape, **self.like)
        for e, g in enumerate(grads):
            if e not in written:
                buf[e].zero_()
            if g is not None:
                buf[e].add_(g)
        return buf


class _ExpertViews(torch.autograd.Function):
    """`stack.unbind(0)` whose backward returns the gradient the `_ExpertLinear`s wrote into one buffer.

    Plain `unbind` would stack N separate expert gradients in its backward, a copy of the whole stack
    (~30% of a step at T=64 on CPU); indexing `W[e]` per expert would be worse, a full-size gradient
    per expert (docs/CORE_API.md).
    """

    @staticmethod
    def forward(ctx, stack: Tensor, sink: _StackGrad) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.sink = sink
        return stack.unbind(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor | None):
        return ctx.sink.take(grads), None


class _ExpertLinear(torch.autograd.Function):
    """F.linear(x [n, in], w [out, in], b) for expert e, whose weight gradient goes into slot e of `sink`.

    `transposed`: w is [in, out] (GPT-2's Conv1D). The view w itself gets no gradient (`_ExpertViews`).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, sink: _StackGrad, e: int, transposed: bool) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.sink, ctx.e, ctx.transposed, ctx.bias = sink, e, transposed, b is not None
        w_t = w if transposed else w.t()  # [in, out]
        return torch.mm(x, w_t) if b is None else torch.addmm(b, x, w_t)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):
        x, w = ctx.saved_tensors
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = dy.mm(w.t() if ctx.transposed else w)  # [n, in]
        if ctx.needs_input_grad[1]:
            slot = ctx.sink.slot(ctx.e)
            torch.mm(x.t(), dy, out=slot) if ctx.transposed else torch.mm(dy.t(), x, out=slot)
        if ctx.bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, None, db, None, None, None


def _autocast(h: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """(h, w) in the autocast dtype where autocast is on, as `F.linear` would run."""
    device = h.device.type
    if not torch.is_autocast_enabled(device):
        return h, w
    dtype = torch.get_autocast_dtype(device)
    return h.to(dtype), w.to(dtype)


def _bias_rows(y: Tensor, bias: Tensor | None, counts: Tensor) -> Tensor:
    """y [M, out] + each row's expert's bias (bias [G, out])."""
    if bias is None:
        return y
    return y + bias.repeat_interleave(counts, dim=0, output_size=y.shape[0])


# ----------------------------------------------------------------------------- kernels

def _run_loop(block: MoEBlock, x: Tensor, extra: tuple[Tensor, ...], weights: Tensor, top_i: Tensor) -> Tensor:
    """x [T, d], weights [T, N], top_i [T, k] -> Σ_e weights[:, e] · FFN_e(x): the spec's FFN per expert on
    its group of rows; one host sync, for the group sizes."""
    spec, d = block.spec, Dispatch(weights, top_i, block.num_shared)
    sizes = d.counts.tolist()  # the one host sync
    # Under autocast, plain F.linear on the views (its casts, gradients stacked by _ExpertViews).
    direct = torch.is_autocast_enabled(x.device.type)
    views, sinks = {}, {}
    for name, p in block.experts.named_parameters():
        sinks[name] = _StackGrad(p) if p.requires_grad and torch.is_grad_enabled() else None
        views[name] = _ExpertViews.apply(p, sinks[name]) if sinks[name] is not None else p.unbind(0)

    def expert(e: int, rows: Tensor) -> Tensor:
        def linear(name: str, h: Tensor) -> Tensor:
            w, b = views[f"{name}.weight"][e], views.get(f"{name}.bias")
            b = None if b is None else b[e]
            sink, transposed = sinks[f"{name}.weight"], name in spec.transposed
            if sink is None or direct:
                return F.linear(h, w.t() if transposed else w, b)
            return _ExpertLinear.apply(h, w, b, sink, e, transposed)
        return spec.run(rows, linear)

    # Expert by expert (gather, FFN, scatter): small buffers, still in cache, at any T.
    out = torch.zeros_like(x)
    for e, rows in d.groups(sizes):
        d.scatter(out, expert(e, d.gather(x, rows)), rows)
    return out


def _run_grouped(block: MoEBlock, x: Tensor, extra: tuple[Tensor, ...], weights: Tensor, top_i: Tensor) -> Tensor:
    """Same result as `_run_loop`, each layer as one `torch._grouped_mm` over all experts.

    The GPU fast path (no host sync, one kernel per layer); needs feature sizes whose rows are
    multiples of 16 bytes (`MoEBlock._grouped_mm_fits`), else runs the loop.
    """
    if not block._grouped_mm_fits(x, warn=block.expert_impl == "grouped_mm"):
        return _run_loop(block, x, extra, weights, top_i)
    spec, d = block.spec, Dispatch(weights, top_i, block.num_shared)
    stacks = block.expert_parameters()
    offs = d.counts.cumsum(0).to(torch.int32)  # [N] end row of each expert's group

    def linear(name: str, h: Tensor) -> Tensor:  # h [M, in] -> [M, out], row j with its expert's weights
        w = stacks[f"{name}.weight"]  # [N, out, in] (Linear) or [N, in, out] (Conv1D)
        h, w = _autocast(h, w if name in spec.transposed else w.transpose(-2, -1))
        return _bias_rows(torch._grouped_mm(h, w, offs=offs), stacks.get(f"{name}.bias"), d.counts)

    return d.scatter(torch.zeros_like(x), spec.run(d.gather(x), linear))


def _run_generic(block: MoEBlock, x: Tensor, extra: tuple[Tensor, ...], weights: Tensor, top_i: Tensor) -> Tensor:
    """Same result for any FFN module: `functional_call` per expert on its group of rows.

    The stacks are `unbind`-ed once: indexing `W[e]` per expert would make every backward write a
    full-size `[N, ...]` gradient (docs/CORE_API.md).
    """
    d = Dispatch(weights, top_i, block.num_shared)
    sizes = d.counts.tolist()  # the one host sync
    stacks = {name: p.unbind(0) for name, p in block.experts.named_parameters()}  # N × [*shape] each
    out = torch.zeros_like(x)
    for e, rows in d.groups(sizes):
        y = call_ffn(block.spec, block.experts, {n: w[e] for n, w in stacks.items()},
                     *(d.gather(t, rows) for t in (x, *extra)))
        d.scatter(out, y, rows)
    return out


def _run_auto(block: MoEBlock, x: Tensor, extra: tuple[Tensor, ...], weights: Tensor, top_i: Tensor) -> Tensor:
    """grouped_mm on CUDA when the sizes fit (measured faster there, docs/CORE_API.md), else the loop."""
    grouped = x.is_cuda and block._grouped_mm_fits(x, warn=False)
    return (_run_grouped if grouped else _run_loop)(block, x, extra, weights, top_i)


Kernel = Callable[[MoEBlock, Tensor, tuple[Tensor, ...], Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ExpertImpl:
    """An entry of `EXPERT_IMPLS`: how a block runs its experts."""

    kernel: Kernel  # (block, x [T, d], extra, weights [T, N] in x's dtype, top_i [T, k]) -> [T, d]
    needs_spec: bool  # only for FFNs `xft.ffn.recognize` describes (gated/plain MLPs)

    def resolve(self, block: MoEBlock) -> Kernel:
        """The kernel `block` runs: "auto" is generic without a spec, the loop without grouped_mm in torch."""
        if self.kernel is _run_auto and block.spec is None:
            return _run_generic
        if self.kernel is _run_auto and not hasattr(torch, "_grouped_mm"):
            return _run_loop
        return self.kernel


# (auto: grouped_mm where it was measured faster, on CUDA; the loop elsewhere: the numbers are in
# docs/CORE_API.md.)
EXPERT_IMPLS: dict[str, ExpertImpl] = {
    "auto": ExpertImpl(_run_auto, needs_spec=False),
    "fast": ExpertImpl(_run_loop, needs_spec=True),
    "grouped_mm": ExpertImpl(_run_grouped, needs_spec=True),
    "generic": ExpertImpl(_run_generic, needs_spec=False),
}

