"""Upcycling inits (xft.inits): granular keeps the dense function and merges back to it; drop re-draws exactly
the requested neurons of each routed expert with the dense statistics and touches nothing else."""

import copy
import dataclasses
import math

import pytest
import torch

import xft
from xft.config import choices_of
from xft.ffn import decoder_layers, find_ffn
from xft.inits import INITS, join
from xft.merge import merge_inputs, merge_modules
from xft.testing import ARCHITECTURES, MORE_ARCHITECTURES, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _granular(dense, g=2, **cfg):
    return xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig(init="granular", granularity=g, **cfg))


def _with_random_biases(dense):
    """`dense` (in place) with random FFN biases: the tiny models start them at 0, which no init would change."""
    with torch.no_grad():
        for layer in decoder_layers(dense):
            for name, p in find_ffn(layer)[1].named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.1, 0.05)
    return dense


def _perturb(moe, scale=0.05):
    with torch.no_grad():
        for stacks in xft.expert_weights(moe).values():
            for p in stacks.values():
                p.add_(torch.randn_like(p) * scale)
    return moe


# ----------------------------------------------------------------------------- granular

@pytest.mark.parametrize("arch", ARCHITECTURES + MORE_ARCHITECTURES)
def test_granular_upcycle_computes_the_dense_model(arch):
    dense = _with_random_biases(tiny_model(arch))
    ids = torch.randint(0, 300, (2, 11))
    ref = _logits(dense, ids)
    for routing, g in (("xft", 2), ("sparse", 4)):
        moe = _granular(dense, g, routing=routing)
        torch.testing.assert_close(_logits(moe, ids), ref, rtol=0, atol=1e-5, msg=f"{routing}, G={g}")


def test_granular_unnormalized_routing_keeps_its_scale_mismatch():
    dense = tiny_model("llama")
    ids = torch.randint(0, 300, (2, 11))
    assert (_logits(_granular(dense, routing="unnormalized"), ids) - _logits(dense, ids)).abs().max() > 1e-4


def test_granular_shapes_router_groups_and_weight_scaling():
    g, dense = 4, tiny_model("llama")  # N=8, K=6: R=7 routed experts, k=5
    copy_block = xft.moe_blocks(xft.upcycle(copy.deepcopy(dense)))[0]
    block = xft.moe_blocks(_granular(dense, g))[0]
    assert block.config.num_routed == 7 * g and block.k == 5 * g and block.num_shared == g
    stacks = block.expert_parameters()
    assert stacks["gate_proj.weight"].shape == (8 * g, 64 // g, 32)
    assert stacks["down_proj.weight"].shape == (8 * g, 32, 64 // g)
    dense_gate = find_ffn(decoder_layers(dense)[0])[1].gate_proj.weight
    for e in range(8):  # stacked expert e·G + j: neurons [j·I/G, (j+1)·I/G) of expert e
        for j in range(g):
            assert torch.equal(stacks["gate_proj.weight"][e * g + j], dense_gate[j * 16:(j + 1) * 16])
    x = torch.randn(13, 32)
    with torch.no_grad():
        logits = block.gate(x)[0]  # [T, R·G]
        want = copy_block.gate(x)[0].repeat_interleave(g, 1)  # the copy init's router, each logit G times
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-6)
        groups = logits.unflatten(1, (7, g))
        assert torch.equal(groups, groups[..., :1].expand_as(groups))  # tied within a group, bit for bit
        weights, top_i = block.routing.combine(logits, block.k)
    selected = torch.zeros(13, 7 * g, dtype=torch.bool).scatter(1, top_i, True).unflatten(1, (7, g))
    assert (selected.all(-1) | ~selected.any(-1)).all()  # whole groups
    # Weight scaling: the shards' weights times G sum to 1 with the shared expert's.
    per_expert = xft.inits.stack_weights(weights, 1, g)
    assert per_expert.shape == (13, 8 * g)
    torch.testing.assert_close(per_expert[:, :g].mean(1) + per_expert[:, g:].sum(1) / g, torch.ones(13))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "bloom"])
