"""combine_weights against a per-token reference written straight from docs/method.md §1."""

import math

import pytest
import torch

import xft
from xft.routing import balance_loss, cv_squared, per_token_load


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def reference(row: list[float], top_k: int, routing: str) -> list[float]:
    """One token's expert weights, computed the slow, obvious way."""
    if routing == "sparse":
        sel = sorted(range(len(row)), key=lambda j: -row[j])[:top_k]
        sm = _softmax([row[j] for j in sel])
        w = [0.0] * len(row)
        for j, v in zip(sel, sm):
            w[j] = v
        return w
    p = _softmax(row)
    sel = sorted(range(len(row)), key=lambda j: -p[j])[:top_k - 1]
    s_max = max(p)
    w = [1.0 - s_max] + [0.0] * len(row)
    if routing == "xft":
        sm = _softmax([p[j] for j in sel])  # softmax over the selected *probabilities*
        for j, v in zip(sel, sm):
            w[1 + j] = v * s_max
    else:  # unnormalized
        for j in sel:
            w[1 + j] = p[j]
    return w


@pytest.mark.parametrize("routing", ["xft", "sparse", "unnormalized"])
@pytest.mark.parametrize("n,k", [(8, 6), (8, 2), (4, 3), (16, 4), (3, 2), (8, 8)])
def test_combine_weights_matches_reference(routing, n, k):
    r = n if routing == "sparse" else n - 1
    logits = torch.randn(37, r, dtype=torch.float64) * 2
    got = xft.combine_weights(logits, k, routing)
    assert got.shape == (37, n)
    want = torch.tensor([reference(row, k, routing) for row in logits.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert ((got > 0).sum(-1) == k).all()  # exactly K experts active (counting the shared one)


@pytest.mark.parametrize("routing", ["xft", "sparse"])
def test_normalized_routings_sum_to_one(routing):
    r = 8 if routing == "sparse" else 7
    w = xft.combine_weights(torch.randn(100, r) * 5, 6, routing)
    torch.testing.assert_close(w.sum(-1), torch.ones(100))


def test_unnormalized_routing_does_not_sum_to_one():
    w = xft.combine_weights(torch.randn(100, 7), 6, "unnormalized")
    assert (w.sum(-1) - 1).abs().min() > 1e-4  # the paper's "scale mismatch"


def test_combine_weights_is_differentiable():
    logits = torch.randn(5, 7, requires_grad=True)
    (xft.combine_weights(logits, 6, "xft")[:, 1:] ** 2).sum().backward()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("top_k,routing", [(9, "xft"), (1, "xft"), (0, "sparse"), (1, "unnormalized")])
def test_combine_weights_rejects_bad_top_k(top_k, routing):
    with pytest.raises(ValueError):
        xft.combine_weights(torch.randn(3, 8 if routing == "sparse" else 7), top_k, routing)


def test_unknown_routing_is_named():
    with pytest.raises(ValueError, match="unknown routing 'nope'"):
        xft.combine_weights(torch.randn(3, 7), 6, "nope")


def test_cv_squared_and_balance_loss():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert cv_squared(x).item() == pytest.approx(x.var().item() / (x.mean().item() ** 2 + 1e-10))
    assert cv_squared(torch.full((7,), 3.0)).item() == 0.0
    imp, load = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])
    assert balance_loss(imp, load, 0.01).item() == pytest.approx(0.01 * cv_squared(imp).item())


def test_load_without_noise_is_the_selection_count():
    top_i = torch.tensor([[0, 2], [2, 1], [2, 0]])
    load = per_token_load(top_i, 4, torch.zeros(3, 4), torch.zeros(3, 4), None).sum(0)
    assert load.tolist() == [2.0, 1.0, 3.0, 0.0]


def test_noisy_load_estimates_are_probabilities_and_differ():
    torch.manual_seed(1)
    clean = torch.randn(64, 7)
    std = torch.full((64, 7), 0.5)
    noisy = clean + torch.randn_like(clean) * std
    top_i = noisy.topk(5, dim=-1).indices
    corrected = per_token_load(top_i, 7, clean, noisy, std, "corrected")
    faithful = per_token_load(top_i, 7, clean, noisy, std, "faithful")
    for est in (corrected, faithful):
        assert est.shape == (64, 7) and (est >= 0).all() and (est <= 1).all()
    assert not torch.allclose(corrected, faithful)
    # The corrected estimate tracks the actual selection: selected experts are likely to stay selected.
    selected = torch.zeros_like(clean).scatter(-1, top_i, 1.0).bool()
    assert corrected[selected].mean() > corrected[~selected].mean()
