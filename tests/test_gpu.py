"""The core library on CUDA: upcycle == dense, grouped_mm == loop, learned merge == compiled, load(device=).

Every test here needs a CUDA GPU and is skipped without one (CI has none). The fp32 checks use the CPU
tests' tolerances (TF32 is off for fp32 matmuls by default, so CUDA fp32 is plain fp32). The bf16 checks
cannot use a fixed tolerance: each bf16 rounding is off by up to 2^-8 relative, and how far that moves
the logits depends on the model. So they are checked against what bf16 costs anyway — the error of the
dense model in bf16 against the same model in fp32 — or, where two kernels compute the same thing in
bf16, against bf16's machine epsilon.
"""

import copy

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

import xft
from xft.merge import merge_modules
from xft.moe import MoEBlock
from xft.testing import ARCHITECTURES, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = "cuda"
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2^-7: one rounding is off by at most half of it


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits.float()


def _ids(batch, length):
    return torch.randint(0, 300, (batch, length), device=CUDA)


def _perturb(moe, scale):
    with torch.no_grad():
        for stacks in xft.expert_weights(moe).values():
            for p in stacks.values():
                p.add_(torch.randn_like(p) * scale)
    return moe


def _on(model, dtype):
    return all(p.device.type == "cuda" and p.dtype == dtype for p in model.parameters())


