"""Upcycling invariants on tiny random models of every supported architecture."""

import copy

import pytest
import torch
from torch import nn

import xft
from xft.errors import UserError
from xft.testing import ARCHITECTURES, MORE_ARCHITECTURES, tiny_model


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_upcycled_model_computes_the_dense_model(arch):
    dense = tiny_model(arch)
    ids = torch.randint(0, 300, (2, 11))
    ref = _logits(dense, ids)
    for routing in ("xft", "sparse"):
        moe = xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig(routing=routing))
        assert xft.is_moe(moe) and len(xft.moe_blocks(moe)) == dense.config.num_hidden_layers
        torch.testing.assert_close(_logits(moe, ids), ref, rtol=0, atol=1e-5)
    moe = xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig(routing="unnormalized"))
    assert (_logits(moe, ids) - ref).abs().max() > 1e-4  # the scale mismatch is real


# Beyond the required list: same-shaped FFNs work unchanged; phi3 (fused gate_up_proj), bloom and mpt
# (FFN takes the residual as a second argument) run through the generic functional_call path.
@pytest.mark.parametrize("arch,impl", [(a, "generic" if a in ("phi3", "bloom", "mpt") else "fast")
                                       for a in MORE_ARCHITECTURES])
def test_other_architectures(arch, impl):
    dense = tiny_model(arch)
    ids = torch.randint(0, 300, (2, 8))
    moe = xft.upcycle(copy.deepcopy(dense))
    assert (xft.moe_blocks(moe)[0].spec is not None) == (impl == "fast")
    torch.testing.assert_close(_logits(moe, ids), _logits(dense, ids), rtol=0, atol=1e-5)
    merge_model = xft.build_merge_model(moe)
    torch.testing.assert_close(_logits(merge_model, ids), _logits(dense, ids), rtol=0, atol=1e-5)


def test_experts_without_tokens_still_get_a_gradient():
    # A single token picks 2 of 8 experts: the stacked parameter still gets one (zero-padded) gradient,
    # so DDP/FSDP/ZeRO-3 see the same parameters used on every rank and never wait on a missing one.
    moe = xft.upcycle(tiny_model("llama"), xft.UpcycleConfig(num_experts=8, top_k=2)).train()
    ids = torch.randint(0, 300, (1, 1))
    moe(ids).logits.square().sum().backward()
    assert [n for n, p in moe.named_parameters() if p.grad is None] == []  # DDP needs no unused-param search
    for stacks in xft.expert_weights(moe).values():
        for stack in stacks.values():
            assert stack.grad is not None and stack.grad.shape == stack.shape
            used = stack.grad.flatten(1).abs().sum(1) > 0
            assert used.sum() == 2  # shared expert + the one routed expert


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi"])
def test_generic_path_equals_fast_path(arch):
    moe = xft.upcycle(tiny_model(arch), xft.UpcycleConfig(expert_impl="fast"))
    generic = copy.deepcopy(moe)
    for block in xft.moe_blocks(generic).values():
        block.expert_impl = "generic"  # functional_call on the FFN module
        assert block.spec is None
    with torch.no_grad():
        for stacks in xft.expert_weights(moe).values():
            for p in stacks.values():
                p.add_(torch.randn_like(p) * 0.05)
    for (_, a), (_, b) in zip(xft.expert_weights(moe).items(), xft.expert_weights(generic).items()):
        for name in a:
            b[name].data.copy_(a[name].data)
    ids = torch.randint(0, 300, (2, 9))
    torch.testing.assert_close(_logits(generic, ids), _logits(moe, ids), rtol=0, atol=1e-6)


def test_expert_weights_are_live_independent_stacks():
    dense = tiny_model("gpt2")
    ffn_params = dict(dense.transformer.h[0].mlp.named_parameters())
    moe = xft.upcycle(dense, xft.UpcycleConfig(num_experts=4, top_k=3))
    stacks = xft.expert_weights(moe)
    assert sorted(stacks) == [0, 1]
    assert set(stacks[0]) == {"c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"}
    for name, stack in stacks[0].items():
        assert stack.shape == (4, *ffn_params[name].shape)
        assert all(torch.equal(stack[e], ffn_params[name]) for e in range(4))
        assert stack is dict(moe.named_parameters())[f"transformer.h.0.mlp.experts.{name}"]
    with torch.no_grad():
        stacks[0]["c_fc.weight"][1].add_(1.0)  # experts do not share storage
    assert not torch.equal(stacks[0]["c_fc.weight"][0], stacks[0]["c_fc.weight"][1])


