"""Merge-gap diagnostics: what predicts how much a merge loses, and what it lost (docs/method.md, "Beyond the
paper: the merge gap").

Before merging, per MoE layer:

* `expert_drift` — how far the N experts have moved apart: the RMS distance
  of the experts from their mean, relative to the mean's norm, over all FFN
  parameters (0 for an upcycled MoE not yet trained; a granular layer's shards
  are joined into whole experts first, as the merge sees them);
* `routing_spread` — how differently tokens mix the experts: the mean over
  tokens of the total-variation distance ½‖w_t − w̄‖₁ between a token's
  routing weights w_t [N] and their mean w̄ over the tokens (0: every token
  mixes the experts alike; 1: tokens use disjoint experts).

After merging, the measured gap: the held-out loss (mean cross-entropy of
the response tokens) of the MoE and of the merged model (`held_out_loss`).

    gap = xft.merge_gap(moe, merged, batches)   # batches: Collator outputs of held-out data
    gap.drift, gap.spread, gap.loss_gap
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from xft.inits import whole_experts
from xft.upcycle import moe_blocks


@torch.no_grad()
def expert_drift(moe: nn.Module) -> dict[int, float]:
    """Per MoE layer, sqrt(Σ_e ‖W_e − W̄‖² / N) / ‖W̄‖ over every FFN parameter of the N whole experts."""
    out = {}
    for i, block in moe_blocks(moe).items():
        experts, _ = whole_experts(block)
        squares = norm = 0.0  # Σ_e ‖W_e − W̄‖², ‖W̄‖², accumulated per parameter and expert (fp64, one
        for stack in experts.parameters():  # expert's copy at a time: a 7B layer fits beside the model)
            stack = stack.detach()  # [N, *shape]
            mean = sum(stack[e].double() for e in range(stack.shape[0])) / stack.shape[0]
            norm += float(mean.pow(2).sum())
            squares += sum(float((stack[e].double() - mean).pow(2).sum()) for e in range(stack.shape[0]))
        n = next(experts.parameters()).shape[0]
        out[i] = (squares / n) ** 0.5 / max(norm ** 0.5, torch.finfo(torch.float64).tiny)
    return out


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def routing_spread(moe: nn.Module, batches) -> dict[int, float]:
    """Per MoE layer, the mean over the real tokens of `batches` of ½‖w_t − w̄‖₁ (routing weights w_t [N], their
    mean w̄), the model in eval mode (no router noise). `batches`: dicts with `input_ids` and `attention_mask`."""
    blocks = moe_blocks(moe)
    weights: dict[int, list[Tensor]] = {i: [] for i in blocks}
    keep: list[Tensor] = []

    def hook(i, block):
        def record(module, args, output):
            logits = output[1].float()  # [T, R] the logits routed on (clean in eval mode)
            w, _ = block.routing.combine(logits, block.k, block.selection_bias)  # [T, N]
            weights[i].append(w.cpu())
        return record

    handles = [b.gate.register_forward_hook(hook(i, b)) for i, b in blocks.items()]
    was_training = moe.training
    moe.eval()
    try:
        for batch in batches:
            mask = batch["attention_mask"]
            keep.append(mask.flatten().bool().cpu())
            moe(input_ids=batch["input_ids"].to(_device(moe)), attention_mask=mask.to(_device(moe)))
    finally:
        for h in handles:
            h.remove()
        moe.train(was_training)
    if not keep:
        raise ValueError("routing_spread needs at least one batch of data")
    real = torch.cat(keep)  # [T_all]
    out = {}
    for i, ws in weights.items():
        w = torch.cat(ws)[real].double()  # [T, N] the real tokens' weights
        out[i] = float(0.5 * (w - w.mean(0)).abs().sum(1).mean())
    return out


@torch.no_grad()
def held_out_loss(model: nn.Module, batches) -> float:
    """Mean cross-entropy (nats) over the response tokens of `batches` (Collator outputs: `labels` -100 elsewhere),
    the model in eval mode; an MoE's balance loss is not part of it."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            dev = _device(model)
            logits = model(input_ids=batch["input_ids"].to(dev),
                           attention_mask=batch["attention_mask"].to(dev)).logits  # [B, T, V]
            labels = batch["labels"].to(dev)[:, 1:]  # position t predicts token t+1
            ce = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                             ignore_index=-100, reduction="sum")
            total += float(ce)
            count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    if not count:
        raise ValueError("held_out_loss: the batches hold no response token")
    return total / count


