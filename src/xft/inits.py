"""Upcycling inits: how an MoE block's experts start from the dense FFN (docs/method.md, "Beyond the paper").

`INITS` is the one list of them (`UpcycleConfig.init`'s choices). Each builds the
block's expert stacks from the FFN module, in place:

* ``"copy"`` — the paper's: N identical copies, every parameter stacked `[N, *shape]`.
* ``"drop"`` — Drop-Upcycling (Nakamura et al., ICLR 2025): the copies, then in every
  routed expert `round(drop_rate · I)` intermediate neurons, chosen independently per
  expert, are re-initialised: their rows of the input projections, their columns of
  the output projection and their input-bias entries, drawn from a normal with the
  mean and std of that dense parameter (per fused block). Neurons keep their index,
  so merging still averages like with like; the shared expert and every other
  parameter stay exact. Under routing ``"sparse"`` every expert is routed, so every
  expert is dropped. Not function-preserving (the routed experts differ).
* ``"granular"`` — granular upcycling (He et al., arXiv 2410.07524, as in
  Megatron-Core): each copy split along the intermediate dimension into G experts of
  size I/G. Stacks are `[N·G, *shard shape]`, stacked expert `e·G + j` holding
  neurons `[j·I/G, (j+1)·I/G)` of original expert `e`; a parameter without neurons
  (an output bias) is divided by G in every shard, so the G shards sum to the FFN.
  The router has R·G outputs and a token selects k·G of them (`UpcycleConfig.num_routed`,
  `routed_top_k`). The shared expert is kept as G shards that every token goes
  through with the shared weight: the stacks need one shape for every expert, and
  G always-on shards with one weight *are* the full FFN. At init the router is the
  copy init's with each output repeated G times ("virtual groups", `tie_groups`), so
  a token selects whole groups, and every routed shard's weight is multiplied by G
  ("weight scaling", `stack_weights`): with routings ``"xft"`` and ``"sparse"`` the
  MoE computes the dense FFN, as the copy init does. `whole_experts` joins the
  shards back into N FFNs of the dense shapes, for merging.

Random draws (drop) come from a CPU generator seeded with `UpcycleConfig.seed`, so an
init does not depend on the device.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

from xft.ffn import NeuronAxis, NeuronLayout

if TYPE_CHECKING:  # xft.config reads INITS lazily, for UpcycleConfig.init's choices
    from xft.config import UpcycleConfig
    from xft.routing import NoisyTopKGate


# (ffn, config, layout or None, generator or None: no random draws, the weights are loaded next) -> the
# experts container (the FFN module, its parameters turned into stacks in place)
Build = Callable[[nn.Module, "UpcycleConfig", "NeuronLayout | None", "torch.Generator | None"], nn.Module]


@dataclass(frozen=True)
class Init:
    """An entry of `INITS`: how the experts start from the dense FFN."""

    name: str
    help: str  # one line
    build: Build
    needs_layout: bool  # works on intermediate neurons (xft.ffn.neuron_layout)


# ----------------------------------------------------------------------------- copy

def stack_copies(ffn: nn.Module, n: int) -> nn.Module:
    """Turn `ffn` in place into the experts container: each parameter p -> independent [n, *p.shape] copies.

    One FFN parameter at a time, so peak memory is one stack plus the original.
    """
    for name, p in list(ffn.named_parameters()):
        # `clone` of an expanded view materialises n independent copies (no shared storage).
        _set_stack(ffn, name, p.detach().unsqueeze(0).expand(n, *p.shape).clone(), p.requires_grad)
    return ffn


def _set_stack(ffn: nn.Module, name: str, stack: Tensor, requires_grad: bool) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = ffn.get_submodule(owner_name) if owner_name else ffn
    setattr(owner, leaf, nn.Parameter(stack, requires_grad=requires_grad))


def _copy(ffn: nn.Module, config: UpcycleConfig, layout: NeuronLayout | None,
          generator: torch.Generator | None) -> nn.Module:
    return stack_copies(ffn, config.num_experts)


# ----------------------------------------------------------------------------- drop

@torch.no_grad()
def _drop(ffn: nn.Module, config: UpcycleConfig, layout: NeuronLayout, generator: torch.Generator | None) -> nn.Module:
    if generator is None:  # structure only
        return stack_copies(ffn, config.num_experts)
    stats = {name: _neuron_stats(p, layout.axes[name]) for name, p in ffn.named_parameters()
             if layout.axes[name] is not None}
    stacks = dict(stack_copies(ffn, config.num_experts).named_parameters())
    dropped = round(config.drop_rate * layout.size)
    for e in range(config.first_routed, config.num_experts):  # the routed experts
        index = torch.randperm(layout.size, generator=generator)[:dropped]  # [m] neurons of expert e
        for name, (mean, std) in stats.items():
            axis = layout.axes[name]
            neurons = axis.neurons(stacks[name][e])  # a view [..., blocks, I, ...]
            shape = list(neurons.shape)
            shape[axis.dim + 1] = dropped
            z = torch.randn(shape, generator=generator).to(mean.device)
            neurons.index_copy_(axis.dim + 1, index.to(neurons.device), (mean + std * z).to(neurons.dtype))
    return ffn


def _neuron_stats(p: Tensor, axis: NeuronAxis) -> tuple[Tensor, Tensor]:
    """(mean, std) of p per fused block, fp32, shaped to broadcast over `axis.neurons(p)` [..., blocks, I, ...]."""
    blocks = axis.neurons(p.detach().float()).movedim(axis.dim, 0).reshape(axis.blocks, -1)  # [blocks, *]
    shape = [1] * (p.dim() + 1)
    shape[axis.dim] = axis.blocks
    return blocks.mean(1).reshape(shape), blocks.std(1, correction=0).reshape(shape)


# ----------------------------------------------------------------------------- granular

@torch.no_grad()
def _granular(ffn: nn.Module, config: UpcycleConfig, layout: NeuronLayout,
              generator: torch.Generator | None) -> nn.Module:
    from xft.config import ConfigError

    g = config.granularity
    if layout.size % g:
        raise ConfigError(f"granularity={g} does not divide the intermediate size {layout.size} of "
                          f"{type(ffn).__name__}; choose a divisor of {layout.size}")
    for name, p in list(ffn.named_parameters()):
        shards = split(p.detach(), layout.axes[name], g)  # [G, *shard shape]
        # `repeat` tiles the G shards N times: stacked expert e·G + j is shard j of expert e, its own storage.
        _set_stack(ffn, name, shards.repeat(config.num_experts, *[1] * p.dim()), p.requires_grad)
    return ffn


def split(p: Tensor, axis: NeuronAxis | None, groups: int) -> Tensor:
    """p [*shape] -> its G shards [G, *shard shape], shard j the neurons [j·I/G, (j+1)·I/G) (without neurons: p/G)."""
    if axis is None:
        return (p / groups).expand(groups, *p.shape)
    shards = axis.neurons(p).unflatten(axis.dim + 1, (groups, -1))  # [..., blocks, G, I/G, ...]
    return shards.movedim(axis.dim + 1, 0).flatten(axis.dim + 1, axis.dim + 2)  # [G, ..., blocks·I/G, ...]


def join(stack: Tensor, axis: NeuronAxis | None, groups: int) -> Tensor:
    """Inverse of `split` per expert: [N·G, *shard shape] -> [N, *shape] (without neurons: the sum of the G)."""
    s = stack.unflatten(0, (-1, groups))  # [N, G, *shard shape]
    if axis is None:
        return s.sum(1, dtype=torch.promote_types(s.dtype, torch.float32)).to(s.dtype)
    d = axis.dim + 2  # the shards' neuron dimension in s
    s = s.unflatten(d, (axis.blocks, -1))  # [N, G, ..., blocks, I/G, ...]
    return s.movedim(1, d).flatten(d - 1, d + 1)  # [N, ..., blocks, G, I/G, ...] -> [N, ..., blocks·I, ...]


@torch.no_grad()
def tie_groups(gate: NoisyTopKGate, grouped: NoisyTopKGate, groups: int) -> NoisyTopKGate:
    """Set `grouped` (R·G outputs) to compute `gate`'s R logits, each repeated G times, and return it.

    "Virtual groups": a Linear whose outputs grew gets its rows repeated, one whose inputs grew (an MLP
    router's second layer) its columns repeated and divided by G. The G logits of one group come from
    identical rows, so they are equal and top-(k·G) selects whole groups.
    """
    for small, big in zip(gate.modules(), grouped.modules()):
        if isinstance(small, nn.Linear):
            w, b = small.weight, small.bias  # [out, in], [out]
            if big.out_features != small.out_features:
                w, b = w.repeat_interleave(groups, 0), None if b is None else b.repeat_interleave(groups)
            if big.in_features != small.in_features:
                w = w.repeat_interleave(groups, 1) / groups
            big.weight.copy_(w)
            if b is not None:
                big.bias.copy_(b)
        elif any(True for _ in small.parameters(recurse=False)):
            raise ValueError(f"granular init: cannot tie the outputs of router part {type(small).__name__} "
                             "(only Linear layers and parameter-free ones)")
    return grouped


def stack_weights(weights: Tensor, first_routed: int, groups: int) -> Tensor:
    """Routing weights [T, first_routed + R·G] -> one per stacked expert [T, (first_routed + R)·G]: the shared
    expert's weight on each of its G shards, every routed shard's weight times G (weight scaling)."""
    shared, routed = weights[:, :first_routed], weights[:, first_routed:]
    return torch.cat([shared.repeat_interleave(groups, 1), routed * groups], dim=1)


def whole_experts(block) -> tuple[nn.Module, UpcycleConfig]:
    """(experts container with one [N, *dense shape] stack per FFN parameter, the config they follow) of an
    `xft.MoEBlock`: what merging sees. A granular block's shards are joined back (in a new container, its
    stacks views of the block's where the layout allows; config granularity 1); any other block's are its own."""
    g = block.config.shards
    if g == 1:
        return block.experts, block.config
    memo = {id(p): nn.Parameter(join(p.detach(), block.layout.axes[name], g), requires_grad=p.requires_grad)
            for name, p in block.experts.named_parameters()}
    return copy.deepcopy(block.experts, memo), dataclasses.replace(block.config, granularity=1)


INITS: dict[str, Init] = {i.name: i for i in (
    Init("copy", "N identical copies of the dense FFN (the paper)", _copy, needs_layout=False),
    Init("drop", "Drop-Upcycling: the copies, a fraction drop_rate of each routed expert's neurons re-initialised "
                 "with the dense statistics", _drop, needs_layout=True),
    Init("granular", "granular upcycling: each copy split into granularity experts along the intermediate "
                     "dimension, router in virtual groups", _granular, needs_layout=True),
)}
