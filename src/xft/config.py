"""`UpcycleConfig`: the one source of truth for how a dense model becomes an XFT MoE.

Saved into the MoE's `config.json` under the key ``"xft"``, so `xft.load` can
rebuild the same model; validated on construction with readable messages.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from xft.errors import UserError
from xft.moe import EXPERT_IMPLS
from xft.routing import LOAD_ESTIMATES, ROUTERS, ROUTINGS


class ConfigError(UserError, ValueError):
    """An invalid configuration value or combination."""


@dataclass
class UpcycleConfig:
    """How to upcycle every FFN of a dense model into an MoE block (docs/method.md §1)."""

    num_experts: int = field(default=8, metadata={
        "help": "experts per layer N, each a copy of the dense FFN (the shared expert counts as one)"})
    top_k: int = field(default=6, metadata={
        "help": "experts active per token K, counting the shared expert when there is one"})
    routing: str = field(default="xft", metadata={
        "choices": tuple(ROUTINGS), "help": "'xft' (shared expert + routing-weight normalization), 'sparse' (no shared expert, "
                "Mixtral-style top-k), or 'unnormalized' (shared expert, raw probabilities)"})
    router: str = field(default="mlp", metadata={
        "choices": tuple(ROUTERS), "help": "'mlp' (Linear -> tanh -> Linear, as in the paper's code) or 'linear'"})
    noisy_gating: bool = field(default=True, metadata={
        "help": "add learned Gaussian noise to the router logits during training (Shazeer et al.)"})
    balance_loss_weight: float = field(default=0.01, metadata={
        "help": "weight of the per-layer load-balancing loss cv²(importance) + cv²(load); 0 disables it"})
    load_estimate: str = field(default="corrected", metadata={
        "choices": tuple(LOAD_ESTIMATES), "help": "noisy-gate load estimate: 'corrected' (Shazeer et al.) or 'faithful' (the paper's code, "
                "which compares the noise term alone with the top-k threshold)"})
    expert_impl: str = field(default="auto", metadata={
        "choices": tuple(EXPERT_IMPLS), "help": "expert compute: 'fast' (recognised gated/plain MLPs, a matmul loop over experts), "
                "'grouped_mm' (recognised MLPs, one torch._grouped_mm per layer: the GPU fast path), "
                "'generic' (torch.func.functional_call on any FFN module), or 'auto' (recognised MLPs: grouped_mm on CUDA when the sizes fit, fast elsewhere; generic otherwise)"})
    seed: int = field(default=0, metadata={"help": "seed for the routers' random initialisation"})

    def __post_init__(self):
        def bad(msg):
            raise ConfigError(f"invalid upcycle config: {msg}")

        if self.routing not in ROUTINGS:
            bad(f"routing={self.routing!r}; expected one of {', '.join(sorted(ROUTINGS))}")
        if self.router not in ROUTERS:
            bad(f"router={self.router!r}; expected one of {', '.join(sorted(ROUTERS))}")
        if self.load_estimate not in LOAD_ESTIMATES:
            bad(f"load_estimate={self.load_estimate!r}; expected one of {', '.join(LOAD_ESTIMATES)}")
        if self.expert_impl not in EXPERT_IMPLS:
            bad(f"expert_impl={self.expert_impl!r}; expected one of {', '.join(EXPERT_IMPLS)}")
        if self.num_experts < 2:
            bad(f"num_experts={self.num_experts}; need at least 2 experts")
        if self.top_k > self.num_experts:
            bad(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.shared_expert and self.top_k < 2:
            bad(f"top_k={self.top_k} with routing={self.routing!r}: top_k counts the shared expert, "
                "so it must be at least 2 (the shared expert plus one routed expert)")
        if self.top_k < 1:
            bad(f"top_k={self.top_k}; must be at least 1")
        if self.balance_loss_weight < 0:
            bad(f"balance_loss_weight={self.balance_loss_weight}; must be >= 0")

    @property
    def shared_expert(self) -> bool:
        """Whether expert 0 is a shared expert that every token goes through."""
        return ROUTINGS[self.routing].has_shared_expert

    @property
    def first_routed(self) -> int:
        """Index of the first routed expert (1 behind the shared expert, else 0)."""
        return ROUTINGS[self.routing].first_routed

    @property
    def num_routed(self) -> int:
        """Number of routed experts R (the router's output size)."""
        return ROUTINGS[self.routing].num_routed(self.num_experts)

    @property
    def routed_top_k(self) -> int:
        """Routed experts selected per token."""
        return ROUTINGS[self.routing].routed_k(self.top_k)

    def to_dict(self) -> dict:
        """Plain dict for `config.json`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UpcycleConfig":
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown xft config fields {unknown}; known: {sorted(known)}")
        return cls(**d)
