"""Merging invariants: the formula of docs/method.md §3, learnable == compiled, untrained merge == dense."""

import copy
import subprocess
import sys

import pytest
import torch

import xft
from xft.ffn import decoder_layers, find_ffn
from xft.merge import MERGE_METHODS, merge_inputs, merge_modules, register_merge_method
from xft.testing import tiny_model


def _perturb(moe):
    """`moe` with every expert moved off its copy of the dense FFN (in place), so merges differ."""
    with torch.no_grad():
        for stacks in xft.expert_weights(moe).values():
            for p in stacks.values():
                p.add_(torch.randn_like(p) * 0.1)
    return moe


def _perturbed_moe(arch="llama", **cfg):
    return _perturb(xft.upcycle(tiny_model(arch), xft.UpcycleConfig(**cfg)))


def _ffn_params(dense, layer):
    return dict(find_ffn(decoder_layers(dense)[layer])[1].named_parameters())


def _hand_merged(dense, weights):
    """A copy of the dense model with FFN weights {layer: {name: tensor}} set by hand."""
    dense = copy.deepcopy(dense)
    with torch.no_grad():
        for i, named in weights.items():
            params = _ffn_params(dense, i)
            assert set(params) == set(named)
            for name, w in named.items():
                params[name].copy_(w)
    return dense


@pytest.fixture
def registry():
    """MERGE_METHODS, restored after the test (for methods registered at runtime)."""
    saved = dict(MERGE_METHODS)
    yield MERGE_METHODS
    MERGE_METHODS.clear()
    MERGE_METHODS.update(saved)


@pytest.mark.parametrize("method", sorted(n for n, m in MERGE_METHODS.items() if m.coefficients_fn))
def test_every_method_computes_its_formula(method):
    """Merged FFN parameters are Σ_e c_e W_e, and the merged model's logits are a hand-merged dense model's.

    (Every coefficient method; the tensor-level ones are checked in test_merge_methods_beyond.py.)"""
    dense = tiny_model("llama")
    moe = _perturb(xft.upcycle(copy.deepcopy(dense)))
    logits = {i: torch.randn(7) for i in range(2)} if method == "learned" else None
    merged = xft.merge(moe, shared_weight=0.6, mixing_logits=logits, method=method)
    want = {}
    for i, layer in merge_inputs(moe, 0.6, logits).items():
        c = MERGE_METHODS[method].coefficients(layer)
        assert c.shape == (8,) and float(c.sum()) == pytest.approx(1.0)
        want[i] = {name: sum(c[e] * s[e] for e in range(8)) for name, s in layer.stacks.items()}
        for name, w in _ffn_params(merged, i).items():
            torch.testing.assert_close(w, want[i][name], rtol=0, atol=1e-6)
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, _hand_merged(dense, want)(ids).logits, rtol=0, atol=1e-5)


def test_registry_describes_every_method():
    assert {"learned", "init", "uniform"} <= set(MERGE_METHODS)
    for name, m in MERGE_METHODS.items():
        assert m.name == name and m.help and "\n" not in m.help
    assert [n for n, m in MERGE_METHODS.items() if m.learns] == ["learned"]
    # The CLI reads the names and help without torch.
    code = "import sys, xft.merge_methods as m; print(sorted(m.MERGE_METHODS), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "False"


def test_tensor_level_methods_registered_at_runtime(registry):
    @register_merge_method("median", "per-parameter elementwise median of the experts")
    def median(layer):
        return {name: s.median(0).values for name, s in layer.stacks.items()}

    @register_merge_method("shared_only", "keep the shared expert only")
    def shared_only(layer):
        assert layer.shared_expert
        return {name: s[0] for name, s in layer.stacks.items()}

    dense = tiny_model("llama")
    moe = _perturb(xft.upcycle(copy.deepcopy(dense)))
    stacks = xft.expert_weights(moe)
    ids = torch.randint(0, 300, (2, 10))
    for name, pick in (("median", lambda s: s.median(0).values), ("shared_only", lambda s: s[0])):
        assert MERGE_METHODS[name].coefficients(merge_inputs(moe)[0]) is None
        merged = xft.merge(moe, method=name)
        want = {i: {n: pick(s.detach()) for n, s in st.items()} for i, st in stacks.items()}
        for i in stacks:
            for n, w in _ffn_params(merged, i).items():
                assert torch.equal(w, want[i][n])
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, _hand_merged(dense, want)(ids).logits, rtol=0, atol=0)
    # The merged model owns its weights: "shared_only" returned views of the MoE's stacks.
    with torch.no_grad():
        _ffn_params(merged, 0)["down_proj.weight"].zero_()
    assert stacks[0]["down_proj.weight"][0].abs().sum() > 0
    with pytest.raises(ValueError, match="already registered"):
        register_merge_method("median", "again")(median)


