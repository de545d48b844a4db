"""Merge-gap diagnostics (xft.merge_diagnostics): expert drift, routing spread, held-out loss, in `xft merge`."""

import copy
import json
import math

import pytest
import torch

import xft
from xft.cli import main as cli
from xft.data import Collator
from xft.merge_diagnostics import expert_drift, held_out_loss, merge_gap, routing_spread
from xft.testing import tiny_model


def _moe(arch="llama", **cfg):
    return xft.upcycle(tiny_model(arch, hidden=16, intermediate=24), xft.UpcycleConfig(num_experts=4, top_k=3, **cfg))


def _batch(lengths, vocab=300, seed=0):
    """A Collator batch of random examples of `lengths`, the response the second half of each."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    return Collator(pad_token_id=0)(examples)


@pytest.mark.parametrize("init", ["copy", "granular"])
def test_an_untrained_upcycle_has_no_drift(init):
    moe = _moe(init=init, **({"granularity": 2} if init == "granular" else {}))
    assert set(expert_drift(moe)) == set(xft.moe_blocks(moe)) and all(d == 0 for d in expert_drift(moe).values())


def test_drift_of_one_displaced_expert_is_its_closed_form():
    """N experts equal to W, one moved by d: the RMS distance to the mean is ‖d‖·sqrt(N-1)/N, the mean W + d/N."""
    moe = _moe()
    layer, expert, n = 1, 2, 4
    stacks = xft.expert_weights(moe)[layer]
    torch.manual_seed(0)
    with torch.no_grad():
        deltas = {name: torch.randn_like(p[expert]) * 0.05 for name, p in stacks.items()}
        for name, p in stacks.items():
            p[expert] += deltas[name]
    d = torch.cat([x.double().flatten() for x in deltas.values()])
    w = torch.cat([p[0].detach().double().flatten() for p in stacks.values()])  # an unmoved expert: W
    want = float(d.norm() * math.sqrt(n - 1) / n / (w + d / n).norm())
    drift = expert_drift(moe)
    assert drift[layer] == pytest.approx(want, rel=1e-6)
    assert all(v == 0 for i, v in drift.items() if i != layer)


def test_routing_spread_is_zero_when_every_token_routes_alike_and_ignores_padding():
    moe = _moe().eval()
    padded = _batch([9, 5, 7])
    spread = routing_spread(moe, [padded])
    assert all(0 < s < 1 for s in spread.values())
    # Padding changes nothing: the padded batch's real tokens, one example per batch, give the same spread.
    singles = [{k: v[i:i + 1, :int(padded["attention_mask"][i].sum())] for k, v in padded.items()} for i in range(3)]
    for i, s in routing_spread(moe, singles).items():
        assert s == pytest.approx(spread[i], rel=1e-5, abs=1e-7)
    with torch.no_grad():  # a router whose logits do not depend on the token: every token mixes alike
        for block in xft.moe_blocks(moe).values():
            for p in block.gate.router.parameters():
                p.zero_()
    assert all(s == pytest.approx(0, abs=1e-12) for s in routing_spread(moe, [padded]).values())


def test_held_out_loss_is_the_models_own_token_mean_loss():
    model = tiny_model("llama").eval()
    batch = _batch([9, 6, 8])
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss.item()
    assert held_out_loss(model, [batch]) == pytest.approx(want, rel=1e-6)
    # Two batches: the mean over all their response tokens, not the mean of the batch means.
    a, b = _batch([9], seed=1), _batch([5, 7, 6], seed=2)
    na, nb = int((a["labels"][:, 1:] != -100).sum()), int((b["labels"][:, 1:] != -100).sum())
    combined = (held_out_loss(model, [a]) * na + held_out_loss(model, [b]) * nb) / (na + nb)
    assert held_out_loss(model, [a, b]) == pytest.approx(combined, rel=1e-6)


def test_the_gap_of_merging_an_untrained_upcycle_is_zero_and_grows_with_drift():
    moe = _moe().eval()
    batches = [_batch([9, 6, 8])]
    gap = merge_gap(moe, xft.merge(moe, "init"), batches)
    assert gap.mean_drift == 0 and gap.loss_gap == pytest.approx(0, abs=1e-5)
    moved = copy.deepcopy(moe)
    torch.manual_seed(1)
    with torch.no_grad():
        for stacks in xft.expert_weights(moved).values():
            for p in stacks.values():
                p.add_(torch.randn_like(p) * 0.3)
    gap = merge_gap(moved, xft.merge(moved, "init"), batches)
    assert gap.mean_drift > 0 and gap.loss_gap != pytest.approx(0, abs=1e-5)
    assert json.loads(json.dumps(gap.to_dict()))["loss_gap"] == gap.loss_gap


def _instruction_data(path, n=40):
    path.write_text("".join(json.dumps({"instruction": f"add {i} and {i + 1}", "response": f"return {2 * i + 1}"})
                            + "\n" for i in range(n)))
    return path


def test_xft_merge_reports_and_saves_the_gap(tmp_path, capsys):
    from xft.data import MAGICODER_SYSTEM
    from xft.testing import tiny_tokenizer

    data = _instruction_data(tmp_path / "data.jsonl")
    tok = tiny_tokenizer([f"{MAGICODER_SYSTEM}\n\n@@ Instruction\nadd 1 and 2\n\n@@ Response\nreturn 3"])
    moe = _moe()
    moe.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    out = tmp_path / "merged"
    assert cli(["merge", str(tmp_path / "moe"), "--method", "init", "--data", str(data), "--eval-fraction", "0.25",
                "--gap-examples", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "expert drift" in printed and "routing spread" in printed and "held-out loss" in printed
    gap = json.loads((out / "merge_gap.json").read_text())
    assert gap["held_out_examples"] == 6 and gap["mean_expert_drift"] == 0
    assert gap["loss_gap"] == pytest.approx(0, abs=1e-5)  # an untrained upcycle merges to its own function
    assert set(gap["expert_drift"]) == set(gap["routing_spread"]) == {"0", "1"}

    # Without validation data: the drift only, and the summary says how to get the rest.
    assert cli(["merge", str(tmp_path / "moe"), "--method", "uniform", "--out", str(tmp_path / "plain")]) == 0
    assert "not measured: pass validation data" in capsys.readouterr().out
    gap = json.loads((tmp_path / "plain" / "merge_gap.json").read_text())
    assert gap["routing_spread"] is None and gap["loss_gap"] is None and gap["held_out_examples"] == 0
