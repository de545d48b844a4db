"""Training stages end to end on tiny local models: upcycle -> MoE SFT -> learned merge -> dense; dense SFT;
EWA and fixed merges; run-directory protection; every bad-input case through the CLI.

Helpers here (`workspace`, `sft`, `plain_load`) are shared with test_train_resume.py / test_train_distributed.py.
"""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

import xft
from xft.cli import main as cli
from xft.data import MAGICODER_SYSTEM, Collator, DataConfig, load_dataset
from xft.errors import UserError
from xft.testing import tiny_model, tiny_tokenizer
from xft.config import MergeConfig, SFTConfig, UpcycleConfig
from xft.training import learn_merge, train_sft
from xft.training import rundir
from xft.training.trainer import batch_plan

# Small steps on a tiny model; no checkpoints unless a test asks for them.
FAST = dict(batch_size=8, micro_batch_size=8, warmup_steps=0, save_steps=1000, logging_steps=1, progress=False)


def make_workspace(root):
    """A learnable instruction task, a tokenizer trained on it, and tiny Llama / GPT-2 base models."""
    rng = random.Random(0)
    rows = []
    for _ in range(64):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"instruction": f"add {a} and {b}", "response": f"return {a}+{b}"})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = [f"{MAGICODER_SYSTEM}\n\n@@ Instruction\n{r['instruction']}\n\n@@ Response\n{r['response']}"
              for r in rows]
    tok = tiny_tokenizer(corpus)
    for arch in ("llama", "gpt2"):
        model = tiny_model(arch)
        model.save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def losses(final_dir):
    """Logged training losses of a finished run, in order."""
    with open(os.path.join(final_dir, "xft_training.json")) as f:
        return [h["loss"] for h in json.load(f)["log_history"] if "loss" in h]


def data_loss(model_dir, data):
    """Mean LM loss of the model in `model_dir` over all of `data` (response tokens), no xft involved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds, _ = load_dataset(DataConfig(path=str(data)), tok)
    with torch.no_grad():
        return model(**Collator(tok.pad_token_id)(list(ds))).loss.item()


PLAIN_LOAD = r"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
for path in sys.argv[1:]:
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    ids = tok("@@ Instruction\nadd 1 and 2\n\n@@ Response\n", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    out[path] = {"class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
                 "new_tokens": gen.shape[1] - ids.input_ids.shape[1],
                 "xft_in_config": "xft" in model.config.to_dict()}
assert not any(m == "xft" or m.startswith("xft.") for m in sys.modules), "xft was imported"
print(json.dumps(out))
"""


def plain_load(*dirs):
    """Load and generate with plain transformers in a fresh process that never imports xft."""
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOAD, *map(str, dirs)], capture_output=True, text=True,
                          cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def n_params(model_dir):
    return sum(p.numel() for p in xft.load(str(model_dir)).parameters())


# ---------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def trained_moe(workspace):
    """upcycle (CLI) -> MoE SFT; returns the finished MoE directory."""
    ws = workspace
    assert cli(["upcycle", str(ws / "llama"), "--out", str(ws / "moe"), "--num-experts", "4", "--top-k", "3"]) == 0
    return train_sft(SFTConfig(model=str(ws / "moe"), data=str(ws / "data.jsonl"), out=str(ws / "moe_sft"),
                               max_steps=16, lr=1e-2, **FAST))


def test_moe_sft_learns_and_logs_routing(workspace, trained_moe):
    curve = losses(trained_moe)
    assert len(curve) == 16 and curve[-1] < 0.75 * curve[0], curve
    assert xft.is_moe_checkpoint(trained_moe)
    record = json.loads((workspace / "moe_sft" / "xft_training.json").read_text())
    logged = [h for h in record["log_history"] if "loss" in h]
    assert all(h["balance_loss"] > 0 and h["max_expert_load"] >= 1.0 for h in logged)
    routing = [json.loads(line) for line in (workspace / "moe_sft" / "routing.jsonl").read_text().splitlines()]
    assert len(routing) == 16 and set(routing[-1]["layers"]) == {"0", "1"}
    share = routing[-1]["layers"]["0"]["load_share"]
    assert len(share) == 3 and abs(sum(share) - 1) < 1e-3  # 3 routed experts
    assert not list(workspace.glob("moe_sft/checkpoint-*"))  # deleted once the model is in place
    assert not (workspace / "moe_sft" / ".final.tmp").exists()


