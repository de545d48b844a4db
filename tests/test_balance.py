"""Load balancing beyond the paper (docs/method.md): `balance` (cv2, switch, aux_free) and `balance_scope`.

Each test checks one property: the settings are the registries' entries; every method and scope keeps
the upcycled model equal to the dense one; aux-free's bias changes which experts are selected, never
their weights, and moves toward balance, only in training; the Switch loss; the global scope over
gradient accumulation (what docs/method.md claims) and over two gloo processes (= one process on the
whole batch); checkpoints; a Trainer run; and (slow) Trainer runs on two processes against one.
"""

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import xft
from xft.config import ConfigError, SFTConfig, UpcycleConfig, choices_of
from xft.routing import BALANCE_SCOPES, BALANCES, ROUTINGS, switch_loss
from xft.testing import tiny_model

from test_train import FAST, make_workspace


def _moe(arch="llama", **kw):
    kw = {"num_experts": 5, "top_k": 3, "noisy_gating": False, **kw}
    return xft.upcycle(tiny_model(arch), UpcycleConfig(**kw))


def _lm_loss(logits, labels, window=None):
    """transformers' causal-LM loss: summed over the shifted labels, divided by `window` or their count."""
    target = labels[:, 1:].reshape(-1)
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target, reduction="sum")
    return ce / (window if window is not None else target.ne(-100).sum())


def _aux(model, ids, window=None):
    """The balance-loss part of `model(ids, labels=ids).loss` (with its graph)."""
    kw = {} if window is None else {"num_items_in_batch": window}
    out = model(ids, labels=ids, **kw)
    return out.loss - _lm_loss(out.logits, ids, window)


