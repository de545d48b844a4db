"""Save/load: an MoE round-trips exactly; a merged model loads without xft."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import xft
from xft.errors import UserError
from xft.testing import tiny_model, tiny_tokenizer


@pytest.mark.parametrize("arch,routing", [("llama", "xft"), ("gpt2", "sparse"), ("phi", "unnormalized")])
def test_moe_round_trip(tmp_path, arch, routing):
    moe = xft.upcycle(tiny_model(arch), xft.UpcycleConfig(routing=routing, num_experts=4, top_k=3))
    with torch.no_grad():
        for stacks in xft.expert_weights(moe).values():
            for p in stacks.values():
                p.add_(torch.randn_like(p) * 0.1)
    moe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["xft"]["routing"] == routing and saved["xft"]["num_experts"] == 4
    assert xft.is_moe_checkpoint(str(tmp_path))
    loaded = xft.load(str(tmp_path))
    assert type(loaded) is type(moe) and xft.upcycle_config(loaded) == xft.upcycle_config(moe)
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, moe(ids).logits, rtol=0, atol=1e-6)
    for name, p in moe.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name


def test_load_dense_checkpoint(tmp_path):
    dense = tiny_model("qwen2")
    dense.save_pretrained(tmp_path)
    loaded = xft.load(str(tmp_path))
    assert not xft.is_moe(loaded)
    ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, dense(ids).logits, rtol=0, atol=1e-5)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        xft.load(str(tmp_path / "nope"))


def test_corrupted_moe_checkpoint_is_reported(tmp_path):
    moe = xft.upcycle(tiny_model("llama"), xft.UpcycleConfig(num_experts=4, top_k=3))
    moe.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["xft"]["num_experts"] = 8
    cfg["xft"]["top_k"] = 6
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="has shape"):
        xft.load(str(tmp_path))


def test_merged_model_loads_in_plain_transformers(tmp_path):
    dense = tiny_model("llama")
    moe = xft.upcycle(dense)
    with torch.no_grad():
        for stacks in xft.expert_weights(moe).values():
            for p in stacks.values():
                p.add_(torch.randn_like(p) * 0.1)
    merged = xft.merge(moe, mixing_logits={0: torch.randn(7), 1: torch.randn(7)})
    merged.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    ids = torch.randint(3, 300, (1, 6))
    with torch.no_grad():
        want = merged(ids).logits
    torch.save({"ids": ids, "want": want}, tmp_path / "expect.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = {str(tmp_path)!r}
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)
        e = torch.load(path + "/expect.pt")
        with torch.no_grad():
            torch.testing.assert_close(model(e["ids"]).logits, e["want"], rtol=0, atol=1e-5)
        out = model.generate(**tok("def f(", return_tensors="pt"), max_new_tokens=4, do_sample=False)
        assert out.shape[1] > 1
        assert "xft" not in sys.modules
        print(sum(p.numel() for p in model.parameters()))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) == sum(p.numel() for p in tiny_model("llama").parameters())
    assert "xft" not in (tmp_path / "config.json").read_text()


@pytest.mark.parametrize("tied", [False, True])
def test_skeleton_has_the_checkpoints_parameters_without_reading_them(tmp_path, tied):
    from xft.checkpoint import skeleton

    dense = tiny_model("qwen2", tie_word_embeddings=tied)
    dense.save_pretrained(tmp_path / "dense")
    moe = xft.upcycle(tiny_model("qwen2", tie_word_embeddings=tied), xft.UpcycleConfig(num_experts=4, top_k=3))
    moe.save_pretrained(tmp_path / "moe")
    for model, path in ((dense, "dense"), (moe, "moe")):
        shell = skeleton(str(tmp_path / path))
        assert all(p.is_meta for p in shell.parameters()) and xft.is_moe(shell) == (path == "moe")
        assert {k: v.shape for k, v in shell.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
        assert sum(p.numel() for p in shell.parameters()) == sum(p.numel() for p in model.parameters())


def test_load_can_choose_the_expert_kernel(tmp_path):
    moe = xft.upcycle(tiny_model("llama"), xft.UpcycleConfig(num_experts=4, top_k=3))
    moe.save_pretrained(tmp_path)
    generic = xft.load(str(tmp_path), expert_impl="generic")
    assert xft.upcycle_config(generic).expert_impl == "generic"
    assert all(block.spec is None for block in xft.moe_blocks(generic).values())  # the functional_call path
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(generic(ids).logits, moe(ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(xft.ConfigError, match="expert_impl"):
        xft.load(str(tmp_path), expert_impl="nope")
