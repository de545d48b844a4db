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
"""

from __future__ import annotations

import torch
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
    """Per layer, from the last forward with a loss: routed experts' `load` and `importance` [R], `balance_loss`."""
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
    tokens = blocks[0].routing_record().weights.shape[0]
    token_mask = mask.reshape(-1).bool() if isinstance(mask, Tensor) and mask.numel() == tokens else None
    aux = sum(block.finish_balance_loss(token_mask) for block in blocks)
    # Under gradient accumulation the Trainer normalises the LM loss by the token count of the whole
    # accumulation window (`num_items_in_batch`, counted over the shifted labels[..., 1:]); weight this
    # micro-batch's balance loss by its share of those tokens so the window total is a token-weighted
    # mean, like the LM loss.
    window = kwargs.get("num_items_in_batch")
    if window is not None:
        aux = aux * (labels[..., 1:].ne(-100).sum() / window).to(aux.dtype)
    output.loss = loss + aux.to(loss.dtype)
    return output