def _close(got, want) -> None:
    """Equal up to fp32 rounding of gradients summed in a different order."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def _router_grads(model) -> torch.Tensor:
    grads = [p.grad.flatten() for b in xft.moe_blocks(model).values() for p in b.gate.parameters()]
    model.zero_grad()
    return torch.cat(grads)


# ---------------------------------------------------------------- settings

def test_settings_are_the_registries_entries():
    f = {f.name: f for f in dataclasses.fields(UpcycleConfig)}
    assert choices_of(f["balance"]) == tuple(BALANCES) and choices_of(f["balance_scope"]) == BALANCE_SCOPES
    with pytest.raises(ConfigError, match="balance='nope'; expected one of"):
        UpcycleConfig(balance="nope")
    with pytest.raises(ConfigError, match="balance_scope='step'"):
        UpcycleConfig(balance_scope="step")
    with pytest.raises(ConfigError, match="balance_bias_rate=-0.1"):
        UpcycleConfig(balance_bias_rate=-0.1)
    biased = [name for name, b in BALANCES.items() if b.selection_bias]
    for name in biased:
        with pytest.raises(ConfigError, match="never moves its selection bias"):
            UpcycleConfig(balance=name, balance_bias_rate=0.0)
    # A config written before these settings existed reads as the paper's balancing.
    old = {k: v for k, v in UpcycleConfig().to_dict().items() if not k.startswith("balance_") and k != "balance"}
    old["balance_loss_weight"] = 0.01
    cfg = UpcycleConfig.from_dict(old)
    assert (cfg.balance, cfg.balance_scope) == ("cv2", "micro_batch")


# ---------------------------------------------------------------- function preservation

@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("balance", list(BALANCES))
@pytest.mark.parametrize("scope", BALANCE_SCOPES)
def test_upcycled_model_computes_the_dense_model(arch, balance, scope):
    dense = tiny_model(arch)
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        ref = dense(ids).logits
    for routing in [name for name, r in ROUTINGS.items() if r.sums_to_one]:
        moe = xft.upcycle(copy.deepcopy(dense), UpcycleConfig(num_experts=4, top_k=3, routing=routing,
                                                               balance=balance, balance_scope=scope))
        with torch.no_grad():
            torch.testing.assert_close(moe(ids).logits, ref, rtol=0, atol=1e-5)
        moe.train()  # noisy training forward with the balance loss: still the dense model's logits
        for m in moe.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0  # (the dense reference had none)
        out = moe(ids, labels=ids)
        torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-5)
        out.loss.backward()
        assert torch.isfinite(out.loss) and _router_grads(moe).abs().sum() > 0


# ---------------------------------------------------------------- aux_free: the selection bias

def test_zero_bias_routes_exactly_as_no_bias():
    for name, scheme in ROUTINGS.items():
        logits = torch.randn(64, 7)
        logits[:8] = 0.0  # ties too
        k = scheme.routed_k(4)
        unbiased = scheme.combine(logits, k, None)
        biased = scheme.combine(logits, k, torch.zeros(7))
        assert all(torch.equal(a, b) for a, b in zip(unbiased, biased)), name
    # Whole models: aux_free at init (bias 0) routes as cv2, with experts that differ (routing matters).
    cv2 = _moe(balance="cv2")
    with torch.no_grad():
        for stack in xft.expert_weights(cv2)[0].values():
            stack.add_(torch.randn_like(stack) * 0.1)
    aux_free = _moe(balance="aux_free")
    missing, unexpected = aux_free.load_state_dict(cv2.state_dict(), strict=False)
    assert unexpected == [] and all(k.endswith("selection_bias") for k in missing)
    ids = torch.randint(3, 300, (2, 11))
    with torch.no_grad():
        assert torch.equal(aux_free(ids).logits, cv2(ids).logits)


def _reference(name: str, logits: torch.Tensor, selected: list[int]) -> torch.Tensor:
    """Weights [N] of one token whose routed experts `selected` are given, from docs/method.md §1."""
    routed = torch.zeros_like(logits)
    if name == "sparse":
        routed[selected] = logits[selected].softmax(-1)
        return routed
    p = logits.softmax(-1)
    m = p[selected].max()
    routed[selected] = p[selected].softmax(-1) * m if name == "xft" else p[selected]
    return torch.cat([(1 - m).reshape(1), routed])


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_bias_changes_the_selection_never_the_weights(name):
    scheme = ROUTINGS[name]
    logits = torch.randn(50, 7, dtype=torch.float64) * 2
    k = scheme.routed_k(4)
    bias = torch.randn(7, dtype=torch.float64)
    weights, top_i = scheme.combine(logits, k, bias)
    scores = logits if name == "sparse" else logits.softmax(-1)  # what a scheme selects by
    assert torch.equal(top_i.sort(-1).values, (scores + bias).topk(k, -1).indices.sort(-1).values)
    assert not torch.equal(top_i.sort(-1).values, scheme.combine(logits, k, None)[1].sort(-1).values)
    for row, sel, w in zip(logits, top_i.tolist(), weights):
        torch.testing.assert_close(w, _reference(name, row, sel), rtol=1e-12, atol=1e-12)
    # Another bias with the same selection gives the same weights, bit for bit.
    forced = torch.full((7,), -1e3, dtype=torch.float64)
    forced[:k] = 1e3
    again = forced.clone()
    again[:k] += torch.rand(k, dtype=torch.float64)
    first, second = scheme.combine(logits, k, forced), scheme.combine(logits, k, again)
    assert (first[1] < k).all() and torch.equal(first[0], second[0])


def _skewed_block(rate: float):
    """An aux-free MoE whose first layer's router favours routed experts 0 and 1, and inputs for that layer."""
    moe = _moe("llama", num_experts=5, top_k=2, router="linear", balance="aux_free", balance_bias_rate=rate)
    block = xft.moe_blocks(moe)[0].train()
    d = moe.config.hidden_size
    u = torch.randn(d)
    x = torch.randn(128, d) * 0.3 + u  # every token shares direction u
    with torch.no_grad():
        weight = block.gate.router[0].weight  # [R=4, d]
        weight.copy_(torch.randn_like(weight) * 0.05)
        weight[0] += 1.0 * u / u.dot(u)
        weight[1] += 0.7 * u / u.dot(u)
    return moe, block, x


def _route(block, x) -> torch.Tensor:
    """One training forward of `block` on `x`, counted as the hook counts it; the load [R]."""
    with torch.no_grad():
        block.record_routing = True
        block(x)
        return block.balance_sums(None)["count"]


def _spread(load: torch.Tensor) -> float:
    return ((load.max() - load.min()) / load.mean()).item()


def test_aux_free_bias_moves_toward_balance():
    rate = 0.005
    moe, block, x = _skewed_block(rate)
    first = _route(block, x)
    assert first[:2].sum() > 0.9 * first.sum()  # skewed: experts 0 and 1 get (nearly) every token
    xft.balance_step(moe)
    torch.testing.assert_close(block.selection_bias, rate * torch.sign(first.mean() - first))
    loads = []
    for _ in range(50):
        loads.append(_route(block, x))
        xft.balance_step(moe)
    # Fixed sign steps end in a small oscillation around balance: look at the last step and the last ten.
    assert _spread(loads[-1]) < 0.25 * _spread(first), loads[-1]
    assert _spread(torch.stack(loads[-10:]).mean(0)) < 0.15 * _spread(first)
    assert block.selection_bias.argmin() == first.argmax()  # the busiest expert is held back most