def test_a_method_must_return_every_ffn_weight_in_its_shape(registry):
    moe = _perturbed_moe()
    register_merge_method("drops", "forgets a weight")(
        lambda layer: {"down_proj.weight": layer.stacks["down_proj.weight"][0]})
    register_merge_method("stacked", "returns the stacks")(lambda layer: dict(layer.stacks))
    with pytest.raises(ValueError, match="returned weights"):
        xft.merge(moe, method="drops")
    with pytest.raises(ValueError, match="of shape"):
        xft.merge(moe, method="stacked")


def test_a_coefficient_method_registered_at_runtime(registry):
    @register_merge_method("last", "the last expert only", coefficients=True)
    def last(layer):
        return torch.nn.functional.one_hot(torch.tensor(layer.num_experts - 1), layer.num_experts).float()

    moe = _perturbed_moe()
    merged = xft.merge(moe, method="last")
    for i, stacks in xft.expert_weights(moe).items():
        for name, s in stacks.items():
            torch.testing.assert_close(_ffn_params(merged, i)[name], s[-1], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi"])
def test_merged_parameters_follow_the_formula(arch):
    moe = _perturbed_moe(arch)
    lam = 0.6
    logits = {i: torch.randn(7) for i in range(2)}
    dense = xft.merge(moe, shared_weight=lam, mixing_logits=logits)
    for i, stacks in xft.expert_weights(moe).items():
        a = logits[i].softmax(-1)
        merged = _ffn_params(dense, i)
        assert set(merged) == set(stacks)
        for name, s in stacks.items():
            want = lam * s[0] + (1 - lam) * sum(a[j] * s[1 + j] for j in range(7))
            torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-5)


def test_init_and_uniform_merges():
    moe = _perturbed_moe()
    init = xft.merge(moe)  # λ = 0.75, zeros -> each routed expert (1-λ)/(N-1)
    uniform = xft.merge(moe, method="uniform")
    for i, stacks in xft.expert_weights(moe).items():
        for name, s in stacks.items():
            torch.testing.assert_close(_ffn_params(init, i)[name], 0.75 * s[0] + 0.25 / 7 * s[1:].sum(0),
                                       rtol=0, atol=1e-6)
            torch.testing.assert_close(_ffn_params(uniform, i)[name], s.mean(0), rtol=0, atol=1e-6)
            torch.testing.assert_close(_ffn_params(xft.average_experts(moe), i)[name], s.mean(0))