def _rel(a, b):
    """Relative error ||a - b|| / ||b|| (fp32)."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ----------------------------------------------------------------------------- (a) upcycle == dense

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_upcycled_model_computes_the_dense_model_on_cuda(arch):
    dense = tiny_model(arch).to(CUDA)
    ids = _ids(2, 11)
    ref = _logits(dense, ids)
    for routing in ("xft", "sparse"):
        for impl in ("fast", "grouped_mm"):
            moe = xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig(routing=routing, expert_impl=impl))
            assert _on(moe, torch.float32)
            torch.testing.assert_close(_logits(moe, ids), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["fast", "grouped_mm"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi", "starcoder2"])
def test_upcycled_bf16_model_stays_within_bf16_noise_of_the_dense_model(arch, impl):
    dense = tiny_model(arch).to(CUDA)
    ids = _ids(4, 32)
    truth = _logits(dense, ids)  # fp32
    dense16 = copy.deepcopy(dense).to(torch.bfloat16)
    moe16 = xft.upcycle(copy.deepcopy(dense16), xft.UpcycleConfig(expert_impl=impl))
    assert _on(moe16, torch.bfloat16)
    base = (_logits(dense16, ids) - truth).abs()  # what running the dense model in bf16 costs
    err = (_logits(moe16, ids) - truth).abs()
    # The MoE runs the same bf16 weights and adds a few roundings per layer (the routing weights are
    # rounded to bf16; six weighted expert outputs are summed in bf16): the same order as the dense
    # model's own bf16 error, not more than a small multiple of it.
    print(f"\n  bf16 {arch}/{impl}: max err MoE {err.max():.3e} vs dense {base.max():.3e}; "
          f"mean {err.mean():.3e} vs {base.mean():.3e}")
    assert err.mean() <= 3 * base.mean()
    assert err.max() <= 3 * base.max()


# ----------------------------------------------------------------------------- (b) grouped_mm == loop

# Whole tiny models, grouped_mm vs loop on CUDA: tests/test_upcycle.py::test_grouped_mm_path_equals_loop_path
# (its "cuda" cases).


def _block_pair(d, inter, tokens, dtype, num_experts=8, top_k=6, routing="xft"):
    """The same MoE block (distinct experts) with the loop and the grouped_mm kernel, and an input."""
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=inter, hidden_act="silu",
                               num_attention_heads=1, num_key_value_heads=1))
    mlp_copy = copy.deepcopy(mlp)  # MoEBlock turns its FFN into the expert stacks in place
    cfg = dict(num_experts=num_experts, top_k=top_k, routing=routing, noisy_gating=False)
    loop = MoEBlock(mlp, d, xft.UpcycleConfig(expert_impl="fast", **cfg))
    with torch.no_grad():
        for p in loop.experts.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    grouped = MoEBlock(mlp_copy, d, xft.UpcycleConfig(expert_impl="grouped_mm", **cfg))
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(tokens, d)
    return loop.to(CUDA, dtype).train(), grouped.to(CUDA, dtype).train(), x.to(CUDA, dtype)


def _fwd_bwd(block, x):
    x = x.clone().requires_grad_(True)
    y = block(x)
    y.backward(torch.ones_like(y) / y.numel() ** 0.5)
    grads = {n: p.grad for n, p in block.named_parameters()}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("tokens", [1, 37, 1000])
def test_grouped_mm_block_equals_loop_block_fp32(tokens):
    # 1 token: 5 of 7 routed experts get no tokens (empty groups); 37 and 1000: group sizes that are not
    # multiples of 8 or 16, so grouped_mm's offsets are unaligned.
    loop, grouped, x = _block_pair(64, 176, tokens, torch.float32)
    y_l, gx_l, g_l = _fwd_bwd(loop, x)
    y_g, gx_g, g_g = _fwd_bwd(grouped, x)
    torch.testing.assert_close(y_g, y_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_g, gx_l, rtol=1e-5, atol=1e-6)
    assert g_g.keys() == g_l.keys()
    for name in g_l:
        torch.testing.assert_close(g_g[name], g_l[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("routing", ["xft", "sparse"])
@pytest.mark.parametrize("tokens", [1, 37, 1000])
def test_grouped_mm_block_equals_loop_block_bf16(tokens, routing):
    loop, grouped, x = _block_pair(64, 176, tokens, torch.bfloat16, routing=routing)
    y_l, gx_l, g_l = _fwd_bwd(loop, x)
    y_g, gx_g, g_g = _fwd_bwd(grouped, x)
    # Same routing (the router runs the same bf16 kernels in both); the experts' matmuls differ only in
    # their fp32 accumulation order before each bf16 rounding, and there are a handful of roundings
    # between the input and any output or gradient: the kernels agree to a few bf16 epsilons.
    budget = 4 * BF16_EPS
    errs = {"out": _rel(y_g, y_l), "x.grad": _rel(gx_g, gx_l),
            **{n: _rel(g_g[n], g_l[n]) for n in g_l if g_l[n].norm() > 0}}
    print(f"\n  bf16 T={tokens} {routing}: grouped vs loop rel err (budget {budget:.3f}): "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert all(v <= budget for v in errs.values()), errs
    for name in g_l:  # experts nobody picked get exactly zero gradient in both
        assert torch.equal(g_g[name].flatten(1).abs().sum(1) > 0, g_l[name].flatten(1).abs().sum(1) > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_block_with_unaligned_sizes_runs_the_loop_kernel(dtype):
    # d=30, I=18: rows of 120/72 bytes in fp32, 60/36 in bf16, not multiples of 16, which grouped_mm
    # refuses ("strides should be multiple of 16 bytes"); the block runs the loop kernel instead, so it
    # computes what the loop block computes, bit for bit. (CPU: tests/test_upcycle.py.)
    loop, grouped, x = _block_pair(30, 18, 50, dtype)
    with pytest.warns(UserWarning, match="multiples of 16 bytes"):
        y_g, gx_g, g_g = _fwd_bwd(grouped, x)
    y_l, gx_l, g_l = _fwd_bwd(loop, x)
    assert torch.equal(y_g, y_l) and torch.equal(gx_g, gx_l)
    assert all(torch.equal(g_g[n], g_l[n]) for n in g_l)


def test_auto_runs_grouped_mm_on_cuda_and_falls_back_silently(monkeypatch):
    """expert_impl='auto' on CUDA runs the grouped_mm kernel; with sizes grouped_mm cannot take, the loop,
    without the warning an explicit 'grouped_mm' gives. (Bit equality is not a test here: index_add_ on
    CUDA accumulates with atomics, so even one kernel is not bitwise reproducible.)"""
    import warnings

    import xft.moe as moe_module

    calls = []
    real = moe_module._run_grouped
    monkeypatch.setattr(moe_module, "_run_grouped", lambda *a: calls.append(1) or real(*a))  # count, compute
    for d, inter, kernel in ((64, 176, "grouped"), (30, 18, "loop")):
        loop, _, x = _block_pair(d, inter, 1000, torch.bfloat16)
        auto = MoEBlock(LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=inter, hidden_act="silu",
                                             num_attention_heads=1, num_key_value_heads=1)), d,
                        xft.UpcycleConfig(num_experts=8, top_k=6, noisy_gating=False))
        auto.load_state_dict(loop.state_dict())
        auto.to(CUDA, torch.bfloat16).train()
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y, gx, _ = _fwd_bwd(auto, x)
        assert len(calls) == (1 if kernel == "grouped" else 0), (d, inter)
        y_l, gx_l, _ = _fwd_bwd(loop, x)
        assert _rel(y, y_l) <= 4 * BF16_EPS and _rel(gx, gx_l) <= 4 * BF16_EPS


# ----------------------------------------------------------------------------- (c) learned merge

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_learnable_merge_equals_compiled_merge_on_cuda(arch):
    moe = _perturb(xft.upcycle(tiny_model(arch).to(CUDA)), 0.1)
    logits = {i: torch.randn(7, device=CUDA) for i in range(2)}
    reference = xft.merge(moe, shared_weight=0.75, mixing_logits=logits)
    merge_model = xft.build_merge_model(copy.deepcopy(moe), shared_weight=0.75)
    with torch.no_grad():
        for i, m in merge_modules(merge_model).items():
            assert m.mixing_logits.device.type == "cuda"
            m.mixing_logits.copy_(logits[i])
    compiled = xft.compile_merge(merge_model)
    assert _on(reference, torch.float32) and _on(compiled, torch.float32)
    ids = _ids(2, 10)
    a, b, c = _logits(merge_model, ids), _logits(compiled, ids), _logits(reference, ids)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(b, c, rtol=0, atol=1e-5)
    merge_model(ids, labels=ids).loss.backward()
    for m in merge_modules(merge_model).values():
        assert m.mixing_logits.grad.device.type == "cuda" and m.mixing_logits.grad.abs().sum() > 0


def test_bf16_learnable_merge_stays_within_bf16_noise_of_its_compiled_model():
    moe = _perturb(xft.upcycle(tiny_model("llama").to(CUDA)), 0.1)
    logits = {i: torch.randn(7, device=CUDA) for i in range(2)}
    truth_model = xft.merge(moe, mixing_logits=logits)  # fp32
    merge16 = xft.build_merge_model(copy.deepcopy(moe).to(torch.bfloat16))
    with torch.no_grad():
        for i, m in merge_modules(merge16).items():
            m.mixing_logits.copy_(logits[i])
    compiled16 = xft.compile_merge(merge16)
    assert _on(compiled16, torch.bfloat16)
    ids = _ids(4, 32)
    truth = _logits(truth_model, ids)
    # compiled16 holds the fp32 merge rounded once to bf16: its error is what bf16 costs. The merge model
    # also rounds the coefficients to bf16 and mixes the stacks in bf16: the same order, a small multiple.
    base = (_logits(compiled16, ids) - truth).abs()
    err = (_logits(merge16, ids) - truth).abs()
    print(f"\n  bf16 merge: max err merge model {err.max():.3e} vs compiled {base.max():.3e}; "
          f"mean {err.mean():.3e} vs {base.mean():.3e}")
    assert err.mean() <= 3 * base.mean() and err.max() <= 3 * base.max()


# ----------------------------------------------------------------------------- (d) load onto CUDA

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_moe_checkpoint_loads_onto_cuda(tmp_path, arch):
    moe = _perturb(xft.upcycle(tiny_model(arch), xft.UpcycleConfig(num_experts=4, top_k=3)), 0.1)  # CPU
    moe.save_pretrained(tmp_path)
    loaded = xft.load(str(tmp_path), device=CUDA)
    assert _on(loaded, torch.float32) and xft.upcycle_config(loaded) == xft.upcycle_config(moe)
    assert all(b.device.type == "cuda" for b in loaded.buffers())
    for name, p in moe.state_dict().items():
        assert torch.equal(loaded.state_dict()[name].cpu(), p), name
    ids = torch.randint(0, 300, (2, 9))
    torch.testing.assert_close(_logits(loaded, ids.to(CUDA)).cpu(), _logits(moe, ids), rtol=0, atol=1e-5)
    # Training step on the loaded model: balance loss, backward, gradients on CUDA.
    loaded.train()
    loaded(ids.to(CUDA), labels=ids.to(CUDA)).loss.backward()
    assert all(p.grad is not None and p.grad.device.type == "cuda" for p in loaded.parameters())

    loaded16 = xft.load(str(tmp_path), dtype=torch.bfloat16, device=CUDA)
    assert _on(loaded16, torch.bfloat16)
    for name, p in moe.state_dict().items():
        assert torch.equal(loaded16.state_dict()[name].cpu(), p.to(torch.bfloat16)), name


def test_dense_checkpoint_loads_onto_cuda(tmp_path):
    dense = tiny_model("qwen2")
    dense.save_pretrained(tmp_path)
    loaded = xft.load(str(tmp_path), device=CUDA)
    assert not xft.is_moe(loaded) and _on(loaded, torch.float32)
    ids = torch.randint(0, 300, (1, 7))
    torch.testing.assert_close(_logits(loaded, ids.to(CUDA)).cpu(), _logits(dense, ids), rtol=0, atol=1e-5)
