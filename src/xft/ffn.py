"""Finding and understanding the FFN of any `transformers` causal LM, without name tables.

* `decoder_layers(model)` finds the stack of decoder layers: the `ModuleList`
  holding `config.num_hidden_layers` blocks.
* `find_ffn(layer)` finds the FFN submodule of one decoder layer by what it
  is (a child named like an MLP, or whose class is one), never by a
  per-architecture list of weight names.
* `recognize(ffn)` tries to describe the FFN as a gated MLP
  `down(act(gate(x)) * up(x))` or a plain MLP `down(act(up(x)))` built from
  `nn.Linear`/`Conv1D` layers, so experts can run as direct matmuls. The
  roles are inferred from shapes and then *checked numerically* against the
  module's own forward on random weights; anything that does not match
  exactly gets no spec and runs through `torch.func.functional_call` instead.
* `call_ffn(spec, template, params, x)` computes what the FFN module computes
  with the given parameters, through the spec or `functional_call`.
* `neuron_layout(ffn, hidden_size, spec)` finds where each FFN parameter holds
  the intermediate neurons (the rows of the input projections, the columns of
  the output projection, fused layouts included), for the inits that split or
  re-initialise neurons (`xft.inits`); without a spec it is inferred from the
  shapes and checked numerically: the FFN must be the sum of its neuron halves.
  `FFNSpec.run(x, linear)` is a recognised FFN's structure in one place: its
  own call runs it with `F.linear`, the MoE kernels with a `linear` over
  expert stacks.

Imports only torch at module level (`xft.config` depends on this module
through `xft.moe`, and `xft upcycle --help` must not load transformers).
"""

from __future__ import annotations

import inspect
import itertools
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from xft.errors import UserError

_FFN_NAMES = {"mlp", "feed_forward", "ffn", "mlp_block", "feedforward"}
_FFN_CLASS = re.compile(r"(MLP|FeedForward|FFN|Mlp)$")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The `ModuleList` of decoder layers (length `config.num_hidden_layers`)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n is None or len(module) == n):
            return module
    raise UserError(f"{type(model).__name__}: cannot find its decoder layers "
                    f"(no ModuleList of config.num_hidden_layers={n} blocks)")


def find_ffn(layer: nn.Module, model_name: str = "model") -> tuple[str, nn.Module]:
    """(attribute name, module) of the FFN inside one decoder layer."""
    found = [(name, child) for name, child in layer.named_children()
             if name.lower() in _FFN_NAMES or _FFN_CLASS.search(type(child).__name__)]
    if len(found) != 1:
        children = ", ".join(f"{n}: {type(c).__name__}" for n, c in layer.named_children())
        what = "no" if not found else "more than one"
        raise UserError(f"{model_name}: found {what} FFN (MLP) submodule in its decoder layer "
                        f"{type(layer).__name__} ({children}); xft upcycles models whose decoder layers "
                        "hold their FFN as one submodule")
    name, ffn = found[0]
    if not any(True for _ in ffn.parameters()):
        raise UserError(f"{model_name}: the FFN {name} ({type(ffn).__name__}) has no parameters")
    return name, ffn


# ----------------------------------------------------------------------------- fast-path spec