@dataclass
class MergeGap:
    """Merge-gap diagnostics of one merge: per layer (index -> value) and the held-out losses."""

    drift: dict[int, float]
    spread: dict[int, float] = field(default_factory=dict)  # empty without data
    moe_loss: float | None = None
    merged_loss: float | None = None
    examples: int = 0  # held-out examples measured on

    @property
    def loss_gap(self) -> float | None:
        """Held-out loss of the merged model minus the MoE's (> 0: the merge lost)."""
        if self.moe_loss is None or self.merged_loss is None:
            return None
        return self.merged_loss - self.moe_loss

    @property
    def mean_drift(self) -> float:
        return sum(self.drift.values()) / len(self.drift)

    @property
    def mean_spread(self) -> float | None:
        return sum(self.spread.values()) / len(self.spread) if self.spread else None

    def to_dict(self) -> dict:
        """What merge_gap.json holds (per-layer values keyed by layer index as a string)."""
        return {"expert_drift": {str(k): v for k, v in self.drift.items()}, "mean_expert_drift": self.mean_drift,
                "routing_spread": {str(k): v for k, v in self.spread.items()} or None,
                "mean_routing_spread": self.mean_spread, "held_out_examples": self.examples,
                "moe_loss": self.moe_loss, "merged_loss": self.merged_loss, "loss_gap": self.loss_gap}

    def rows(self) -> list[tuple[str, str]]:
        """Summary rows for `xft merge`."""
        def span(values: dict[int, float], mean: float) -> str:
            return f"mean {mean:.4f} over {len(values)} layers ({min(values.values()):.4f}..{max(values.values()):.4f})"

        rows = [("expert drift", span(self.drift, self.mean_drift))]
        if self.spread:
            rows.append(("routing spread", span(self.spread, self.mean_spread)))
        if self.loss_gap is not None:
            rows.append(("held-out loss", f"MoE {self.moe_loss:.4f} -> merged {self.merged_loss:.4f} "
                                          f"(gap {self.loss_gap:+.4f}, {self.examples} examples)"))
        else:
            rows.append(("held-out loss", "not measured: pass validation data (--eval-data or --eval-fraction)"))
        return rows


def collate(examples, collator, size: int) -> list:
    """`examples` (a sequence of tokenized examples, e.g. a `datasets.Dataset`) as `collator` batches of `size`."""
    return [collator([examples[j] for j in range(i, min(i + size, len(examples)))])
            for i in range(0, len(examples), size)]


def before_merge(moe: nn.Module, batches: list | None) -> MergeGap:
    """The diagnostics of `moe` before it is merged: drift, and with `batches` routing spread and its held-out loss."""
    gap = MergeGap(expert_drift(moe))
    if batches:
        gap.spread = routing_spread(moe, batches)
        gap.moe_loss = held_out_loss(moe, batches)
        gap.examples = sum(int(b["input_ids"].shape[0]) for b in batches)
    return gap


def merge_gap(moe: nn.Module, merged: nn.Module | None = None, batches: list | None = None) -> MergeGap:
    """Merge-gap diagnostics of merging `moe` into `merged` (see the module docstring); the held-out loss gap
    needs `merged` and `batches` (a list of Collator outputs)."""
    gap = before_merge(moe, batches)
    if merged is not None and batches:
        gap.merged_loss = held_out_loss(merged, batches)
    return gap