def test_sparse_routing_merges_with_softmax_over_all_experts():
    moe = _perturbed_moe(routing="sparse", num_experts=4, top_k=2)
    logits = {i: torch.randn(4) for i in range(2)}
    dense = xft.merge(moe, mixing_logits=logits)
    s = xft.expert_weights(moe)[1]["down_proj.weight"]
    a = logits[1].softmax(-1)
    torch.testing.assert_close(_ffn_params(dense, 1)["down_proj.weight"],
                               sum(a[j] * s[j] for j in range(4)), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        xft.merge(moe, mixing_logits={i: torch.zeros(3) for i in range(2)})


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "starcoder2"])
def test_merging_an_untrained_upcycle_returns_the_dense_model(arch):
    dense = tiny_model(arch)
    moe = xft.upcycle(copy.deepcopy(dense))
    merged = xft.merge(moe, shared_weight=0.3, mixing_logits={i: torch.randn(7) * 3 for i in range(2)})
    ref = dict(dense.named_parameters())
    got = dict(merged.named_parameters())
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-6)
    assert type(merged) is type(dense) and not hasattr(merged.config, "xft")
    assert merged.config.to_dict() == dense.config.to_dict()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_learnable_merge_equals_compiled_merge(arch):
    moe = _perturbed_moe(arch)
    logits = {i: torch.randn(7) for i in range(2)}
    reference = xft.merge(moe, shared_weight=0.75, mixing_logits=logits)
    merge_model = xft.build_merge_model(copy.deepcopy(moe), shared_weight=0.75)
    with torch.no_grad():
        for i, m in merge_modules(merge_model).items():
            m.mixing_logits.copy_(logits[i])
    compiled = xft.compile_merge(merge_model)
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        a, b, c = merge_model(ids).logits, compiled(ids).logits, reference(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(b, c, rtol=0, atol=1e-5)
    coeffs = xft.merge_coefficients(merge_model)
    assert coeffs[0][0] == pytest.approx(0.75) and sum(coeffs[0]) == pytest.approx(1.0)


def test_only_mixing_logits_train_and_gradients_reach_them():
    merge_model = xft.build_merge_model(_perturbed_moe())
    trainable = [n for n, p in merge_model.named_parameters() if p.requires_grad]
    assert trainable == ["model.layers.0.mlp.mixing_logits", "model.layers.1.mlp.mixing_logits"]
    ids = torch.randint(0, 300, (2, 10))
    merge_model(ids, labels=ids).loss.backward()
    for m in merge_modules(merge_model).values():
        assert m.mixing_logits.grad is not None and m.mixing_logits.grad.abs().sum() > 0
        assert all(p.grad is None for p in m.experts.parameters())


def test_learnable_shared_weight():
    merge_model = xft.build_merge_model(_perturbed_moe(), shared_weight=0.75, learn_shared_weight=True)
    m = merge_modules(merge_model)[0]
    assert m.coefficients()[0].item() == pytest.approx(0.75)
    ids = torch.randint(0, 300, (2, 10))
    merge_model(ids, labels=ids).loss.backward()
    assert m.shared_logit.grad is not None
    with torch.no_grad():
        m.shared_logit.fill_(0.0)
    assert xft.merge_coefficients(merge_model)[0][0] == pytest.approx(0.5)


def test_merge_model_keeps_stacks_in_model_dtype():
    moe = xft.upcycle(tiny_model("llama").to(torch.bfloat16))
    merge_model = xft.build_merge_model(moe)
    m = merge_modules(merge_model)[0]
    assert all(p.dtype == torch.bfloat16 for p in m.experts.parameters())
    assert m.mixing_logits.dtype == torch.float32
    ids = torch.randint(0, 300, (1, 6))
    merge_model(ids, labels=ids).loss.backward()
    assert m.mixing_logits.grad.dtype == torch.float32


def test_bad_merge_arguments():
    moe = _perturbed_moe()
    with pytest.raises(ValueError, match="unknown merge method"):
        xft.merge(moe, method="nope")
    with pytest.raises(ValueError, match="shared_weight"):
        xft.merge(moe, shared_weight=1.5)
    with pytest.raises(ValueError, match="layers"):
        xft.merge(moe, mixing_logits={0: torch.zeros(7)})
    with pytest.raises(ValueError, match="no MoE blocks"):
        xft.merge(tiny_model("llama"))


def test_merge_stage_records_coefficients_only_for_coefficient_methods(registry):
    from xft.config import MergeConfig
    from xft.training.merging import coefficients_record, fixed_coefficients

    register_merge_method("median", "per-parameter elementwise median of the experts")(
        lambda layer: {name: s.median(0).values for name, s in layer.stacks.items()})
    moe = _perturbed_moe()
    init = fixed_coefficients(moe, "init", 0.75)
    assert set(init) == {0, 1} and init[0] == pytest.approx([0.75] + [0.25 / 7] * 7)
    assert fixed_coefficients(moe, "uniform", 0.75)[1] == pytest.approx([1 / 8] * 8)
    assert fixed_coefficients(moe, "median", 0.75) is None
    record = coefficients_record(MergeConfig(moe="m", out="o", method="init"), dict(moe.config.xft), None, None)
    assert record["coefficients"] is None
