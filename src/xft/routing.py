"""Routing: router modules, combine weights, noisy top-k and the load-balancing loss.

All routing math of docs/method.md §1 lives here. Shapes: `T` tokens, `N` experts,
`R` routed experts (`N-1` with a shared expert, `N` without), `k` routed experts
selected per token (`K-1` with a shared expert, `K` without).

Routing schemes are entries of `ROUTINGS`, chosen by name:

* ``"xft"`` — shared expert 0 plus top-(K-1) of N-1 routed experts, with the
  paper's routing-weight normalization; weights sum to 1, so an upcycled model
  computes exactly the dense model at initialisation.
* ``"sparse"`` — vanilla sparse upcycling: top-K of N, softmax over the
  selected logits (Mixtral-style); also sums to 1.
* ``"unnormalized"`` — shared expert with `g_0 = 1 - s_max` and the raw
  top-(K-1) probabilities for the routed experts; does *not* sum to 1 (the
  "scale mismatch" the paper identifies).

Load-balancing methods are entries of `BALANCES` (docs/method.md, "Beyond the
paper: load balancing"): ``"cv2"`` (the paper's loss), ``"switch"`` (Fedus et
al.) and ``"aux_free"`` (no loss: a per-expert bias on the selection scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Routing:
    """A routing scheme: how router logits `[T, R]` become expert weights `[T, N]`."""

    name: str
    has_shared_expert: bool
    # (logits [T, R], k, selection bias [R] or None) -> (weights [T, N], selected routed indices [T, k]);
    # the bias (aux-free balancing) changes which experts are selected, never their weights.
    combine: Callable[[Tensor, int, Tensor | None], tuple[Tensor, Tensor]]
    sums_to_one: bool

    # The shared-expert arithmetic, in this one place: expert 0 is the shared one when there is one.
    @property
    def first_routed(self) -> int:
        """Index of the first routed expert among the N (1 behind a shared expert, else 0)."""
        return 1 if self.has_shared_expert else 0

    def num_routed(self, num_experts: int) -> int:
        """Routed experts R of `num_experts` N (the router's output size)."""
        return num_experts - self.first_routed

    def routed_k(self, top_k: int) -> int:
        """Routed experts a token selects when `top_k` counts the shared expert."""
        return top_k - self.first_routed


def _select(scores: Tensor, k: int, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """(scores [T, k], indices [T, k]) of the top-k experts by `scores + bias`, sorted by the unbiased scores.

    The bias [R] only chooses the experts; the values returned (and so the weights) are the unbiased
    scores. Without a bias this is `scores.topk(k)`; a zero bias selects and orders exactly the same.
    """
    if bias is None:
        return scores.topk(k, dim=-1)
    top_i = (scores + bias).topk(k, dim=-1).indices
    top_s, order = scores.gather(-1, top_i).sort(dim=-1, descending=True, stable=True)
    return top_s, top_i.gather(-1, order)


def _xft(logits: Tensor, k: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    p = logits.softmax(dim=-1)  # [T, R]
    top_p, top_i = _select(p, k, bias)  # [T, k], sorted: top_p[:, 0] = s_max (of the selected experts)
    s_max = top_p[:, :1]
    # The softmax runs over the selected *probabilities* (not the logits), then is scaled by s_max.
    routed = top_p.softmax(dim=-1) * s_max
    return _assemble(1.0 - s_max, routed, top_i, logits.shape[-1]), top_i


def _unnormalized(logits: Tensor, k: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    p = logits.softmax(dim=-1)
    top_p, top_i = _select(p, k, bias)
    return _assemble(1.0 - top_p[:, :1], top_p, top_i, logits.shape[-1]), top_i


def _sparse(logits: Tensor, k: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    top_l, top_i = _select(logits, k, bias)
    weights = torch.zeros_like(logits).scatter(-1, top_i, top_l.softmax(dim=-1))
    return weights, top_i


def _assemble(shared: Tensor, routed: Tensor, top_i: Tensor, num_routed: int) -> Tensor:
    """[T, 1] shared weight + [T, k] routed weights at `top_i` -> [T, 1 + num_routed]."""
    full = routed.new_zeros(routed.shape[0], num_routed).scatter(-1, top_i, routed)
    return torch.cat([shared, full], dim=-1)


ROUTINGS: dict[str, Routing] = {
    "xft": Routing("xft", has_shared_expert=True, combine=_xft, sums_to_one=True),
    "sparse": Routing("sparse", has_shared_expert=False, combine=_sparse, sums_to_one=True),
    "unnormalized": Routing("unnormalized", has_shared_expert=True, combine=_unnormalized, sums_to_one=False),
}


def get_routing(name: str) -> Routing:
    """The routing scheme registered under `name` (ValueError listing the choices otherwise)."""
    if name not in ROUTINGS:
        raise ValueError(f"unknown routing {name!r}; expected one of {sorted(ROUTINGS)}")
    return ROUTINGS[name]


def combine_weights(logits: Tensor, top_k: int, routing: str = "xft") -> Tensor:
    """Expert weights `[T, N]` from router logits `[T, R]` (docs/method.md §1).

    `top_k` counts the shared expert for the shared-expert schemes (``"xft"``,
    ``"unnormalized"``: R = N-1, column 0 is the shared expert) and is the
    number of selected experts for ``"sparse"`` (R = N). Unselected experts get 0.
    """
    scheme = get_routing(routing)
    k = scheme.routed_k(top_k)
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"top_k={top_k} selects {k} of {logits.shape[-1]} routed experts")
    weights, _ = scheme.combine(logits, k)
    return weights


# ----------------------------------------------------------------------------- routers

class MLPRouter(nn.Sequential):
    """The paper code's router: Linear(d, R) -> tanh -> Linear(R, R), no biases."""

    def __init__(self, hidden_size: int, num_routed: int):
        super().__init__(nn.Linear(hidden_size, num_routed, bias=False), nn.Tanh(),
                         nn.Linear(num_routed, num_routed, bias=False))


class LinearRouter(nn.Sequential):
    """A plain linear router: Linear(d, R), no bias."""

    def __init__(self, hidden_size: int, num_routed: int):
        super().__init__(nn.Linear(hidden_size, num_routed, bias=False))


ROUTERS: dict[str, type[nn.Module]] = {"mlp": MLPRouter, "linear": LinearRouter}


class NoisyTopKGate(nn.Module):
    """Router plus Shazeer et al.'s learned Gaussian noise on the logits (training only).

    Noise scale per token and expert: `softplus(u · W_noise) + 1e-2`, with
    `W_noise` zero-initialised (so the noise starts at std 1e-2).
    """

    noise_epsilon = 1e-2

    def __init__(self, router: str, hidden_size: int, num_routed: int, noisy: bool):
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; expected one of {sorted(ROUTERS)}")
        self.router = ROUTERS[router](hidden_size, num_routed)
        self.noise = nn.Linear(hidden_size, num_routed, bias=False) if noisy else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """x [T, d] -> (clean logits [T, R], logits to route on [T, R], noise std [T, R] or None)."""
        clean = self.router(x)
        if self.noise is None or not self.training:
            return clean, clean, None
        std = F.softplus(self.noise(x)) + self.noise_epsilon
        return clean, clean + torch.randn_like(clean) * std, std


# ----------------------------------------------------------------------------- balance loss

def cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation `var(x) / (mean(x)^2 + 1e-10)` (unbiased var, as the paper's code)."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


def per_token_load(top_i: Tensor, num_routed: int, clean: Tensor, noisy: Tensor, std: Tensor | None,
                   estimate: str = "corrected") -> Tensor:
    """How much each token counts toward each routed expert's load, `[T, R]` (sum over T: the load).

    Without noise: 1 where the expert is selected. With noise (training): the
    smooth estimate of Shazeer et al. — the probability that the expert lands
    in the top-k under a fresh draw of the noise, which has a gradient.
    ``estimate="faithful"`` reproduces the paper's code, which tests the
    *noise term alone* against the top-k threshold when deciding whether an
    expert is currently in; ``"corrected"`` tests the noisy logits, as
    Shazeer et al. intend.
    """
    k = top_i.shape[-1]
    if std is None or k >= num_routed:
        return torch.zeros_like(clean).scatter(-1, top_i, 1.0)
    top_vals = noisy.topk(k + 1, dim=-1).values  # [T, k+1]
    threshold_if_in = top_vals[:, k:k + 1]  # an expert that is in must stay above the (k+1)-th value
    threshold_if_out = top_vals[:, k - 1:k]  # an expert that is out must beat the k-th value
    probe = noisy if estimate == "corrected" else noisy - clean
    # The standard normal CDF, as torch.distributions.Normal(0, 1).cdf computes it (bit for bit), without
    # building a distribution per forward, whose argument validation syncs with the GPU.
    p_in = _std_normal_cdf((clean - threshold_if_in) / std)
    p_out = _std_normal_cdf((clean - threshold_if_out) / std)
    return torch.where(probe > threshold_if_in, p_in, p_out)


def _std_normal_cdf(z: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


LOAD_ESTIMATES = ("corrected", "faithful")


def balance_loss(importance: Tensor, load: Tensor, weight: float) -> Tensor:
    """`weight · (cv²(importance) + cv²(load))`, the paper's per-layer load-balancing loss."""
    if weight == 0:
        return importance.new_zeros((), dtype=torch.float32)
    return weight * (cv_squared(importance) + cv_squared(load))


# ----------------------------------------------------------------------------- balance methods

def token_quantities(names: tuple[str, ...], routed_weights: Tensor, top_i: Tensor, clean: Tensor, noisy: Tensor,
                     std: Tensor | None, estimate: str = "corrected") -> dict[str, Tensor]:
    """The per-token quantities `names` a balance method sums over tokens, `[T, R]` each.

    * ``importance``: the routed experts' weights (0 where not selected);
    * ``load``: Shazeer et al.'s load estimate (`per_token_load`; the selection count without noise);
    * ``count``: 1 where the expert is selected, the hard selection count;
    * ``probability``: the router's softmax over the R routed experts (of the logits routed on).
    """
    make = {
        "importance": lambda: routed_weights,
        "load": lambda: per_token_load(top_i, noisy.shape[-1], clean, noisy, std, estimate),
        "count": lambda: torch.zeros_like(noisy).scatter(-1, top_i, 1.0),
        "probability": lambda: noisy.softmax(dim=-1),
    }
    return {name: make[name]() for name in names}


def _cv2_loss(sums: dict[str, Tensor], weight: float) -> Tensor:
    return balance_loss(sums["importance"], sums["load"], weight)


def switch_loss(count: Tensor, probability: Tensor, weight: float) -> Tensor:
    """`weight · R · Σ_i f_i · P_i` (Fedus et al.) from per-expert sums over tokens [R]: 1·weight when balanced.

    f_i = count_i / Σ count: expert i's share of the T·k selections (each of a token's k counts; Σ f = 1,
    so the loss is k times smaller than transformers' `load_balancing_loss_func`); no gradient.
    P_i = probability_i / T, the mean router probability, with T = Σ probability (each token's softmax
    sums to 1; detached, a constant).
    """
    if weight == 0:
        return probability.new_zeros((), dtype=torch.float32)
    count, probability = count.float(), probability.float()
    f = count / count.sum().clamp_min(1.0)
    p = probability / probability.sum().detach().clamp_min(1e-10)
    return weight * count.numel() * (f * p).sum()


def _switch_loss(sums: dict[str, Tensor], weight: float) -> Tensor:
    return switch_loss(sums["count"], sums["probability"], weight)


def _no_loss(sums: dict[str, Tensor], weight: float) -> Tensor:
    return next(iter(sums.values())).new_zeros((), dtype=torch.float32)


@dataclass(frozen=True)
class Balance:
    """A load-balancing method: which per-expert sums over tokens it needs and the loss it makes of them."""

    name: str
    sums: tuple[str, ...]  # per-token quantities (`token_quantities`) summed over tokens, [R] each
    # (sums, weight) -> scalar, scale-invariant: L(c·sums) = L(sums) (the global scope's gradient relies on it)
    loss: Callable[[dict[str, Tensor], float], Tensor]
    load: str  # the sum that is the expert load (logged; the aux-free update balances it)
    selection_bias: bool = False  # a per-expert bias [R] on the selection scores, moved by `xft.balance_step`


BALANCES: dict[str, Balance] = {
    "cv2": Balance("cv2", ("importance", "load"), _cv2_loss, load="load"),
    "switch": Balance("switch", ("count", "probability"), _switch_loss, load="count"),
    "aux_free": Balance("aux_free", ("count",), _no_loss, load="count", selection_bias=True),
}

# micro_batch: each forward's sums make its own loss; global: sums over the optimizer step's micro-batches
# and the data-parallel processes (xft.upcycle; docs/method.md).
BALANCE_SCOPES = ("micro_batch", "global")


def get_balance(name: str) -> Balance:
    """The balance method registered under `name` (ValueError listing the choices otherwise)."""
    if name not in BALANCES:
        raise ValueError(f"unknown balance {name!r}; expected one of {sorted(BALANCES)}")
    return BALANCES[name]