def test_learned_merge_downweights_bad_experts_and_loads_without_xft(workspace, trained_moe):
    ws = workspace
    # Ruin routed experts 2 and 3: a merge that learns must move weight away from them.
    moe = xft.load(trained_moe)
    with torch.no_grad():
        for stacks in xft.expert_weights(moe).values():
            for w in stacks.values():
                w[2:] += 0.5 * torch.randn_like(w[2:])
    moe.save_pretrained(ws / "moe_bad")
    AutoTokenizer.from_pretrained(trained_moe).save_pretrained(ws / "moe_bad")
    base = dict(moe=str(ws / "moe_bad"), data=str(ws / "data.jsonl"), shared_weight=0.5, **FAST)
    init = learn_merge(MergeConfig(out=str(ws / "m_init"), method="init", **base))
    learned = learn_merge(MergeConfig(out=str(ws / "m_learned"), max_steps=12, lr=0.3, **base))

    curve = losses(learned)
    assert min(curve[-3:]) < curve[0], curve
    assert data_loss(learned, ws / "data.jsonl") < data_loss(init, ws / "data.jsonl") - 0.05
    coeffs = json.loads((ws / "m_learned" / "merge_coefficients.json").read_text())
    for layer in coeffs["coefficients"].values():
        assert layer[0] == pytest.approx(0.5) and sum(layer) == pytest.approx(1.0)
        assert max(layer[2:]) < 0.5 / 3 < layer[1]  # the ruined experts lost weight to the good one
    assert set(coeffs["mixing_logits"]) == {"0", "1"}

    checked = plain_load(learned, init)
    for path in (learned, init):
        info = checked[str(path)]
        assert info == {"class": "LlamaForCausalLM", "params": n_params(ws / "llama"), "new_tokens": 4,
                        "xft_in_config": False}


def test_fixed_merges_via_cli(workspace, trained_moe, capsys):
    ws = workspace
    assert cli(["merge", str(ws / "moe_sft"), "--out", str(ws / "m_uniform"), "--method", "uniform"]) == 0
    coeffs = json.loads((ws / "m_uniform" / "merge_coefficients.json").read_text())
    assert coeffs["coefficients"]["0"] == [0.25] * 4
    assert "xft merge: done" in capsys.readouterr().out
    dense = xft.load(str(ws / "m_uniform"))
    assert not xft.is_moe(dense) and sum(p.numel() for p in dense.parameters()) == n_params(ws / "llama")
    # A finished run is replaced only when asked to.
    init = ["merge", str(ws / "moe_sft"), "--out", str(ws / "m_uniform"), "--method", "init"]
    assert cli(init) == 2 and "already holds the finished model of another command" in capsys.readouterr().err
    (ws / "m_uniform" / "notes.txt").write_text("mine")
    assert cli(init + ["--overwrite"]) == 0
    coeffs = json.loads((ws / "m_uniform" / "merge_coefficients.json").read_text())
    assert coeffs["method"] == "init" and coeffs["coefficients"]["0"] == pytest.approx([0.75] + [0.25 / 3] * 3)
    assert (ws / "m_uniform" / "notes.txt").read_text() == "mine"  # --overwrite deletes only what xft wrote
    written = json.loads((ws / "m_uniform" / "xft_run.json").read_text())["outputs"]
    assert written[-1] == "config.json" and "model.safetensors" in written


def test_dense_sft_gpt2_learns_and_loads_without_xft(workspace):
    ws = workspace
    final = train_sft(SFTConfig(model=str(ws / "gpt2"), data=str(ws / "data.jsonl"), out=str(ws / "gpt2_sft"),
                                max_steps=12, lr=1e-2, **FAST))
    curve = losses(final)
    assert curve[-1] < 0.75 * curve[0], curve
    info = plain_load(final)[final]
    assert info["class"] == "GPT2LMHeadModel" and info["params"] == n_params(ws / "gpt2")


