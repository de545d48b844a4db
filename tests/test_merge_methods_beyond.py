"""Beyond the paper: task arithmetic and TIES equal their formulas (a reference written per element, here),
every merge of an untrained upcycle is the dense model, options are checked; distillation after a merge
lowers the KL to the MoE teacher on held-out instruction data.
"""

import copy
import json
import math
import random
import shutil
from fractions import Fraction

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import xft
from xft.cli import main as cli
from xft.config import ConfigError, DataConfig, MergeConfig, SFTConfig
from xft.data import MAGICODER_SYSTEM, Collator, load_dataset
from xft.errors import UserError
from xft.ffn import decoder_layers, find_ffn
from xft.merge import MERGE_METHODS, MergeInput
from xft.merge_methods import TIES_DENSITY, TIES_SCALE
from xft.testing import tiny_model, tiny_tokenizer
from xft.training import learn_merge, train_sft
from xft.training.distill import distill_loss

TENSOR_METHODS = ("task_arithmetic", "ties")


# ---------------------------------------------------------------- the reference, one element at a time

def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def reference(method: str, stack: torch.Tensor, shared: bool, **options) -> torch.Tensor:
    """`method`'s merge of one expert stack [N, *shape], element by element in exact rational arithmetic."""
    experts = [[Fraction(v) for v in w.flatten().tolist()] for w in stack]
    n = len(experts[0])
    base = experts[0] if shared else [sum(e[j] for e in experts) / len(experts) for j in range(n)]
    deltas = [[e[j] - base[j] for j in range(n)] for e in (experts[1:] if shared else experts)]
    if method == "task_arithmetic":
        scale = Fraction(options.get("scale", Fraction(1, len(deltas))))
        out = [base[j] + scale * sum(d[j] for d in deltas) for j in range(n)]
    else:
        density, scale = options.get("density", TIES_DENSITY), Fraction(options.get("scale", TIES_SCALE))
        k = max(1, round(density * n))
        trimmed = []
        for d in deltas:  # keep the k largest magnitudes; equal ones: the lower index first
            kept = set(sorted(range(n), key=lambda j: (-abs(d[j]), j))[:k])
            trimmed.append([d[j] if j in kept else 0 for j in range(n)])
        out = []
        for j in range(n):
            elected = _sign(sum(t[j] for t in trimmed))
            agreeing = [t[j] for t in trimmed if t[j] != 0 and _sign(t[j]) == elected]
            out.append(base[j] + scale * (sum(agreeing) / len(agreeing) if agreeing else 0))
    return torch.tensor([float(v) for v in out], dtype=torch.float64).view(stack.shape[1:])


def _layer(stacks: dict, shared: bool = True, **options) -> MergeInput:
    n = next(iter(stacks.values())).shape[0]
    routing = dict(routing="xft", top_k=min(3, n)) if shared else dict(routing="sparse", top_k=2)
    return MergeInput(stacks, xft.UpcycleConfig(num_experts=n, **routing), 0.75, None, options)


# A shared expert B and three routed deltas τ_i (N = 4), 6 entries each. Density 1/2 keeps k = 3 per delta:
# τ1 has three |1| for one place (the lowest index, 1, wins), τ3 three |2| for two (indices 2 and 3).
BASE = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
DELTAS = [[2.0, -1.0, 1.0, -1.0, 0.5, 3.0],     # kept: 5, 0, 1  -> [2, -1, 0, 0, 0, 3]
          [-3.0, 1.0, 0.5, 2.0, -2.0, -0.5],    # kept: 0, 3, 4  -> [-3, 0, 0, 2, -2, 0]
          [-2.5, 1.0, -2.0, -2.0, 2.0, 0.5]]    # kept: 0, 2, 3  -> [-2.5, 0, -2, -2, 0, 0]
# Per entry: elected sign of the sum, mean of the agreeing kept deltas. Entry 0: sum -3.5, two of three agree
# (-3, -2.5); entry 3: 2 and -2 cancel, no sign is elected and none agrees -> 0.
TIES_MERGED = [-2.75, -1.0, -2.0, 0.0, -2.0, 3.0]


def _hand_made_stack() -> torch.Tensor:
    base = torch.tensor(BASE)
    return torch.stack([base] + [base + torch.tensor(d) for d in DELTAS]).view(4, 2, 3)  # [N, 2, 3]


def test_ties_on_a_hand_made_layer():
    """Trim (with its ties), sign election, disjoint mean and the none-agree case, by hand."""
    stack = _hand_made_stack()
    for scale in (None, 0.5):
        options = {"density": 0.5} | ({} if scale is None else {"scale": scale})
        want = torch.tensor(BASE) + (1.0 if scale is None else scale) * torch.tensor(TIES_MERGED)
        got = MERGE_METHODS["ties"](_layer({"w": stack}, **options))["w"]
        torch.testing.assert_close(got, want.view(2, 3), rtol=0, atol=1e-6)
        torch.testing.assert_close(reference("ties", stack, True, **options), want.view(2, 3).double())


