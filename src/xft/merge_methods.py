"""The merge methods (MoE -> dense, docs/method.md §3) by name: the one list that the library, CLI and pipeline read.

A merge method turns one MoE layer's expert stacks into that layer's dense FFN
weights:

    method(MergeInput(stacks={name: [N, *shape]}, config, shared_weight, logits)) -> {name: [*shape]}

Coefficient-based methods (``init``, ``uniform``, ``learned``) only say how to
compute the coefficients `c ∈ R^N`; their merge is the weighted sum
`Σ_n c_n W_n` of every stack (`xft.merge.weighted_sum`), and their coefficients
are what `merge_coefficients.json` records. A tensor-level method (TIES,
per-parameter median, ...) gives the merge function itself and has no
coefficients. A new method is one decorated function:

    @register_merge_method("median", "per-parameter elementwise median of the experts")
    def median(layer: MergeInput) -> dict[str, Tensor]:
        return {name: s.median(0).values for name, s in layer.stacks.items()}

This module imports no torch, so `xft merge --help` lists the methods for
free: the built-in methods' functions live in `xft.merge` and are named here
as ``"module:function"``, imported on first call.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import Tensor

    from xft.config import UpcycleConfig


@dataclass(frozen=True)
class MergeInput:
    """What a merge method gets for one MoE layer. Methods must not modify the stacks."""

    stacks: dict[str, Tensor]  # FFN parameter name (as in the dense FFN) -> expert stack [N, *shape]
    config: UpcycleConfig  # the layer's MoE settings (routing, num_experts, ...)
    shared_weight: float  # λ, the shared expert's weight (methods that use it)
    logits: Tensor | None = None  # learned mixing logits a^l: [N-1] with a shared expert, else [N]

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def shared_expert(self) -> bool:
        """Whether expert 0 is the shared expert."""
        return self.config.shared_expert


Ref = Callable | str  # a function, or "module:function" imported on first use


def _resolve(ref: Ref) -> Callable:
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: a name, a one-line help, and either its coefficients or its merge function."""

    name: str
    help: str  # one line, for `xft merge --help` and the model card
    learns: bool = False  # its coefficients are trained on data (so it needs --data)
    coefficients_fn: Ref | None = None  # MergeInput -> coefficients [N] (fp32); merge = Σ_n c_n W_n
    merge_fn: Ref | None = None  # MergeInput -> {name: merged weight [*shape]}, for tensor-level methods

    def __post_init__(self):
        if (self.coefficients_fn is None) == (self.merge_fn is None):
            raise ValueError(f"merge method {self.name!r}: give exactly one of coefficients_fn and merge_fn")

    def coefficients(self, layer: MergeInput) -> Tensor | None:
        """The layer's mixing coefficients [N] (fp32), or None for a tensor-level method."""
        return None if self.coefficients_fn is None else _resolve(self.coefficients_fn)(layer)

    def __call__(self, layer: MergeInput) -> dict[str, Tensor]:
        """The layer's merged FFN weights {name: [*shape]}."""
        if self.merge_fn is not None:
            return _resolve(self.merge_fn)(layer)
        return _resolve("xft.merge:weighted_sum")(layer.stacks, self.coefficients(layer))


MERGE_METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("learned", "train the per-layer mixing logits on data (the paper's merge)", learns=True,
                coefficients_fn="xft.merge:learned_coefficients"),
    MergeMethod("init", "the initial coefficients: shared expert λ, each routed expert (1-λ)/(N-1)",
                coefficients_fn="xft.merge:init_coefficients"),
    MergeMethod("uniform", "the plain average of all experts (also EWA's final merge)",
                coefficients_fn="xft.merge:uniform_coefficients"),
)}


def register_merge_method(name: str, help: str, *, learns: bool = False, coefficients: bool = False):
    """Decorator: register `fn` as merge method `name` (`fn` gives the coefficients if `coefficients`)."""
    def register(fn: Callable) -> Callable:
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        MERGE_METHODS[name] = MergeMethod(name, help, learns=learns, **{
            "coefficients_fn" if coefficients else "merge_fn": fn})
        return fn
    return register


def get_merge_method(name: str) -> MergeMethod:
    """The merge method registered under `name` (ValueError listing the choices otherwise)."""
    if name not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {name!r}; expected one of {sorted(MERGE_METHODS)}")
    return MERGE_METHODS[name]
