"""Upcycling (dense -> MoE) and what an upcycled model offers: expert access, stats, EWA.

`upcycle(model, config)` swaps each decoder layer's FFN for an `MoEBlock` in
place; attention, norms, caches and `generate` stay `transformers`'. The model
keeps its class; its config gains an ``"xft"`` entry (the `UpcycleConfig`) and
is written as model type ``xft_moe`` (see `xft.hfconfig`), so `save_pretrained`
records how to rebuild it, `xft.load` does, and tools that do not know xft
refuse it instead of loading the dense architecture.

The load-balancing loss is added to `outputs.loss` by a forward hook on the
model when labels are given: the sum over layers of each block's loss,
computed over the non-padding tokens (`attention_mask`), so padding never
changes it. A pre-hook asks the blocks for their routing record when labels
are given (without gradients they build none otherwise). Both hooks' handles
live on the model (so a deep copy carries handles to its own hooks), and
`remove_balance_loss(model)` removes them.

With ``balance_scope="global"`` (in training) the hook sums each layer's
statistics over the data-parallel processes and the optimizer step's
micro-batches before the loss (`_global_balance_loss`; docs/method.md, "Beyond
the paper: load balancing"). `balance_step(model)`, called after every
optimizer step (the trainer's callback does), moves the aux-free selection
biases and ends the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from xft.config import UpcycleConfig
from xft.ffn import decoder_layers, find_ffn
from xft.hfconfig import CONFIG_KEY, mark_moe
from xft.moe import MoEBlock


def upcycle(model: nn.Module, config: UpcycleConfig | None = None, *, init_weights: bool = True) -> nn.Module:
    """Turn every FFN of the dense causal LM `model` into an MoE block (in place), its experts started by
    `config.init` (`xft.inits`): identical copies by default.

    Returns `model`. With ``routing="xft"`` or ``"sparse"`` and init ``"copy"`` or
    ``"granular"`` the result computes exactly what the dense model did (until the
    experts are trained). `init_weights` False: structure only, for weights loaded next.
    """
    config = config or UpcycleConfig()
    if is_moe(model):
        raise ValueError(f"{type(model).__name__} is already upcycled")
    name = type(model).__name__
    hidden = model.config.hidden_size
    layers = decoder_layers(model)
    targets = [find_ffn(layer, name) for layer in layers]  # find all before changing any
    generator = torch.Generator().manual_seed(config.seed)  # the init's draws (drop), layer after layer
    for layer, (attr, ffn) in zip(layers, targets):
        block = MoEBlock(ffn, hidden, config, generator, init_weights=init_weights)
        setattr(layer, attr, block.train(ffn.training))
    mark_moe(model.config, config.to_dict())  # config.json then says "xft_moe", never the dense type
    # A plain attribute (not a submodule): `copy.deepcopy(model)` copies the handles with the hook dicts
    # they point into, so the copy's handles remove the copy's hooks.
    model._xft_balance_loss_hooks = (
        model.register_forward_pre_hook(_ask_for_routing, with_kwargs=True),
        model.register_forward_hook(_add_balance_loss, with_kwargs=True),
    )
    return model


def remove_balance_loss(model: nn.Module) -> None:
    """Remove the balance-loss hooks `upcycle` put on `model` (or on the model it was deep-copied from)."""
    for handle in model.__dict__.pop("_xft_balance_loss_hooks", ()):
        handle.remove()


def is_moe(model: nn.Module) -> bool:
    """Whether `model` has been upcycled by xft."""
    return any(isinstance(m, MoEBlock) for m in model.modules())


def moe_blocks(model: nn.Module) -> dict[int, MoEBlock]:
    """Layer index -> MoE block, in layer order."""
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    return dict(enumerate(blocks))


def upcycle_config(model: nn.Module) -> UpcycleConfig:
    """The `UpcycleConfig` an MoE model was built with."""
    return UpcycleConfig.from_dict(getattr(model.config, CONFIG_KEY))


def expert_weights(model: nn.Module) -> dict[int, dict[str, nn.Parameter]]:
    """{layer: {FFN parameter name: live stacked parameter [N, *shape]}} of an MoE model."""
    return {i: block.expert_parameters() for i, block in moe_blocks(model).items()}


def routing_stats(model: nn.Module) -> dict[int, dict[str, Tensor]]:
    """Per layer, from the last forward with a loss: the balance method's per-expert sums [R] (cv2: `importance`,
    `load`), `load` [R] (the expert load it balances), `balance_loss`, and for aux_free `bias_spread`."""
    return {i: dict(block.stats) for i, block in moe_blocks(model).items() if block.stats}


@torch.no_grad()
def ewa_step(model: nn.Module, share_rate: float) -> None:
    """EWA (Huang et al. 2023): pull every expert toward the experts' mean, W_i <- (1-β)W_i + β·mean_j W_j
    (granular: every shard toward the mean of the shards holding the same neurons)."""
    if not 0.0 <= share_rate <= 1.0:
        raise ValueError(f"EWA share rate must be in [0, 1], got {share_rate}")
    for block in moe_blocks(model).values():
        for stack in block.expert_parameters().values():
            shards = stack.unflatten(0, (-1, block.shards))  # a view [N, G, *shape]
            shards.lerp_(shards.mean(dim=0, keepdim=True).expand_as(shards), share_rate)


def _ask_for_routing(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: with labels, every block keeps its routing record, also without gradients."""
    wanted = kwargs.get("labels") is not None
    for block in moe_blocks(model).values():
        block.record_routing = wanted