def test_untrained_granular_moe_merges_back_to_the_dense_weights(arch):
    dense = _with_random_biases(tiny_model(arch))
    moe = _granular(dense, 4)
    ref = dict(dense.named_parameters())
    merges = [xft.merge(moe), xft.merge(moe, method="uniform"), xft.average_experts(moe),
              xft.merge(moe, shared_weight=0.3, mixing_logits={i: torch.randn(7) * 3 for i in range(2)}),
              xft.compile_merge(xft.build_merge_model(copy.deepcopy(moe)))]
    for merged in merges:
        got = dict(merged.named_parameters())
        assert set(got) == set(ref) and type(merged) is type(dense)
        assert merged.config.to_dict() == dense.config.to_dict()
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-6, msg=name)
    # The joined experts themselves are the dense FFN: weights bit for bit, output biases up to rounding.
    layer = merge_inputs(moe)[0]
    assert layer.config.num_routed == 7 and layer.num_experts == 8
    for name, p in find_ffn(decoder_layers(dense)[0])[1].named_parameters():
        assert layer.stacks[name].shape == (8, *p.shape)
        torch.testing.assert_close(layer.stacks[name], p.expand_as(layer.stacks[name]), rtol=0,
                                   atol=0 if name.endswith("weight") else 1e-7)


def test_trained_granular_merge_is_per_shard_then_concatenated():
    g, moe = 2, _perturb(_granular(_with_random_biases(tiny_model("gpt2")), 2))
    logits = {i: torch.randn(7) for i in range(2)}
    merged = xft.merge(moe, shared_weight=0.6, mixing_logits=logits)
    for i, stacks in xft.expert_weights(moe).items():
        c = torch.cat([torch.tensor([0.6]), 0.4 * logits[i].softmax(-1)])  # over the 8 original experts
        ffn = dict(find_ffn(decoder_layers(merged)[i])[1].named_parameters())
        s = {name: st.detach().unflatten(0, (8, g)) for name, st in stacks.items()}  # [N, G, *shard]
        shard = {name: [sum(c[e] * s[name][e, j] for e in range(8)) for j in range(g)] for name in s}
        # Conv1D: c_fc [d, I] holds neurons in its columns, c_proj [I, d] in its rows; c_proj.bias has none.
        torch.testing.assert_close(ffn["c_fc.weight"], torch.cat(shard["c_fc.weight"], 1), rtol=0, atol=1e-6)
        torch.testing.assert_close(ffn["c_fc.bias"], torch.cat(shard["c_fc.bias"], 0), rtol=0, atol=1e-6)
        torch.testing.assert_close(ffn["c_proj.weight"], torch.cat(shard["c_proj.weight"], 0), rtol=0, atol=1e-6)
        torch.testing.assert_close(ffn["c_proj.bias"], sum(shard["c_proj.bias"]), rtol=0, atol=1e-6)
    # The learnable merge sees the same joined experts: merge model == compiled == xft.merge.
    merge_model = xft.build_merge_model(copy.deepcopy(moe), shared_weight=0.6)
    with torch.no_grad():
        for i, m in merge_modules(merge_model).items():
            m.mixing_logits.copy_(logits[i])
    ids = torch.randint(0, 300, (2, 9))
    torch.testing.assert_close(_logits(merge_model, ids), _logits(merged, ids), rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(xft.compile_merge(merge_model), ids), _logits(merged, ids), rtol=0, atol=1e-5)


def test_granular_kernels_agree_and_training_reaches_every_shard():
    moe = _perturb(_granular(tiny_model("llama"), 2, noisy_gating=False, expert_impl="fast"))
    ids = torch.randint(0, 300, (2, 9))
    ref = _logits(moe, ids)
    for impl in ("grouped_mm", "generic"):
        other = copy.deepcopy(moe)
        for block in xft.moe_blocks(other).values():
            block.expert_impl = impl
        torch.testing.assert_close(_logits(other, ids), ref, rtol=0, atol=1e-5, msg=impl)
    moe.train()(ids, labels=ids).loss.backward()
    stats = xft.routing_stats(moe)
    assert stats[0]["load"].shape == (14,) and stats[0]["load"].sum() == 18 * 10  # T tokens × k·G shards
    for stacks in xft.expert_weights(moe).values():
        for stack in stacks.values():
            assert stack.grad.shape == stack.shape and (stack.grad[:2].flatten(1).abs().sum(1) > 0).all()


def test_ewa_on_granular_shards_is_ewa_on_the_whole_experts():
    moe = _perturb(_granular(tiny_model("gpt2"), 2))
    whole = {n: join(s.detach(), xft.moe_blocks(moe)[0].layout.axes[n], 2).clone()
             for n, s in xft.expert_weights(moe)[0].items()}
    xft.ewa_step(moe, 0.25)
    for name, stack in xft.expert_weights(moe)[0].items():
        want = 0.75 * whole[name] + 0.25 * whole[name].mean(0, keepdim=True)
        torch.testing.assert_close(join(stack.detach(), xft.moe_blocks(moe)[0].layout.axes[name], 2), want)


