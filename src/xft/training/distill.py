"""Distillation after a merge (docs/method.md "Beyond the paper"): the dense model learns the MoE's outputs.

A merge loses what the routing did: the dense model computes one FFN for every
token where the MoE mixed experts per token. Distillation trains the merged
model (the student, all its parameters) to match the trained MoE (the
teacher) on the instruction data:

    loss = T² · Σ_t KL(softmax(z_t^teacher / T) ‖ softmax(z_t^student / T)) / #t

over the response tokens `t` — the positions SFT's loss uses (labels ≠ -100,
next-token shifted) — with temperature `T` (1: the models' own distributions;
the T² keeps gradient sizes comparable across T, as in Hinton et al. 2015).

`DistillTrainer` is `XFTTrainer` with that loss, given through Trainer's own
`compute_loss_func`, so Trainer normalises it over gradient accumulation and
processes as it does the LM loss. The teacher is frozen, runs in eval mode
(no router noise) under no_grad, on the student's device, in its dtype and
under the same autocast; it is held whole on every process (not sharded).
`learn_merge` runs it when `MergeConfig.distill_steps > 0`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xft.data import IGNORE_INDEX
from xft.training.trainer import XFTTrainer


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0,
                 num_items: Tensor | int | None = None) -> Tensor:
    """T²·KL(teacher ‖ student) summed over the response tokens, divided by `num_items` (default: their count).

    logits [B, T, V], labels [B, T] (-100 where no loss); position t predicts token t+1, as the LM loss.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the models must share the vocabulary")
    mask = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]
    # fp32 log-probabilities of the M response positions only: [M, V]
    log_q = (student_logits[:, :-1][mask].float() / temperature).log_softmax(-1)
    log_p = (teacher_logits[:, :-1][mask].float() / temperature).log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    count = mask.sum() if num_items is None else num_items
    return temperature ** 2 * kl / (count.clamp_min(1) if torch.is_tensor(count) else max(count, 1))


class DistillTrainer(XFTTrainer):
    """`XFTTrainer` whose loss is `distill_loss` of the trained model (student) against a frozen `teacher`."""

    def __init__(self, *args, teacher: nn.Module, temperature: float = 1.0, **kwargs):
        super().__init__(*args, compute_loss_func=self._distill_loss, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature
        self._teacher_logits: Tensor | None = None  # this micro-batch's, between compute_loss and the loss function

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._teacher_logits = self.teacher_logits(model, inputs)
        try:
            # Trainer pops the labels, runs the student without them and calls `_distill_loss`.
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._teacher_logits = None

    @torch.no_grad()
    def teacher_logits(self, student: nn.Module, inputs: dict) -> Tensor:
        """The teacher's logits [B, T, V] for a batch, computed where and how the student computes its own."""
        ref = next(p for p in student.parameters() if p.is_floating_point())
        probe = next(p for p in self.teacher.parameters() if p.is_floating_point())
        if (probe.device, probe.dtype) != (ref.device, ref.dtype):
            self.teacher.to(device=ref.device, dtype=ref.dtype)
        with self.accelerator.autocast():  # the mixed precision Trainer runs the student under
            return self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                use_cache=False).logits

    def _distill_loss(self, outputs, labels: Tensor, num_items_in_batch=None) -> Tensor:
        return distill_loss(outputs.logits, self._teacher_logits, labels, self.temperature, num_items_in_batch)