def test_ewa_trains_moe_and_saves_averaged_dense(workspace):
    ws = workspace
    final = train_sft(SFTConfig(model=str(ws / "llama"), upcycle=UpcycleConfig(num_experts=4, top_k=3), ewa_share_rate=0.5,
                                data=str(ws / "data.jsonl"), out=str(ws / "ewa"), max_steps=4, lr=1e-2, **FAST))
    dense = xft.load(final)
    assert not xft.is_moe(dense) and sum(p.numel() for p in dense.parameters()) == n_params(ws / "llama")
    assert len(losses(final)) == 4


# ---------------------------------------------------------------- the run directory

def test_finished_run_is_never_silently_overwritten(workspace, trained_moe, capsys):
    ws = workspace
    before = os.path.getmtime(ws / "moe_sft" / "model.safetensors")
    argv = ["train", str(ws / "moe"), "--data", str(ws / "data.jsonl"), "--out", str(ws / "moe_sft")]
    assert cli(argv) == 2  # another command (the default max_steps and lr)
    err = capsys.readouterr().err
    assert "already holds the finished model of another command" in err and "max_steps: 16 -> -1" in err
    assert os.path.getmtime(ws / "moe_sft" / "model.safetensors") == before
    # The same command again: nothing to do, exit 0, the model untouched.
    same = argv + ["--max-steps", "16", "--lr", "1e-2", "--batch-size", "8", "--micro-batch-size", "8",
                   "--warmup-steps", "0"]
    assert cli(same) == 0
    assert "already holds the finished model of this command" in capsys.readouterr().out
    assert os.path.getmtime(ws / "moe_sft" / "model.safetensors") == before


def test_interrupted_run_with_other_settings_is_refused(tmp_path):
    cfg = SFTConfig(model="m", data="d.jsonl", out=str(tmp_path / "run"), lr=1e-3)
    plan = rundir.prepare(cfg.out, cfg, "sft")
    assert plan.resume is None and not plan.done
    rundir.start(plan.run, cfg, "sft")
    again = rundir.prepare(cfg.out, cfg, "sft")
    assert again.resume is None and not again.done  # same settings, no checkpoint yet: starts over
    cfg.progress = False  # not a setting that changes the result
    rundir.prepare(cfg.out, cfg, "sft")
    os.makedirs(f"{cfg.out}/checkpoint-1")  # work done: other settings would lose it (test_new_user: none done)
    cfg.lr = 2e-3
    with pytest.raises(UserError, match=r"other settings \(lr: 0.001 -> 0.002\)"):
        rundir.prepare(cfg.out, cfg, "sft")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an xft output directory"):
        rundir.prepare(str(tmp_path / "other"), SFTConfig(model="m", data="d", out="x", overwrite=True), "sft")


def test_last_checkpoint_skips_a_save_that_was_cut_off(tmp_path):
    run = rundir.RunDir(str(tmp_path))
    for step, complete in ((3, True), (6, False)):
        os.makedirs(f"{run.checkpoints}/checkpoint-{step}")
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert run.last_checkpoint().endswith("checkpoint-3")
    assert [os.path.basename(p) for p in run.incomplete_checkpoints()] == ["checkpoint-6"]


def test_batch_plan():
    assert batch_plan(64, None, None, 1) == (8, 8)
    assert batch_plan(64, None, None, 8) == (8, 1)
    assert batch_plan(64, 4, None, 2) == (4, 8)
    assert batch_plan(64, None, 4, 2) == (8, 4)
    with pytest.raises(UserError, match="micro batch 3 x grad accum 4"):
        batch_plan(64, 3, 4, 1)
    with pytest.raises(UserError, match="not divisible by the 3 processes"):
        batch_plan(64, None, None, 3)


# ---------------------------------------------------------------- bad input through the CLI