def test_task_arithmetic_on_a_hand_made_layer():
    stack = _hand_made_stack()
    total = [sum(d[j] for d in DELTAS) for j in range(6)]
    for options, alpha in (({}, 1 / 3), ({"scale": 0.5}, 0.5), ({"scale": -1.0}, -1.0)):
        got = MERGE_METHODS["task_arithmetic"](_layer({"w": stack}, **options))["w"]
        want = torch.tensor([b + alpha * t for b, t in zip(BASE, total)]).view(2, 3)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # The default scale 1/(N-1) is the routed experts' mean.
    torch.testing.assert_close(MERGE_METHODS["task_arithmetic"](_layer({"w": stack}))["w"], stack[1:].mean(0))


OPTION_CASES = [("task_arithmetic", {}), ("task_arithmetic", {"scale": 0.7}), ("ties", {}), ("ties", {"scale": 0.7}),
                ("ties", {"density": 0.35}), ("ties", {"density": 0.9, "scale": 1.5}), ("ties", {"density": 1.0})]


@pytest.mark.parametrize("method,options", OPTION_CASES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "sparse"])
def test_tensor_methods_equal_their_formulas_on_random_layers(method, options, shared):
    """Also without a shared expert, where deltas to the mean cancel wherever no delta is trimmed."""
    torch.manual_seed(1)
    stacks = {"w": torch.randn(5, 6, 7), "b": torch.randn(5, 7)}  # 5 experts; a matrix and a bias
    merged = MERGE_METHODS[method](_layer(stacks, shared, **options))
    for name, s in stacks.items():
        assert merged[name].dtype == s.dtype and merged[name].shape == s.shape[1:]
        torch.testing.assert_close(merged[name].double(), reference(method, s, shared, **options),
                                   rtol=0, atol=1e-5)
        if method == "task_arithmetic" and not shared:  # deltas to the mean sum to 0: any scale is the mean
            torch.testing.assert_close(merged[name], s.mean(0), rtol=0, atol=1e-6)


def test_tensor_methods_keep_the_stacks_dtype_and_leave_them_untouched():
    stacks = {"w": torch.randn(4, 8, 3).to(torch.bfloat16)}
    before = stacks["w"].clone()
    for method in TENSOR_METHODS:
        out = MERGE_METHODS[method](_layer(stacks))["w"]
        assert out.dtype == torch.bfloat16 and torch.equal(stacks["w"], before)


# ---------------------------------------------------------------- whole models

def _perturbed_moe(dense, **cfg):
    """`dense` upcycled (a copy) with every expert moved off the dense FFN, so merges differ."""
    moe = xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig(**cfg))
    with torch.no_grad():
        for stacks in xft.expert_weights(moe).values():
            for p in stacks.values():
                p.add_(torch.randn_like(p) * 0.1)
    return moe


def _ffn_params(model, layer):
    return dict(find_ffn(decoder_layers(model)[layer])[1].named_parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gated SiLU FFN; plain GELU MLP with biases (Conv1D)
@pytest.mark.parametrize("method,options", [("task_arithmetic", {"scale": 0.4}), ("ties", {}),
                                            ("ties", {"density": 0.5, "scale": 0.8})])
def test_models_merge_by_the_formula_into_the_original_class(arch, method, options, tmp_path):
    dense = tiny_model(arch, hidden=16, intermediate=24)  # small FFNs: the reference is exact and slow
    moe = _perturbed_moe(dense, num_experts=4, top_k=3)
    merged = xft.merge(moe, method, **options)
    assert type(merged) is type(dense) and not hasattr(merged.config, "xft")
    assert merged.config.to_dict() == dense.config.to_dict()
    for i, stacks in xft.expert_weights(moe).items():
        got = _ffn_params(merged, i)
        assert set(got) == set(stacks)
        for name, s in stacks.items():
            torch.testing.assert_close(got[name].double(), reference(method, s.detach(), True, **options),
                                       rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 300, (2, 9))
    assert type(loaded) is type(dense)
    for (name, got), want in zip(loaded.named_parameters(), merged.parameters()):
        assert torch.equal(got, want), name
    with torch.no_grad():  # (loaded with the default attention kernel, sdpa; the tiny model uses eager)
        torch.testing.assert_close(loaded(ids).logits, merged(ids).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_merge_of_an_untrained_upcycle_is_the_dense_model(arch):
    """Identical experts: the tensor-level methods return the dense weights exactly; the coefficient ones
    up to the fp32 rounding of Σ c_n = 1."""
    dense = tiny_model(arch, hidden=16, intermediate=24)
    moe = xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig(num_experts=4, top_k=3))
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        want = dense(ids).logits
    for method, m in MERGE_METHODS.items():
        logits = {i: torch.randn(3) * 3 for i in range(2)} if method == "learned" else None
        merged = xft.merge(moe, method, mixing_logits=logits)
        exact = m.coefficients_fn is None
        for (name, got), ref in zip(merged.named_parameters(), dense.parameters()):
            if exact:
                assert torch.equal(got, ref), (method, name)
            else:
                torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, want, **({"rtol": 0, "atol": 0} if exact else {}))