def test_bias_moves_only_after_training_forwards():
    moe, block, x = _skewed_block(0.02)
    block.eval()
    _route(block, x)  # an evaluation forward: not counted
    xft.balance_step(moe)
    assert block.step_load is None and not block.selection_bias.any()
    # Through the model's loss hook: a training forward with labels counts every layer's load.
    moe.train()
    ids = torch.randint(3, 300, (2, 12))
    moe(ids, labels=ids).loss.backward()
    loads = {i: s["load"] for i, s in xft.routing_stats(moe).items()}
    xft.balance_step(moe)
    for i, b in xft.moe_blocks(moe).items():
        torch.testing.assert_close(b.selection_bias, 0.02 * torch.sign(loads[i].mean() - loads[i]))
        assert b.selection_bias.grad is None and "selection_bias" not in dict(moe.named_parameters())


# ---------------------------------------------------------------- switch

def test_switch_loss_is_the_weight_when_balanced_and_matches_its_definition():
    assert switch_loss(torch.full((6,), 4.0), torch.full((6,), 2.0), 0.01).item() == pytest.approx(0.01)
    logits = torch.randn(40, 6, requires_grad=True)
    k = 2
    top_i = logits.topk(k, -1).indices
    dispatched = torch.zeros(40, 6).scatter(-1, top_i, 1.0)
    p = logits.softmax(-1)
    loss = switch_loss(dispatched.sum(0), p.sum(0), 0.5)
    # transformers' load_balancing_loss_func (Mixtral): R * sum_e (tokens routed to e / T) * mean p_e = k x ours
    hf = 6 * ((dispatched.sum(0) / 40) * p.mean(0)).sum()
    assert loss.item() == pytest.approx(0.5 * hf.item() / k, rel=1e-6)
    loss.backward()
    assert logits.grad.abs().sum() > 0


# ---------------------------------------------------------------- global scope: gradient accumulation

@pytest.mark.parametrize("balance", [n for n, b in BALANCES.items() if not b.selection_bias])
def test_global_scope_over_accumulation_is_what_the_docs_say(balance):
    cfg = dict(balance=balance, balance_loss_weight=1.0, balance_scope="global")
    moe = _moe(**cfg).train()
    ids = torch.randint(3, 300, (4, 10))
    whole, first, second = ids, ids[:2], ids[2:]
    window = ids[:, 1:].numel()

    # The value: the step's micro-batch terms add up to the loss of the whole step in one batch.
    full = _aux(moe, whole, window)
    full.backward()
    g_full = _router_grads(moe)
    terms = [_aux(moe, mb, window) for mb in (first, second)]
    assert sum(t.item() for t in terms) == pytest.approx(full.item(), rel=1e-5)
    assert not hasattr(moe, "_xft_balance_step")  # the window's label tokens were all seen: step over

    # The gradient of micro-batch m is rho_m * grad L(S_<=m) through its own tokens: the first one's is
    # rho_1 times that of its own balance loss (rho_1 = its share of the step's label tokens, 1/2 here).
    _aux(moe, first, window).backward()
    g_first = _router_grads(moe)
    alone = _moe(**{**cfg, "balance_scope": "micro_batch"}).train()
    alone.load_state_dict(moe.state_dict())
    _aux(alone, first).backward()
    _close(g_first, 0.5 * _router_grads(alone))
    _aux(moe, second, window).backward()  # finish the step
    moe.zero_grad()

    # Micro-batches whose statistics are proportional to the step's (here identical): exact gradient.
    twice = torch.cat([first, first])
    _aux(moe, twice, window).backward()
    g_twice = _router_grads(moe)
    for mb in (first, first):
        _aux(moe, mb, window).backward()
    _close(_router_grads(moe), g_twice)
    assert not torch.allclose(g_twice, g_full)  # (different data, different gradient: the check has teeth)

    # Evaluation and forwards without a window: each forward is its own step.
    moe.eval()
    with torch.no_grad():
        assert _aux(moe, first).item() == pytest.approx(_aux(alone.eval(), first).item(), rel=1e-6)
    assert not hasattr(moe, "_xft_balance_step")