def test_training_backward_reaches_router_and_experts_and_adds_balance_loss():
    moe = xft.upcycle(tiny_model("llama"), xft.UpcycleConfig(num_experts=8, top_k=3)).train()
    ids = torch.randint(0, 300, (4, 16))
    out = moe(ids, labels=ids)
    stats = xft.routing_stats(moe)
    aux = sum(s["balance_loss"] for s in stats.values())
    assert aux > 0 and set(stats) == {0, 1} and stats[0]["load"].shape == (7,)
    assert stats[0]["load"].sum().item() == pytest.approx(64 * 2, rel=0.3)  # ~k selections per token
    out.loss.backward()
    block = xft.moe_blocks(moe)[0]
    assert block.gate.router[0].weight.grad.abs().sum() > 0
    assert block.gate.noise.weight.grad.abs().sum() > 0
    assert block.experts.gate_proj.weight.grad[0].abs().sum() > 0


def test_balance_loss_is_added_to_the_lm_loss_and_ignores_padding():
    moe = xft.upcycle(tiny_model("llama"), xft.UpcycleConfig(noisy_gating=False, balance_loss_weight=1.0))
    ids = torch.randint(3, 300, (1, 12))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    with torch.no_grad():
        full = moe(ids, attention_mask=mask, labels=labels).loss
        aux = sum(s["balance_loss"] for s in xft.routing_stats(moe).values())
        no_aux = copy.deepcopy(moe)
        for b in xft.moe_blocks(no_aux).values():
            b.config.balance_loss_weight = 0.0
        lm = no_aux(ids, attention_mask=mask, labels=labels).loss
        assert full.item() == pytest.approx(lm.item() + aux.item(), rel=1e-6)
        # Right-pad with 5 tokens (masked, labels -100): the balance loss must not change.
        pad_ids = torch.cat([ids, torch.zeros(1, 5, dtype=ids.dtype)], 1)
        pad_mask = torch.cat([mask, torch.zeros(1, 5, dtype=mask.dtype)], 1)
        pad_labels = torch.cat([labels, torch.full((1, 5), -100)], 1)
        moe(pad_ids, attention_mask=pad_mask, labels=pad_labels)
        aux_padded = sum(s["balance_loss"] for s in xft.routing_stats(moe).values())
    assert aux_padded.item() == pytest.approx(aux.item(), rel=1e-5)


def test_noise_only_in_training():
    moe = xft.upcycle(tiny_model("llama"), xft.UpcycleConfig())
    ids = torch.randint(0, 300, (2, 9))
    assert torch.equal(_logits(moe, ids), _logits(moe, ids))
    moe.train()
    with torch.no_grad():
        for b in xft.moe_blocks(moe).values():
            b.gate.noise.weight.fill_(1.0)  # large noise
        a, b_ = moe(ids).logits, moe(ids).logits
    assert not torch.equal(a, b_)


def test_router_init_is_seeded_and_does_not_touch_global_rng():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = xft.upcycle(tiny_model("llama"), xft.UpcycleConfig(seed=3))
    torch.set_rng_state(before)
    b = xft.upcycle(tiny_model("llama"), xft.UpcycleConfig(seed=3))
    wa = xft.moe_blocks(a)[0].gate.router[0].weight
    wb = xft.moe_blocks(b)[0].gate.router[0].weight
    assert torch.equal(wa, wb)


def test_bf16_model_keeps_bf16_experts():
    moe = xft.upcycle(tiny_model("llama").to(torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 for p in moe.parameters())
    out = moe(torch.randint(0, 300, (1, 5))).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_ewa_step_pulls_experts_to_their_mean():
    moe = xft.upcycle(tiny_model("llama"))
    stack = xft.expert_weights(moe)[0]["up_proj.weight"]
    with torch.no_grad():
        stack.add_(torch.randn_like(stack))
    mean = stack.mean(0).clone()
    before = stack.clone()
    xft.ewa_step(moe, 0.25)
    torch.testing.assert_close(stack, 0.75 * before + 0.25 * mean.expand_as(before))
    torch.testing.assert_close(stack.mean(0), mean)


class _NoFFNLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(4, 4)


class _NoFFNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"num_hidden_layers": 2, "hidden_size": 4})()
        self.layers = nn.ModuleList([_NoFFNLayer(), _NoFFNLayer()])


def test_model_without_ffn_gets_a_clear_error():
    with pytest.raises(UserError, match="_NoFFNModel: found no FFN"):
        xft.upcycle(_NoFFNModel())


def test_upcycling_twice_is_refused():
    moe = xft.upcycle(tiny_model("llama"))
    with pytest.raises(ValueError, match="already upcycled"):
        xft.upcycle(moe)