# ----------------------------------------------------------------------------- drop

def _neurons(stack, axis):
    """A stack [N, *shape] as [N, blocks, I, ...]: fused block, then neuron, then the other dimensions."""
    return stack.unflatten(axis.dim + 1, (axis.blocks, -1)).movedim((axis.dim + 1, axis.dim + 2), (1, 2))


def _neuron_changes(stack, dense_param, axis):
    """Per expert, the neurons any of whose entries differ from the dense parameter: [N, I] bool."""
    return _neurons(stack != dense_param, axis).transpose(1, 2).flatten(2).any(2)


@pytest.mark.parametrize("arch,routing", [("llama", "xft"), ("gpt2", "xft"), ("phi3", "xft"), ("llama", "sparse")])
def test_drop_redraws_exactly_the_requested_neurons(arch, routing):
    dense = _with_random_biases(tiny_model(arch))
    rate, moe = 0.3, xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig(init="drop", drop_rate=0.3, routing=routing))
    reference = xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig(routing=routing))  # the copy init
    first = 1 if routing == "xft" else 0  # sparse: every expert is routed, so every expert is dropped
    for i, block in xft.moe_blocks(moe).items():
        size, axes = block.layout.size, block.layout.axes
        dense_ffn = dict(find_ffn(decoder_layers(dense)[i])[1].named_parameters())
        chosen = None
        for name, stack in block.expert_parameters().items():
            if axes[name] is None:  # no neurons (the output bias): untouched
                assert torch.equal(stack, dense_ffn[name].expand_as(stack)), name
                continue
            changed = _neuron_changes(stack, dense_ffn[name], axes[name])  # [N, I]
            chosen = changed if chosen is None else chosen
            assert torch.equal(changed, chosen), name  # the same neurons in every parameter of an expert
            _assert_dense_statistics(stack[first:], dense_ffn[name], axes[name], changed[first:])
        assert not chosen[:first].any()  # the shared expert is exact
        assert (chosen[first:].sum(1) == round(rate * size)).all()
        assert len({tuple(c.nonzero().flatten().tolist()) for c in chosen[first:]}) > 1  # chosen per expert
    # Everything but the experts' stacks (router, attention, embeddings, ...) is the copy init's, bit for bit.
    want = {n: p for n, p in reference.named_parameters() if ".experts." not in n}
    got = {n: p for n, p in moe.named_parameters() if ".experts." not in n}
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


def _assert_dense_statistics(stacks, dense_param, axis, changed):
    """The re-drawn entries of each fused block have the dense block's mean and std, within 5 standard errors."""
    new = _neurons(stacks, axis)  # [N, blocks, I, ...]
    old = _neurons(dense_param[None], axis)[0]  # [blocks, I, ...]
    for b in range(axis.blocks):
        sample = new[:, b][changed].flatten()  # the entries of the re-drawn neurons, all routed experts
        mu, sigma, n = old[b].mean().item(), old[b].std(correction=0).item(), sample.numel()
        assert abs(sample.mean().item() - mu) <= 5 * sigma / math.sqrt(n) + 1e-7
        assert abs(sample.std().item() - sigma) <= 5 * sigma / math.sqrt(2 * n) + 1e-7


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_drop_rate_ends(rate):
    dense = tiny_model("llama")
    moe = xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig(init="drop", drop_rate=rate))
    copied = xft.upcycle(copy.deepcopy(dense))
    for stacks, want in zip(xft.expert_weights(moe).values(), xft.expert_weights(copied).values()):
        for name, stack in stacks.items():
            assert torch.equal(stack[0], want[name][0])  # the shared expert
            assert torch.equal(stack, want[name]) == (rate == 0.0)
            if rate == 1.0:  # every neuron of every routed expert re-drawn
                assert (stack[1:] != want[name][1:]).all()