def test_micro_batch_scope_differs_from_the_whole_step():
    moe = _moe(balance_loss_weight=1.0).train()
    ids = torch.randint(3, 300, (4, 10))
    window = ids[:, 1:].numel()
    whole = _aux(moe, ids, window).item()
    parts = _aux(moe, ids[:2], window).item() + _aux(moe, ids[2:], window).item()
    assert abs(parts - whole) > 1e-4 * whole  # a mean of micro-batch losses, not the step's loss


# ---------------------------------------------------------------- global scope: two processes

DP_SCRIPT = r"""
import json, os, sys
import torch
import torch.distributed as dist
import xft
sys.path.insert(0, sys.argv[1])
from test_balance import _aux, _moe, _router_grads

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
out = {}
for balance in json.loads(sys.argv[2]):
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (4, 10))  # the global batch, the same on both processes
    mine = ids.chunk(world)[rank]
    moe = _moe(balance=balance, balance_loss_weight=1.0, balance_scope="global").train()

    def averaged(g):  # as DDP averages gradients
        dist.all_reduce(g)
        return g / world

    # A plain step: the loss of the global batch's statistics.
    aux = _aux(moe, mine)
    aux.backward()
    plain = {"aux": aux.item(), "grad": averaged(_router_grads(moe)).tolist()}
    # As Trainer runs it: num_items_in_batch = the step's label tokens over all processes, the loss times
    # the number of processes; two (identical) micro-batches per process.
    window = 2 * ids[:, 1:].numel()
    terms = []
    for _ in range(2):
        term = _aux(moe, mine, window) * world
        term.backward()
        terms.append(term.item())
    logged = averaged(torch.tensor(terms).sum())  # Trainer logs the mean over processes
    accumulated = {"aux": logged.item(), "grad": averaged(_router_grads(moe)).tolist()}
    out[balance] = {"plain": plain, "accumulated": accumulated, "step_over": not hasattr(moe, "_xft_balance_step")}
if rank == 0:
    print("RESULT " + json.dumps(out))
dist.barrier()
dist.destroy_process_group()  # before exit: gloo's threads torn down at exit can abort a rank (SIGABRT)
"""


@pytest.mark.slow  # ~30 s on 2 shared cores: torchrun and two processes importing torch
def test_global_scope_over_two_processes_equals_one_process(tmp_path):
    balances = [n for n, b in BALANCES.items() if not b.selection_bias]
    script = tmp_path / "dp.py"
    script.write_text(DP_SCRIPT)
    tests = str(Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), tests, json.dumps(balances)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    for balance in balances:
        torch.manual_seed(0)
        ids = torch.randint(3, 300, (4, 10))
        moe = _moe(balance=balance, balance_loss_weight=1.0, balance_scope="global").train()
        aux = _aux(moe, ids)
        aux.backward()
        two = got[balance]
        assert two["plain"]["aux"] == pytest.approx(aux.item(), rel=1e-5)
        _close(torch.tensor(two["plain"]["grad"]), _router_grads(moe))
        # One process, the whole step in one batch (each process's micro-batch twice).
        step = torch.cat([ids, ids])
        aux = _aux(moe, step, step[:, 1:].numel())
        aux.backward()
        assert two["accumulated"]["aux"] == pytest.approx(aux.item(), rel=1e-5)
        _close(torch.tensor(two["accumulated"]["grad"]), _router_grads(moe))
        assert two["step_over"]


# ---------------------------------------------------------------- checkpoints and training

def test_checkpoint_keeps_the_settings_and_the_bias(tmp_path):
    moe = _moe(balance="aux_free", balance_scope="global", balance_bias_rate=0.05)
    with torch.no_grad():
        for block in xft.moe_blocks(moe).values():
            block.selection_bias.copy_(torch.randn_like(block.selection_bias))
    moe.save_pretrained(tmp_path / "aux_free")
    assert any(k.endswith("selection_bias") for k in load_file(tmp_path / "aux_free" / "model.safetensors"))
    loaded = xft.load(str(tmp_path / "aux_free"))
    assert xft.upcycle_config(loaded) == xft.upcycle_config(moe)
    for a, b in zip(xft.moe_blocks(moe).values(), xft.moe_blocks(loaded).values()):
        assert torch.equal(a.selection_bias, b.selection_bias) and a.selection_bias.dtype == torch.float32
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, moe.eval()(ids).logits, rtol=0, atol=1e-6)
    # A checkpoint of an xft version without these settings: the paper's balancing, no bias tensor.
    cv2 = _moe()
    cv2.save_pretrained(tmp_path / "old")
    assert not any("selection_bias" in k for k in load_file(tmp_path / "old" / "model.safetensors"))
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config["xft"] = {k: v for k, v in config["xft"].items() if k not in ("balance", "balance_scope",
                                                                         "balance_bias_rate")}
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    old = xft.upcycle_config(xft.load(str(tmp_path / "old")))
    assert (old.balance, old.balance_scope) == ("cv2", "micro_batch")