def test_bad_options_are_errors_naming_method_option_and_choices(capsys):
    moe = xft.upcycle(tiny_model("llama"), xft.UpcycleConfig(num_experts=4, top_k=3))
    with pytest.raises(ValueError, match=r"'ties' has no option 'densty'; it takes: density, scale"):
        xft.merge(moe, "ties", densty=0.5)
    with pytest.raises(ValueError, match=r"'init' has no option 'scale'; it takes: none"):
        xft.merge(moe, "init", scale=2.0)
    with pytest.raises(ValueError, match=r"'task_arithmetic' has no option 'density'; it takes: scale"):
        xft.merge(moe, "task_arithmetic", density=0.5)
    for bad in (0, 1.5, -0.1, math.nan, "0.2", True, None):
        with pytest.raises(ValueError, match=r"'ties': option density=.* must be a fraction in \(0, 1\]"):
            xft.merge(moe, "ties", density=bad)
    for bad in (math.inf, "1", False):
        with pytest.raises(ValueError, match=r"option scale=.* must be a finite number"):
            xft.merge(moe, "task_arithmetic", scale=bad)
    # The config (so `xft merge` and recipes) names its settings, before anything loads.
    with pytest.raises(ConfigError, match=r"'uniform' has no option 'merge_density'; it takes: none"):
        MergeConfig(moe="m", out="o", method="uniform", merge_density=0.5)
    with pytest.raises(ConfigError, match=r"merge_density=2.0 must be a fraction"):
        MergeConfig(moe="m", out="o", method="ties", merge_density=2.0)
    with pytest.raises(ConfigError, match="pass --data"):
        MergeConfig(moe="m", out="o", method="ties", distill_steps=3)
    assert cli(["merge", "no-such-moe", "--out", "o", "--method", "init", "--merge-scale", "0.5"]) == 2
    assert "'init' has no option 'merge_scale'" in capsys.readouterr().err
    assert cli(["merge", "no-such-moe", "--out", "o", "--method", "ties", "--distill-temperature", "0"]) == 2
    assert "distill temperature must be positive" in capsys.readouterr().err


# ---------------------------------------------------------------- distillation

def test_distill_loss_is_the_token_mean_kl_on_response_tokens():
    torch.manual_seed(2)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 4, 5, 6], [-100, 3, 2, -100, -100]])
    for temp in (1.0, 2.0):
        terms = []
        for b in range(2):
            for pos in range(4):  # logits at pos predict labels[pos + 1]
                if labels[b, pos + 1] == -100:
                    continue
                p, q = (t[b, pos] / temp).softmax(-1), (s[b, pos] / temp).softmax(-1)
                terms.append(sum(float(p[v] * (p[v].log() - q[v].log())) for v in range(11)))
        want = temp ** 2 * sum(terms) / len(terms)
        assert distill_loss(s, t, labels, temp).item() == pytest.approx(want, rel=1e-5)
        assert distill_loss(s, t, labels, temp, num_items=10).item() == pytest.approx(want * len(terms) / 10,
                                                                                   rel=1e-5)
    assert distill_loss(t, t, labels).item() == pytest.approx(0.0, abs=1e-6)


def _rows(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": f"add {a} and {b}", "response": f"return {a}+{b}"}
            for a, b in ((rng.randint(0, 9), rng.randint(0, 9)) for _ in range(n))]


def _kl_to_teacher(student, teacher, batch) -> float:
    """Token-mean KL(teacher ‖ student) over the response tokens of `batch`, computed directly."""
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        log_q, log_p = (m(**inputs).logits[:, :-1].log_softmax(-1) for m in (student.eval(), teacher.eval()))
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [B, T-1]
    return kl[batch["labels"][:, 1:] != -100].mean().item()


FAST = dict(batch_size=8, warmup_steps=0, save_steps=1000, logging_steps=1, progress=False)