@pytest.mark.parametrize("kwargs,message", [
    (dict(top_k=9), "top_k=9 exceeds num_experts=8"),
    (dict(top_k=1), "must be at least 2"),
    (dict(routing="sparse", top_k=0), "at least 1"),
    (dict(routing="moe"), "routing='moe'; expected one of"),
    (dict(router="conv"), "router='conv'"),
    (dict(num_experts=1, top_k=1), "at least 2 experts"),
    (dict(balance_loss_weight=-1.0), "balance_loss_weight"),
    (dict(load_estimate="x"), "load_estimate"),
])
def test_invalid_configs_are_rejected_readably(kwargs, message):
    with pytest.raises(xft.ConfigError, match=message):
        xft.UpcycleConfig(**kwargs)


def test_sparse_top1_is_allowed_without_shared_expert():
    moe = xft.upcycle(tiny_model("llama"), xft.UpcycleConfig(routing="sparse", num_experts=4, top_k=1))
    ids = torch.randint(0, 300, (1, 6))
    torch.testing.assert_close(_logits(moe, ids), _logits(tiny_model("llama"), ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "starcoder2"])
def test_grouped_mm_path_equals_loop_path(arch, device):
    dense = tiny_model(arch).to(device)
    loop = xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig(expert_impl="fast", noisy_gating=False))
    grouped = xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig(expert_impl="grouped_mm", noisy_gating=False))
    with torch.no_grad():
        for a, b in zip(xft.expert_weights(loop).values(), xft.expert_weights(grouped).values()):
            for name in a:
                a[name].add_(torch.randn_like(a[name]) * 0.05)
                b[name].copy_(a[name])
    ids = torch.randint(0, 300, (2, 9), device=device)
    la, lb = loop(ids, labels=ids), grouped(ids, labels=ids)
    torch.testing.assert_close(lb.logits, la.logits, rtol=0, atol=1e-5)
    la.loss.backward()
    lb.loss.backward()
    for a, b in zip(xft.expert_weights(loop).values(), xft.expert_weights(grouped).values()):
        for name in a:
            torch.testing.assert_close(b[name].grad, a[name].grad, rtol=1e-4, atol=1e-6)


def test_grouped_mm_with_sizes_it_cannot_take_runs_the_loop():
    # torch._grouped_mm needs matrix rows of a multiple of 16 bytes: hidden 30, FFN 18 (fp32: 120 and 72
    # bytes) fails inside it, so the block warns and runs the loop kernel, bit for bit the loop's result.
    dense = tiny_model("llama", hidden=30, intermediate=18, heads=1)
    loop = xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig(expert_impl="fast"))
    grouped = xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig(expert_impl="grouped_mm"))
    ids = torch.randint(0, 300, (2, 9))
    with pytest.warns(UserWarning, match="multiples of 16 bytes"):
        got = _logits(grouped, ids)
    assert torch.equal(got, _logits(loop, ids))


def test_auto_kernel_is_the_loop_on_cpu():
    # 'auto' takes grouped_mm only on CUDA (where it was measured faster); on CPU it is the loop, bit for bit.
    dense = tiny_model("llama")
    auto = xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig())
    loop = xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig(expert_impl="fast"))
    assert all(b.expert_impl == "auto" and b.spec is not None for b in xft.moe_blocks(auto).values())
    ids = torch.randint(0, 300, (2, 9))
    assert torch.equal(_logits(auto, ids), _logits(loop, ids))


def test_expert_impl_choices_are_the_kernel_registry():
    from dataclasses import fields

    from xft.config import choices_of
    from xft.moe import EXPERT_IMPLS

    field = next(f for f in fields(xft.UpcycleConfig) if f.name == "expert_impl")
    assert choices_of(field) == tuple(EXPERT_IMPLS) == ("auto", "fast", "grouped_mm", "generic")
    block = xft.moe_blocks(xft.upcycle(tiny_model("llama")))[0]
    with pytest.raises(ValueError, match="unknown expert_impl 'nope'"):
        block.expert_impl = "nope"
    bloom = xft.moe_blocks(xft.upcycle(tiny_model("bloom")))[0]  # its FFN takes the residual: no spec
    with pytest.raises(ValueError, match="not a recognised gated/plain MLP"):
        bloom.expert_impl = "fast"
    assert bloom.expert_impl == "auto" and bloom.spec is None