def _add_balance_loss(model: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook: add the summed per-layer balance losses to `output.loss` (when labels were given)."""
    blocks = [b for b in moe_blocks(model).values() if b.routing_record() is not None]
    loss = getattr(output, "loss", None)
    labels = kwargs.get("labels")
    if not blocks or loss is None or labels is None:
        for block in blocks:  # no loss wanted: drop this forward's routing tensors
            block.drop_routing_record()
        return output
    mask = kwargs.get("attention_mask")
    tokens = blocks[0].routing_record().tokens
    token_mask = mask.reshape(-1).bool() if isinstance(mask, Tensor) and mask.numel() == tokens else None
    window = kwargs.get("num_items_in_batch")
    label_tokens = labels[..., 1:].ne(-100).sum()  # the tokens Trainer's num_items_in_batch counts
    if blocks[0].config.balance_scope == "global" and model.training:
        aux = _global_balance_loss(model, blocks, token_mask, label_tokens, window)
    else:
        aux = sum(block.finish_balance_loss(token_mask) for block in blocks)
        # Under gradient accumulation the Trainer normalises the LM loss by the token count of the whole
        # accumulation window (`num_items_in_batch`, counted over the shifted labels[..., 1:]); weight this
        # micro-batch's balance loss by its share of those tokens so the window total is a token-weighted
        # mean, like the LM loss.
        if window is not None:
            aux = aux * (label_tokens / window).to(aux.dtype)
    output.loss = loss + aux.to(loss.dtype)
    return output


# ---------------------------------------------------------------- balance over a step (global scope, aux-free)

@dataclass
class _Step:
    """The global scope's sums over the current optimizer step's earlier micro-batches (all processes)."""

    label_tokens: float = 0.0  # seen so far, as Trainer's `num_items_in_batch` counts them
    sums: list[dict[str, Tensor]] = field(default_factory=list)  # per block {name: [R]}, detached


def _global_balance_loss(model: nn.Module, blocks: list[MoEBlock], token_mask: Tensor | None,
                         label_tokens: Tensor, window: Tensor | int | None) -> Tensor:
    """balance_scope="global": this micro-batch's part of the step's balance loss, summed over layers.

    Each layer's per-expert sums S_m are summed over the data-parallel processes (differentiably) and
    added to the detached sums S_<m of the step's earlier micro-batches. The term's value is
    L(S_<m + S_m) − L(S_<m), so a step's terms add up to L(S), the loss of the whole step's sums; its
    gradient, through this micro-batch's tokens only, is ρ·∇L(S_<m + S_m) with ρ the share of the step's
    label tokens seen so far (1 at the last micro-batch: exact there). The step ends when the label
    tokens seen reach `window` (Trainer's `num_items_in_batch`: the step's, over all processes) or at
    `balance_step`; without a window each micro-batch is a step of its own.
    """
    local = [block.balance_sums(token_mask) for block in blocks]
    summed, seen = _sum_over_processes(local, label_tokens)
    step = model.__dict__.setdefault("_xft_balance_step", _Step())
    earlier = step.sums or [None] * len(blocks)
    totals = [s if e is None else {k: e[k] + v for k, v in s.items()} for s, e in zip(summed, earlier)]
    aux = sum(block.balance_term(t, e) for block, t, e in zip(blocks, totals, earlier))
    step.sums = [{k: v.detach() for k, v in t.items()} for t in totals]
    step.label_tokens += float(seen.detach())
    share = 1.0 if window is None else min(step.label_tokens / float(window), 1.0)
    if share >= 1.0:
        del model._xft_balance_step
    # Value aux, gradient share·∇aux: for a scale-invariant loss (cv², switch), ∇L at the sums seen so far
    # scaled up to the whole step's tokens (see the docstring).
    aux = share * aux + (1.0 - share) * aux.detach()
    # With `num_items_in_batch` Trainer multiplies every process's loss by the number of processes (and
    # DDP averages the gradients): each process then adds L/P, so the step's loss counts L once.
    return aux / _processes() if window is not None else aux


def _processes() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """`x` summed over the processes; its gradient is the processes' gradients summed (all-reduce both ways)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _sum_over_processes(sums: list[dict[str, Tensor]], label_tokens: Tensor) -> tuple[list[dict[str, Tensor]],
                                                                                        Tensor]:
    """(per-layer sums, label tokens), each summed over the processes: one all-reduce for all of them."""
    if _processes() == 1:
        return sums, label_tokens
    parts = [v for s in sums for v in s.values()] + [label_tokens.reshape(1)]
    flat = _AllReduceSum.apply(torch.cat([p.float().reshape(-1) for p in parts]))
    it = iter(flat.split([p.numel() for p in parts]))
    return [{k: next(it).view_as(v) for k, v in s.items()} for s in sums], next(it)[0]


@torch.no_grad()
def balance_step(model: nn.Module) -> None:
    """After an optimizer step: move aux-free selection biases toward balance, and end the global-scope step.

    Each aux-free layer's bias moves b_i += γ·sign(mean load − load_i) (γ = `balance_bias_rate`), the load
    counted over the step's training forwards with labels and summed over the data-parallel processes
    (a collective: every process calls this, as Trainer's callbacks do).
    """
    model.__dict__.pop("_xft_balance_step", None)
    blocks = [b for b in moe_blocks(model).values() if b.selection_bias is not None]
    if not blocks:
        return
    loads = torch.stack([b.selection_bias.new_zeros(b.selection_bias.shape) if b.step_load is None
                         else b.step_load for b in blocks])  # [layers, R]
    if _processes() > 1:
        dist.all_reduce(loads)
    for block, load in zip(blocks, loads):
        block.selection_bias.add_(torch.sign(load.mean() - load), alpha=block.config.balance_bias_rate)
        block.step_load = None