def test_trainer_moves_the_bias_after_each_step_and_saves_it(tmp_path):
    from xft.training import train_sft

    ws = make_workspace(tmp_path)
    rate = 0.01
    out = train_sft(SFTConfig(model=str(ws / "llama"), data=str(ws / "data.jsonl"), out=str(tmp_path / "run"),
                              upcycle=UpcycleConfig(num_experts=4, top_k=2, balance="aux_free",
                                                    balance_bias_rate=rate, balance_scope="global"),
                              max_steps=3, lr=1e-3, **{**FAST, "micro_batch_size": 4}))
    weights = load_file(f"{out}/model.safetensors")
    biases = [v for k, v in weights.items() if k.endswith("selection_bias")]
    assert len(biases) == 2
    for b in biases:  # 3 updates of +-rate (or 0) each
        steps = b / rate
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 3 and b.any()
    logged = [h for h in json.loads((tmp_path / "run" / "xft_training.json").read_text())["log_history"]
              if "loss" in h]
    assert len(logged) == 3 and all(math.isfinite(h["loss"]) and "bias_spread" in h for h in logged)
    assert logged[0]["balance_loss"] == 0  # aux_free adds no loss


@pytest.mark.slow  # two short trainings each, one in 2 processes (~30 s each on 2 shared cores)
@pytest.mark.parametrize("balance,micro_batches", [("switch", (8, 4)), ("aux_free", (2, 2))])
def test_trainer_on_two_processes_matches_one_process(tmp_path, balance, micro_batches):
    """Through `accelerate launch` (gloo DDP): switch with the global scope and no accumulation (1 x 8 vs
    2 x 4 examples) equals one process; aux_free with accumulation (4 vs 2 micro batches of 2 per process)
    counts the step's load over micro batches and processes, so the biases are the same."""
    from test_train_distributed import curve, launch, max_difference

    ws = make_workspace(tmp_path)
    train = ["train", str(ws / "llama"), "--data", str(ws / "data.jsonl"), "--upcycle", "--num-experts", "4",
             "--top-k", "2", "--no-noisy-gating", "--balance", balance, "--balance-scope", "global",
             "--balance-loss-weight", "1.0", "--balance-bias-rate", "0.01", "--max-steps", "4", "--batch-size", "8",
             "--warmup-steps", "0", "--lr", "1e-2", "--logging-steps", "1", "--no-progress",
             "--optimizer", "sgd"]  # Adafactor's normalised updates would blow float noise up to routing flips
    one_micro, two_micro = micro_batches
    two = launch([*train, "--micro-batch-size", str(two_micro), "--out", str(tmp_path / "two")])
    one = subprocess.run([sys.executable, "-m", "xft.cli", *train, "--micro-batch-size", str(one_micro), "--out",
                          str(tmp_path / "one")], capture_output=True, text=True, timeout=400)
    assert one.returncode == 0, one.stderr[-2000:]
    out, _ = two.communicate(timeout=400)
    assert two.returncode == 0, out[-3000:]
    (n1, c1), (n2, c2) = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert (n1, n2) == (1, 2) and len(c1) == len(c2) == 4
    if balance == "aux_free":
        biases = [load_file(tmp_path / run / "model.safetensors") for run in ("one", "two")]
        keys = [k for k in biases[0] if k.endswith("selection_bias")]
        assert keys and any(biases[0][k].any() for k in keys)
        assert all(torch.equal(biases[0][k], biases[1][k]) for k in keys), {k: (biases[0][k], biases[1][k])
                                                                             for k in keys}
    assert c2 == pytest.approx(c1, rel=1e-4), (c1, c2)
    assert max_difference(tmp_path / "one", tmp_path / "two") < 1e-4
    logged = [[h["balance_loss"] for h in json.loads((tmp_path / run / "xft_training.json").read_text())[
        "log_history"] if "loss" in h] for run in ("one", "two")]
    assert logged[1] == pytest.approx(logged[0], rel=1e-4)  # process 0 logs the global sums' loss