def test_routing_record_only_with_gradients_or_labels():
    moe = xft.upcycle(tiny_model("llama"), xft.UpcycleConfig(noisy_gating=False))
    blocks = xft.moe_blocks(moe).values()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():  # generation: nothing asks for the routing, so none is built
        moe(ids)
        assert all(b.routing_record() is None for b in blocks)
    moe(ids)  # gradients on, no labels: built, then dropped by the model's hook (no loss to add it to)
    assert all(b.routing_record() is None for b in blocks)
    block = next(iter(blocks))
    x = torch.randn(5, moe.config.hidden_size)
    block(x)  # the block alone, with gradients: the record stays for whoever consumes it
    record = block.routing_record()
    weights, load = record.quantities["importance"], record.quantities["load"]  # cv2's: routed weights, load
    assert weights.shape == load.shape == (5, 7) and weights.requires_grad
    assert load.sum().item() == 5 * 5  # no noise: each token selects k = 5 routed experts
    with torch.no_grad():
        moe(ids, labels=ids)  # labels ask for the balance loss, also without gradients
    assert set(xft.routing_stats(moe)) == {0, 1}
    assert all(b.routing_record() is None for b in blocks)  # consumed


def test_deep_copy_keeps_the_balance_loss_and_merging_removes_its_hooks():
    from xft.upcycle import remove_balance_loss

    moe = xft.upcycle(tiny_model("llama"), xft.UpcycleConfig(noisy_gating=False, balance_loss_weight=1.0))
    ids = torch.randint(3, 300, (1, 12))
    copied = copy.deepcopy(moe)
    with torch.no_grad():
        lm = xft.merge(moe)(ids, labels=ids).loss  # init merge == the MoE's dense model: its LM loss alone
        total = copied(ids, labels=ids).loss
        aux = sum(s["balance_loss"] for s in xft.routing_stats(copied).values())
        assert aux > 0 and total.item() == pytest.approx(lm.item() + aux.item(), rel=1e-5)
        remove_balance_loss(copied)  # the copy's hooks, not the original's
        assert copied(ids, labels=ids).loss.item() == pytest.approx(lm.item(), rel=1e-5)
        assert moe(ids, labels=ids).loss.item() == pytest.approx(total.item(), rel=1e-6)
    assert not copied._forward_hooks and not copied._forward_pre_hooks
    for dense in (xft.merge(moe), xft.compile_merge(xft.build_merge_model(copy.deepcopy(moe)))):
        assert not dense._forward_hooks and not dense._forward_pre_hooks  # no xft hook survives a merge
        assert not hasattr(dense, "_xft_balance_loss_hooks")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loop_kernel_gradients_equal_the_generic_kernels(arch):
    # The loop writes each expert's weight gradient into one [N, ...] buffer (no unbind + stack): the
    # gradients must be those of plain autograd through functional_call, also on a second backward of the
    # same graph (retain_graph) and with frozen experts. eval(): GPT-2's dropout would differ per kernel.
    fast = _perturb(xft.upcycle(tiny_model(arch), xft.UpcycleConfig(expert_impl="fast", noisy_gating=False)))
    generic = copy.deepcopy(fast)
    for block in xft.moe_blocks(generic).values():
        block.expert_impl = "generic"
    ids = torch.randint(0, 300, (2, 9))
    for model in (fast, generic):
        loss = model.eval()(ids, labels=ids).loss
        loss.backward(retain_graph=True)
        loss.backward()
    for (name, a), (_, b) in zip(fast.named_parameters(), generic.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    for model in (fast, generic):
        model.zero_grad()
        for block in xft.moe_blocks(model).values():
            block.experts.requires_grad_(False)
        model(ids, labels=ids).loss.backward()
    assert all(p.grad is None for n, p in fast.named_parameters() if ".experts." in n)
    for (name, a), (_, b) in zip(fast.named_parameters(), generic.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_kernels_agree_under_autocast():
    # Mixed precision (the trainer's bf16 on fp32 weights): every kernel runs its matmuls as F.linear
    # would under autocast, so all three give the same output and gradients.
    block = xft.moe_blocks(_perturb(xft.upcycle(tiny_model("llama"), xft.UpcycleConfig(noisy_gating=False))))[0]
    x = torch.randn(37, block.gate.router[0].in_features)
    results = []
    for impl in ("fast", "grouped_mm", "generic"):
        b = copy.deepcopy(block)
        b.expert_impl = impl
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = b(xi)
        y.float().square().sum().backward()
        results.append((y.float(), xi.grad, b.experts.up_proj.weight.grad, b.gate.router[0].weight.grad))
    with torch.no_grad():
        assert not torch.allclose(block(x), results[0][0], rtol=0, atol=1e-5)  # autocast did run in bf16
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-3)


def _perturb(moe, scale=0.05):
    """Make the experts distinct (in place); returns the model."""
    with torch.no_grad():
        for stacks in xft.expert_weights(moe).values():
            for p in stacks.values():
                p.add_(torch.randn_like(p) * scale)
    return moe