def _bad_cases(ws, tmp):
    good = str(ws / "data.jsonl")
    malformed = tmp / "malformed.jsonl"
    malformed.write_text('{"instruction": "a", "response": "b"}\n' * 2 + '{"instruction": "a", "response": \n')
    no_response = tmp / "no_response.jsonl"
    no_response.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a", "output": "b"}\n')
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    model = str(ws / "llama")
    return [
        (["train", model, "--data", str(malformed)], ["malformed.jsonl line 3", "malformed JSON"]),
        (["train", model, "--data", str(no_response)], ["no_response.jsonl line 2", "'response'"]),
        (["train", model, "--data", str(empty)], ["empty.jsonl is empty"]),
        (["train", model, "--data", str(tmp / "missing.jsonl")], ["missing.jsonl does not exist"]),
        (["train", str(tmp / "no_such_model"), "--data", good], ["no_such_model does not exist"]),
        (["merge", str(tmp / "no_such_moe"), "--data", good], ["no_such_moe does not exist"]),
        (["merge", model, "--data", good], ["is a dense model, not an xft MoE"]),
        (["upcycle", str(tmp / "no_such_model")], ["no_such_model does not exist"]),
    ]


def test_bad_inputs_fail_with_one_line_and_write_nothing(workspace, tmp_path, capsys):
    for i, (argv, expected) in enumerate(_bad_cases(workspace, tmp_path)):
        out = tmp_path / f"out{i}"
        assert cli(argv + ["--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"xft {argv[0]}: error: "), err
        assert all(part in err for part in expected), (argv, err)
        assert "Traceback" not in err and not out.exists(), argv


def test_bad_input_in_a_real_process_has_no_traceback(workspace, tmp_path):
    argv, expected = _bad_cases(workspace, tmp_path)[0]
    proc = subprocess.run([sys.executable, "-m", "xft.cli", *argv, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert all(part in proc.stderr for part in expected) and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_moe_losses(workspace, trained_moe):
    ws = workspace
    runs = [train_sft(SFTConfig(model=str(ws / "moe"), data=str(ws / "data.jsonl"), out=str(ws / f"gc{gc}"),
                                gradient_checkpointing=gc, max_steps=3, lr=1e-2, **{**FAST, "micro_batch_size": 4}))
            for gc in (False, True)]
    plain, checkpointed = map(losses, runs)
    assert checkpointed == pytest.approx(plain, rel=1e-6) and len(plain) == 3


def test_sparse_upcycling_trains_and_merges(workspace):
    """The no-shared-expert baseline (--routing sparse) through upcycle -> SFT -> learned merge."""
    ws = workspace
    common = dict(data=str(ws / "data.jsonl"), max_steps=2, lr=1e-2, **FAST)
    moe = train_sft(SFTConfig(model=str(ws / "llama"), upcycle=UpcycleConfig(num_experts=4, top_k=2, routing="sparse"),
                              out=str(ws / "sparse"), **common))
    assert xft.load(moe).config.xft["routing"] == "sparse"
    dense = learn_merge(MergeConfig(moe=str(ws / "sparse"), out=str(ws / "sparse_merge"), **common))
    coeffs = json.loads(open(os.path.join(dense, "merge_coefficients.json")).read())
    assert all(len(c) == 4 and sum(c) == pytest.approx(1.0) for c in coeffs["coefficients"].values())
    assert len(coeffs["mixing_logits"]["0"]) == 4  # no shared expert: one logit per expert


def test_merge_learning_resumes_from_its_checkpoint(workspace, trained_moe):
    """An interrupted `xft merge` (no config.json yet, last checkpoint lost) re-runs to the same logits."""
    ws = workspace
    cfg = dict(moe=str(ws / "moe_sft"), data=str(ws / "data.jsonl"), out=str(ws / "m_resume"), max_steps=4,
               lr=0.1, keep_checkpoints=True, **{**FAST, "save_steps": 2})
    first = json.loads(open(os.path.join(learn_merge(MergeConfig(**cfg)), "merge_coefficients.json")).read())
    os.remove(ws / "m_resume" / "config.json")  # as if killed while moving the model in
    shutil.rmtree(ws / "m_resume" / "checkpoint-4")
    again = json.loads(open(os.path.join(learn_merge(MergeConfig(**cfg)), "merge_coefficients.json")).read())
    assert again["mixing_logits"] == first["mixing_logits"]
    record = json.loads((ws / "m_resume" / "xft_training.json").read_text())
    assert record["resumed_from"].endswith("checkpoint-2")
    assert first["mixing_logits"]["0"] != [0.0, 0.0, 0.0]