def _trained_moe(root) -> tuple[str, object]:
    """In `root`: train.jsonl and heldout.jsonl (instruction data) and an MoE — experts moved apart, then a few
    SFT steps; returns (its directory, its tokenizer)."""
    train, heldout = _rows(0, 64), _rows(1, 24)
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = tiny_tokenizer([f"{MAGICODER_SYSTEM}\n\n@@ Instruction\n{r['instruction']}\n\n@@ Response\n"
                          f"{r['response']}" for r in train])
    moe = _perturbed_moe(tiny_model("llama"), num_experts=4, top_k=3)
    moe.save_pretrained(root / "upcycled")
    tok.save_pretrained(root / "upcycled")
    return train_sft(SFTConfig(model=str(root / "upcycled"), data=str(root / "train.jsonl"), out=str(root / "moe"),
                               max_steps=2, lr=1e-2, **FAST)), tok


def test_distillation_after_a_merge_lowers_the_kl_to_the_teacher(tmp_path):
    moe_dir, tok = _trained_moe(tmp_path)

    out = tmp_path / "distilled"
    steps = 4
    assert cli(["merge", moe_dir, "--method", "ties", "--merge-density", "0.5", "--distill-steps", str(steps),
                "--distill-lr", "3e-3", "--data", str(tmp_path / "train.jsonl"), "--out", str(out),
                "--batch-size", "8", "--no-progress"]) == 0

    teacher = xft.load(moe_dir)
    ds, _ = load_dataset(DataConfig(path=str(tmp_path / "heldout.jsonl")), AutoTokenizer.from_pretrained(out))
    batch = Collator(tok.pad_token_id)(list(ds))
    before = _kl_to_teacher(xft.merge(teacher, "ties", density=0.5), teacher, batch)  # where distillation starts
    student = AutoModelForCausalLM.from_pretrained(out)
    after = _kl_to_teacher(student, teacher, batch)
    assert 0 < after < before, (before, after)
    print(f"KL(teacher ‖ student) on held-out data: merge {before:.4g}, after {steps} distillation steps {after:.4g}")
    assert type(student).__name__ == "LlamaForCausalLM" and "xft" not in student.config.to_dict()

    record = json.loads((out / "xft_training.json").read_text())["distillation"]
    assert record["teacher"] == moe_dir and record["steps"] == steps and record["kl_curve"]
    assert json.loads((out / "merge_coefficients.json").read_text())["distilled"]["steps"] == steps
    assert "Then distilled" in (out / "README.md").read_text()
    assert not (out / "distill").exists()  # its checkpoints and run file are gone once the model is in place


@pytest.mark.slow  # two merge + distillation runs
def test_learned_merge_then_distillation_resumes_where_it_stopped(tmp_path):
    """After a learned merge (the teacher is loaded again); the distillation's checkpoints are in OUT/distill."""
    moe_dir, _ = _trained_moe(tmp_path)
    out = tmp_path / "merged"
    cfg = dict(moe=moe_dir, data=str(tmp_path / "train.jsonl"), out=str(out), max_steps=2, lr=0.1,
               distill_steps=4, distill_lr=3e-3, keep_checkpoints=True, **{**FAST, "save_steps": 2})
    learn_merge(MergeConfig(**cfg))
    finished = load_file(out / "model.safetensors")
    assert sorted(p.name for p in (out / "distill").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # Interrupted after the distillation's checkpoint at step 2: the same config resumes it there.
    (out / "config.json").unlink()
    shutil.rmtree(out / "distill" / "checkpoint-4")
    learn_merge(MergeConfig(**cfg))
    record = json.loads((out / "xft_training.json").read_text())
    assert record["distillation"]["steps"] == 4
    assert record["distillation"]["resumed_from"] == str(out / "distill" / "checkpoint-2")
    assert [s for s, _ in record["distillation"]["kl_curve"]] == [1, 2, 3, 4]
    resumed = load_file(out / "model.safetensors")
    for name, w in finished.items():
        torch.testing.assert_close(resumed[name], w, rtol=0, atol=1e-6)
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"


def test_a_merge_recorded_before_these_settings_existed_is_still_the_same_command(tmp_path):
    """A run file without the new settings (written by an older xft) reads them as their defaults."""
    from xft.training import rundir

    cfg = MergeConfig(moe="m", out=str(tmp_path), method="init")
    old = {k: v for k, v in rundir.record_of(cfg, "merge").items()
           if not k.startswith(("distill_", "merge_scale", "merge_density"))}
    (tmp_path / rundir.RUN_FILE).write_text(json.dumps(old))
    (tmp_path / "config.json").write_text("{}")
    assert rundir.prepare(str(tmp_path), cfg, "merge").done
    with pytest.raises(UserError, match="distill_steps: 0 -> 5"):
        rundir.prepare(str(tmp_path), MergeConfig(moe="m", out=str(tmp_path), method="init", data="d.jsonl",
                                                  distill_steps=5), "merge")
