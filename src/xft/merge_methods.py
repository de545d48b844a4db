"""The merge methods (MoE -> dense, docs/method.md §3) by name: the one list that the library, CLI and pipeline read.

A merge method turns one MoE layer's expert stacks into that layer's dense FFN
weights:

    method(MergeInput(stacks={name: [N, *shape]}, config, shared_weight, logits, options)) -> {name: [*shape]}

Coefficient-based methods (``init``, ``uniform``, ``learned``) only say how to
compute the coefficients `c ∈ R^N`; their merge is the weighted sum
`Σ_n c_n W_n` of every stack (`xft.merge.weighted_sum`), and their coefficients
are what `merge_coefficients.json` records. A tensor-level method
(``task_arithmetic``, ``ties``, a per-parameter median, ...) gives the merge
function itself and has no coefficients. A method declares the options it
takes (`MergeMethod.options`, name -> help); `MergeMethod.check_options`
refuses any other name, and a value that `OPTIONS` says is out of range,
before anything is computed. A new method is one decorated function:

    @register_merge_method("median", "per-parameter elementwise median of the experts")
    def median(layer: MergeInput) -> dict[str, Tensor]:
        return {name: s.median(0).values for name, s in layer.stacks.items()}

This module imports no torch, so `xft merge --help` lists the methods for
free: the built-in methods' functions live in `xft.merge` and are named here
as ``"module:function"``, imported on first call.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
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
    options: dict = field(default_factory=dict)  # the method's options as given (checked), e.g. {"density": 0.2}

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def shared_expert(self) -> bool:
        """Whether expert 0 is the shared expert."""
        return self.config.shared_expert


Ref = Callable | str  # a function, or "module:function" imported on first use


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Option:
    """What values a merge option accepts: a check, and how an error message says it."""

    expects: str  # e.g. "a fraction in (0, 1]"
    accepts: Callable[[object], bool]


# TIES defaults (Yadav et al. 2023 keep the top 20% of each task vector; λ = 1 applies the disjoint mean as is).
TIES_DENSITY = 0.2
TIES_SCALE = 1.0

# The value rules of every option name a built-in method takes (one place for the CLI, recipes and the library).
OPTIONS: dict[str, Option] = {
    "scale": Option("a finite number", _number),
    "density": Option("a fraction in (0, 1]", lambda v: _number(v) and 0 < v <= 1),
}


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
    options: dict[str, str] = field(default_factory=dict)  # option name -> one-line help (with its default)
    uses_shared_weight: bool = True  # whether λ (`shared_weight`) enters the merge (the model card says it)

    def __post_init__(self):
        if (self.coefficients_fn is None) == (self.merge_fn is None):
            raise ValueError(f"merge method {self.name!r}: give exactly one of coefficients_fn and merge_fn")

    def check_options(self, options: dict, spell: Callable[[str], str] = str) -> None:
        """ValueError naming this method, the option and the accepted ones unless `options` suit this method.

        `spell` turns an option name into the name the caller knows it by (a config setting).
        """
        accepted = ", ".join(spell(n) for n in self.options) or "none"
        for name, value in options.items():
            if name not in self.options:
                raise ValueError(f"merge method {self.name!r} has no option {spell(name)!r}; it takes: {accepted}")
            rule = OPTIONS.get(name)
            if rule is not None and not rule.accepts(value):
                raise ValueError(f"merge method {self.name!r}: option {spell(name)}={value!r} must be "
                                 f"{rule.expects}")

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
                coefficients_fn="xft.merge:uniform_coefficients", uses_shared_weight=False),
    MergeMethod("task_arithmetic", "task arithmetic (Ilharco et al. 2023): base + α·Σ_i (W_i - base), the base "
                                   "the shared expert (else the experts' mean)",
                merge_fn="xft.merge:task_arithmetic", uses_shared_weight=False,
                options={"scale": "α on the summed deltas (default 1/(N-1): the routed experts' mean)"}),
    MergeMethod("ties", "TIES (Yadav et al. 2023) on the experts' deltas to the base (the shared expert, else "
                        "the experts' mean): trim, elect sign, disjoint mean",
                merge_fn="xft.merge:ties", uses_shared_weight=False,
                options={"density": f"fraction of each delta's entries kept, by magnitude (default {TIES_DENSITY})",
                         "scale": f"α on the merged delta (default {TIES_SCALE:g})"}),
)}


def register_merge_method(name: str, help: str, *, learns: bool = False, coefficients: bool = False,
                          options: dict[str, str] | None = None, uses_shared_weight: bool = True):
    """Decorator: register `fn` as merge method `name` (`fn` gives the coefficients if `coefficients`).

    `options`: the names `fn` reads from `MergeInput.options`, each with a one-line help.
    """
    def register(fn: Callable) -> Callable:
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        MERGE_METHODS[name] = MergeMethod(name, help, learns=learns, options=dict(options or {}),
                                          uses_shared_weight=uses_shared_weight,
                                          **{"coefficients_fn" if coefficients else "merge_fn": fn})
        return fn
    return register


def get_merge_method(name: str) -> MergeMethod:
    """The merge method registered under `name` (ValueError listing the choices otherwise)."""
    if name not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {name!r}; expected one of {sorted(MERGE_METHODS)}")
    return MERGE_METHODS[name]