def test_drop_is_seeded_and_leaves_the_global_rng_alone():
    dense = tiny_model("llama")
    before = torch.get_rng_state()
    a, b, c = (xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig(init="drop", seed=s)) for s in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), before)
    wa, wb, wc = (xft.expert_weights(m)[0]["up_proj.weight"] for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert xft.upcycle_config(a).drop_rate == 0.5  # the paper's default rate
    layers = xft.expert_weights(a)
    assert not torch.equal(layers[0]["up_proj.weight"][1] != layers[0]["up_proj.weight"][0],
                           layers[1]["up_proj.weight"][1] != layers[1]["up_proj.weight"][0])  # per layer


# ----------------------------------------------------------------------------- checkpoints, config

@pytest.mark.parametrize("cfg", [dict(init="granular", granularity=2), dict(init="drop", drop_rate=0.25)])
def test_save_and_load_round_trip(tmp_path, cfg):
    import json

    from xft.checkpoint import skeleton

    moe = _perturb(xft.upcycle(tiny_model("gpt2"), xft.UpcycleConfig(num_experts=4, top_k=3, **cfg)))
    moe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["xft"]
    assert {k: saved[k] for k in ("init", "drop_rate", "granularity")} == {
        "init": cfg["init"], "drop_rate": cfg.get("drop_rate"), "granularity": cfg.get("granularity")}
    loaded = xft.load(str(tmp_path))
    assert xft.upcycle_config(loaded) == xft.upcycle_config(moe)
    assert all(torch.equal(loaded.state_dict()[n], p) for n, p in moe.state_dict().items())
    ids = torch.randint(0, 300, (2, 9))  # (the loaded model may run another attention kernel: not bit for bit)
    torch.testing.assert_close(_logits(loaded, ids), _logits(moe.eval(), ids), rtol=0, atol=1e-6)
    shapes = {n: p.shape for n, p in skeleton(str(tmp_path)).named_parameters()}
    assert shapes == {n: p.shape for n, p in moe.named_parameters()}


def test_cli_upcycles_granular(tmp_path, capsys):
    from xft.cli import main
    from xft.testing import tiny_tokenizer

    dense = tiny_model("llama")
    dense.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    assert main(["upcycle", str(tmp_path / "base"), "--out", str(tmp_path / "moe"), "--num-experts", "4",
                 "--top-k", "2", "--init", "granular", "--granularity", "2"]) == 0
    moe = xft.load(str(tmp_path / "moe"))
    assert xft.upcycle_config(moe).granularity == 2 and xft.moe_blocks(moe)[0].k == 2
    ids = torch.randint(0, 300, (1, 7))
    torch.testing.assert_close(_logits(moe, ids), _logits(dense, ids), rtol=0, atol=1e-5)


def test_init_choices_are_the_registry():
    field = next(f for f in dataclasses.fields(xft.UpcycleConfig) if f.name == "init")
    assert choices_of(field) == tuple(INITS) == ("copy", "drop", "granular")
    assert all(i.name == n and i.help and "\n" not in i.help for n, i in INITS.items())


@pytest.mark.parametrize("kwargs,message", [
    (dict(init="nope"), "init='nope'; expected one of copy, drop, granular"),
    (dict(drop_rate=0.5), r"drop_rate=0.5 applies only to init='drop' \(init='copy'\)"),
    (dict(init="granular", granularity=2, drop_rate=0.1), "drop_rate=0.1 applies only to init='drop'"),
    (dict(init="drop", drop_rate=1.5), r"drop_rate=1.5; must be a fraction in \[0, 1\]"),
    (dict(init="drop", drop_rate=-0.1), r"drop_rate=-0.1; must be a fraction in \[0, 1\]"),
    (dict(init="drop", drop_rate="half"), "drop_rate='half'"),
    (dict(granularity=2), "granularity=2 applies only to init='granular'"),
    (dict(init="drop", granularity=2), "granularity=2 applies only to init='granular'"),
    (dict(init="granular"), "init='granular' needs granularity=G, an integer >= 1 \\(got None\\)"),
    (dict(init="granular", granularity=0), "needs granularity=G, an integer >= 1 \\(got 0\\)"),
    (dict(init="granular", granularity=2.0), "needs granularity=G, an integer >= 1 \\(got 2.0\\)"),
])
def test_bad_init_configs_are_rejected_readably(kwargs, message):
    with pytest.raises(xft.ConfigError, match=message):
        xft.UpcycleConfig(**kwargs)


def test_granularity_must_divide_the_intermediate_size():
    with pytest.raises(xft.ConfigError, match="granularity=3 does not divide the intermediate size 64 of LlamaMLP"):
        xft.upcycle(tiny_model("llama"), xft.UpcycleConfig(init="granular", granularity=3))
    moe = xft.upcycle(tiny_model("llama"), xft.UpcycleConfig(init="granular", granularity=1))  # G=1: the copy init
    assert xft.expert_weights(moe)[0]["up_proj.weight"].shape == (8, 64, 32)