@dataclass(frozen=True)
class FFNSpec:
    """A recognised FFN: roles of its linear layers (child names) and its activation."""

    gate: str | None  # None for a plain (non-gated) MLP
    up: str
    down: str
    act: nn.Module
    transposed: frozenset[str]  # children whose weight is [in, out] (GPT-2 Conv1D)
    dropout: nn.Module | None  # applied to the FFN output in training, as the module does

    def __call__(self, w: dict[str, Tensor], x: Tensor) -> Tensor:
        """Run the FFN with parameters `w` (names as inside the FFN) on x [T, d] -> [T, d]."""
        return self.run(x, lambda name, h: self.linear(w, name, h))

    def run(self, x: Tensor, linear: Callable[[str, Tensor], Tensor]) -> Tensor:
        """The FFN on x [T, d] -> [T, d], `linear(layer name, h)` running its layers (the MoE kernels pass
        their own, over expert stacks)."""
        h = linear(self.up, x)
        h = self.act(h) if self.gate is None else self.act(linear(self.gate, x)) * h
        return linear(self.down, h)

    def linear(self, w: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
        """Layer `name` with the parameters in `w`: x [..., in] -> [..., out]."""
        weight = w[f"{name}.weight"]
        return F.linear(x, weight.t() if name in self.transposed else weight, w.get(f"{name}.bias"))


def call_ffn(spec: FFNSpec | None, template: nn.Module, params: dict[str, Tensor], x: Tensor,
             *extra: Tensor) -> Tensor:
    """What the FFN module computes with parameters `params` (names as inside it): x [..., d] -> [..., d].

    With a spec: its direct matmuls and output dropout; without: `functional_call` on the module
    `template`, `extra` passed along (Bloom's residual).
    """
    if spec is not None:
        y = spec(params, x)
        return spec.dropout(y) if spec.dropout is not None else y
    return functional_call(template, params, (x, *extra))


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # GPT-2's [in, out] linear; imported on first use

    return isinstance(module, Conv1D)


def _in_out(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def recognize(ffn: nn.Module, hidden_size: int) -> FFNSpec | None:
    """A verified `FFNSpec` for `ffn`, or None when it is not a plain/gated MLP."""
    linears, acts, dropouts = {}, [], []
    for name, child in ffn.named_children():
        if _in_out(child) is not None:
            linears[name] = child
        elif isinstance(child, nn.Dropout):
            dropouts.append(child)
        elif not any(True for _ in child.parameters()) and not list(child.children()):
            acts.append(child)
        else:
            return None
    own = {n for n, _ in ffn.named_parameters()}
    if len(acts) != 1 or len(dropouts) > 1 or own != {f"{n}.{p}" for n, m in linears.items()
                                                      for p, _ in m.named_parameters()}:
        return None
    shapes = {n: _in_out(m) for n, m in linears.items()}
    ins = [n for n, (i, o) in shapes.items() if i == hidden_size and o != hidden_size]
    outs = [n for n, (i, o) in shapes.items() if o == hidden_size and i != hidden_size]
    if len(outs) != 1 or len(ins) + 1 != len(linears) or len(ins) not in (1, 2):
        return None
    transposed = frozenset(n for n, m in linears.items() if _is_conv1d(m))
    dropout = dropouts[0] if dropouts else None
    candidates = ([(None, ins[0])] if len(ins) == 1 else list(itertools.permutations(ins, 2)))
    for gate, up in candidates:
        spec = FFNSpec(gate, up, outs[0], acts[0], transposed, dropout)
        if _matches(spec, ffn, hidden_size):
            return spec
    return None


@torch.no_grad()
def _matches(spec: FFNSpec, ffn: nn.Module, hidden_size: int) -> bool:
    """Whether `spec` computes what `ffn.forward` computes, on random weights and inputs (eval mode)."""
    params = dict(ffn.named_parameters())
    if any(p.is_meta for p in params.values()):
        return False
    g = torch.Generator().manual_seed(0)
    w = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5 for n, p in params.items()}
    x = torch.randn(7, hidden_size, generator=g, dtype=torch.float64)
    was_training = ffn.training
    ffn.eval()
    try:
        ref, got = functional_call(ffn, w, (x,)), spec(w, x)
    except Exception:  # noqa: BLE001 - a module we cannot probe (or mis-guessed) takes the generic path
        return False
    finally:
        ffn.train(was_training)
    return isinstance(ref, Tensor) and ref.shape == got.shape and torch.allclose(got, ref, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- intermediate neurons

@dataclass(frozen=True)
class NeuronAxis:
    """Where one FFN parameter holds the I intermediate neurons: dimension `dim`, as `blocks` runs of I
    (2 for a fused [gate; up] projection such as Phi-3's gate_up_proj, neuron i at rows i and I + i)."""

    dim: int
    blocks: int = 1

    def neurons(self, p: Tensor) -> Tensor:
        """View of p with the neuron index on its own dimension `dim + 1`: [..., blocks, I, ...]."""
        return p.unflatten(self.dim, (self.blocks, -1))

    def take(self, p: Tensor, index: Tensor) -> Tensor:
        """p restricted to the neurons `index` [m]: `dim` shrinks from blocks·I to blocks·m."""
        return self.neurons(p).index_select(self.dim + 1, index).flatten(self.dim, self.dim + 1)


@dataclass(frozen=True)
class NeuronLayout:
    """An FFN's intermediate size I and, per parameter name, its `NeuronAxis` (None: a parameter without
    neurons, such as the output bias)."""

    size: int
    axes: dict[str, NeuronAxis | None]


def neuron_layout(ffn: nn.Module, hidden_size: int, spec: FFNSpec | None = None) -> NeuronLayout:
    """Where the parameters of `ffn` hold its intermediate neurons (UserError when that cannot be found).

    With a spec: the rows of gate and up (their biases too) and the columns of down, transposed for
    Conv1D. Without: the one dimension of each parameter that is not `hidden_size` holds the neurons,
    in runs of I (the smallest such size); checked on random weights (not on the meta device).
    """
    params = dict(ffn.named_parameters())
    name = type(ffn).__name__
    if spec is not None:
        axes = {}
        for layer in filter(None, (spec.gate, spec.up, spec.down)):
            into = layer != spec.down  # an input projection: the neurons are its outputs
            dim = 0 if into else 1  # Linear weights are [out, in]
            axes[f"{layer}.weight"] = NeuronAxis(1 - dim if layer in spec.transposed else dim)
            if f"{layer}.bias" in params:
                axes[f"{layer}.bias"] = NeuronAxis(0) if into else None
        return NeuronLayout(params[f"{spec.up}.weight"].shape[1 if spec.up in spec.transposed else 0], axes)
    sizes = {n for p in params.values() for n in p.shape if n != hidden_size}
    if not sizes:
        raise UserError(f"{name}: cannot tell its intermediate size from the hidden size {hidden_size}")
    size, axes = min(sizes), {}
    for pname, p in params.items():
        dims = [i for i, n in enumerate(p.shape) if n != hidden_size]
        if len(dims) > 1 or (dims and p.shape[dims[0]] % size):
            raise UserError(f"{name}: parameter {pname} of shape {tuple(p.shape)} has no single intermediate "
                            f"dimension (intermediate size {size}, hidden size {hidden_size})")
        axes[pname] = NeuronAxis(dims[0], p.shape[dims[0]] // size) if dims else None
    layout = NeuronLayout(size, axes)
    meta = any(p.is_meta for p in params.values())  # shapes only (xft.checkpoint.skeleton): nothing to run
    if not meta and not _splits_into_neurons(layout, ffn, hidden_size):
        raise UserError(f"{name}: its output is not the sum of its intermediate neurons' contributions "
                        f"(assumed layout {layout}); this init needs an FFN that splits along its neurons")
    return layout


@torch.no_grad()
def _splits_into_neurons(layout: NeuronLayout, ffn: nn.Module, hidden_size: int) -> bool:
    """Whether `ffn` (random float64 weights, eval mode) computes the sum of two FFNs on a random half of the
    neurons each, the parameters without neurons and any extra inputs (Bloom's residual) halved."""
    if layout.size < 2:
        return False
    g = torch.Generator().manual_seed(0)
    w = {n: torch.randn(a.shape, generator=g, dtype=torch.float64) * 0.5 for n, a in ffn.named_parameters()}
    x = torch.randn(7, hidden_size, generator=g, dtype=torch.float64)
    # Required positional arguments after the hidden states: token-aligned tensors, as MoEBlock passes them.
    extra = [torch.randn(7, hidden_size, generator=g, dtype=torch.float64)
             for p in list(inspect.signature(ffn.forward).parameters.values())[1:]
             if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    order = torch.randperm(layout.size, generator=g)
    halves = (order[:layout.size // 2], order[layout.size // 2:])
    was_training = ffn.training
    ffn.eval()
    try:
        whole = functional_call(ffn, w, (x, *extra))
        parts = [functional_call(ffn, {n: p / 2 if layout.axes[n] is None else layout.axes[n].take(p, half)
                                       for n, p in w.items()}, (x, *(e / 2 for e in extra)))
                 for half in halves]
    except Exception:  # noqa: BLE001 - a layout the module cannot run with is not its layout
        return False
    finally:
        ffn.train(was_training)
    return isinstance(whole, Tensor) and torch.allclose(parts[0] + parts[1], whole, rtol=1e-9, atol=1e-9)
