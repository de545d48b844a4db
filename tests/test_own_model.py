"""A newcomer's own model through the CLI: tied embeddings end to end, MoE checkpoints that never pose as
dense models, and one rule for model arguments in every command.

Qwen2.5(-Coder) 0.5-3B, Llama-3.2 and Gemma tie the LM head to the input embeddings; their checkpoints
hold no `lm_head.weight`. Every stage must carry the tie through: upcycle -> MoE SFT -> learned merge ->
eval, and the merged model must load in plain transformers with exactly the base's parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import xft
from xft.artifacts import resolve_model
from xft.cli import main as cli
from xft.errors import UserError
from xft.testing import ARCHITECTURES, tiny_model, tiny_tokenizer

TIED = ("llama", "qwen2", "gemma")
# The CLI end-to-end runs take ~15-25 s each: llama in the default suite, the other tied families in the slow one.
TIED_E2E = [a if a == "llama" else pytest.param(a, marks=pytest.mark.slow) for a in TIED]
STEPS = ["--batch-size", "4", "--warmup-steps", "0", "--no-progress"]
TASKS = [{"task_id": f"Tiny/{i}", "prompt": f"def add{i}(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
          "entry_point": f"add{i}", "canonical_solution": "    return a + b\n",
          "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"} for i in range(2)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rows = [{"instruction": f"Write add{i}", "response": f"def add{i}(a, b):\n    return a + b\n"} for i in range(16)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    return root


def tied_base(root, arch: str) -> str:
    """A tiny `arch` model with tied embeddings and its tokenizer, saved under `root`."""
    model = tiny_model(arch, tie_word_embeddings=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    path = str(root / f"base-{arch}")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def plain_load(path: str) -> dict:
    """In a process that never imports xft: parameter count, tie, and logits on fixed ids."""
    code = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({path!r}).eval()
        ids = torch.arange(3, 12).reshape(1, 9)
        with torch.no_grad():
            logits = m(ids).logits
        assert "xft" not in sys.modules
        print(json.dumps({{"params": sum(p.numel() for p in m.parameters()), "class": type(m).__name__,
                          "tied": m.lm_head.weight is m.get_input_embeddings().weight,
                          "logits": logits.flatten().tolist()}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def logits_of(model) -> list[float]:
    with torch.no_grad():
        return model(torch.arange(3, 12).reshape(1, 9)).logits.flatten().tolist()


@pytest.mark.parametrize("arch", TIED_E2E)
def test_tied_model_upcycle_train_merge_eval(arch, data, tmp_path):
    base = tied_base(tmp_path, arch)
    moe0, moe, merged, ev = (str(tmp_path / n) for n in ("moe0", "moe", "merged", "eval"))
    assert cli(["upcycle", base, "--out", moe0, "--num-experts", "4", "--top-k", "3"]) == 0
    upcycled = xft.load(moe0)
    assert upcycled.lm_head.weight is upcycled.get_input_embeddings().weight
    torch.testing.assert_close(logits_of(upcycled), logits_of(xft.load(base)), rtol=0, atol=1e-5)

    assert cli(["train", moe0, "--data", str(data / "train.jsonl"), "--out", moe, "--max-steps", "2", *STEPS]) == 0
    trained = xft.load(moe)
    assert xft.is_moe(trained) and trained.lm_head.weight is trained.get_input_embeddings().weight
    assert cli(["merge", moe, "--data", str(data / "train.jsonl"), "--out", merged, "--max-steps", "2",
                *STEPS]) == 0
    assert cli(["eval", merged, "--benchmark", "humaneval", "--data", str(data / "tasks.jsonl"), "--out", ev,
                "--max-new-tokens", "4", "--device", "cpu", "--workers", "1"]) == 0
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["n_tasks"] == len(TASKS)

    dense = xft.load(merged)
    plain = plain_load(resolve_model(merged))
    base_params = sum(p.numel() for p in xft.load(base).parameters())
    assert plain["params"] == base_params and plain["tied"] and plain["class"] == type(dense).__name__
    torch.testing.assert_close(plain["logits"], logits_of(dense), rtol=0, atol=1e-5)


@pytest.mark.slow  # `xft upcycle` then `xft train` (the test above) stays in the default suite
@pytest.mark.parametrize("arch", TIED)
def test_tied_model_train_with_upcycle_then_merge_and_eval(arch, data, tmp_path):
    base = tied_base(tmp_path, arch)
    moe, merged, ev = str(tmp_path / "moe"), str(tmp_path / "merged"), str(tmp_path / "eval")
    assert cli(["train", base, "--upcycle", "--num-experts", "4", "--top-k", "3", "--data",
                str(data / "train.jsonl"), "--out", moe, "--max-steps", "2", *STEPS]) == 0
    assert xft.is_moe_checkpoint(moe)
    assert cli(["merge", moe, "--data", str(data / "train.jsonl"), "--out", merged, "--max-steps", "2",
                *STEPS]) == 0
    assert cli(["eval", merged, "--benchmark", "humaneval", "--data", str(data / "tasks.jsonl"), "--out", ev,
                "--max-new-tokens", "4", "--device", "cpu", "--workers", "1"]) == 0
    plain = plain_load(resolve_model(merged))
    assert plain["tied"] and plain["params"] == sum(p.numel() for p in xft.load(base).parameters())
    torch.testing.assert_close(plain["logits"], logits_of(xft.load(merged)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tied_moe_round_trips_and_merges_on_every_architecture(arch, tmp_path):
    base = tiny_model(arch, tie_word_embeddings=True)
    moe = xft.upcycle(tiny_model(arch, tie_word_embeddings=True), xft.UpcycleConfig(num_experts=4, top_k=3))
    moe.save_pretrained(tmp_path / "moe")
    loaded = xft.load(str(tmp_path / "moe"))
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    torch.testing.assert_close(logits_of(loaded), logits_of(base), rtol=0, atol=1e-5)
    xft.merge(loaded).save_pretrained(tmp_path / "dense")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in base.parameters())
    torch.testing.assert_close(logits_of(plain), logits_of(base), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- MoE checkpoints never pose as dense models

@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe")
    moe = xft.upcycle(tiny_model("qwen2", tie_word_embeddings=True), xft.UpcycleConfig(num_experts=4, top_k=3))
    with torch.no_grad():  # experts that differ, so a wrongly loaded FFN could not pass by accident
        for stacks in xft.expert_weights(moe).values():
            for p in stacks.values():
                p.add_(torch.randn_like(p) * 0.1)
    moe.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def test_plain_transformers_refuses_an_moe_checkpoint(moe_dir):
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({moe_dir!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "xft_moe" in out.stderr
    config = json.loads(open(os.path.join(moe_dir, "config.json")).read())
    assert config["architectures"] == ["XFTMoEForCausalLM"]  # what vLLM dispatches on: not a dense class


def test_auto_classes_load_an_moe_exactly_once_xft_is_imported(moe_dir):
    # A fresh process, as a user's script: `import xft` first, then plain transformers.
    parent, name = os.path.split(moe_dir.rstrip("/"))
    code = textwrap.dedent(f"""
        import json, torch, xft
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        auto = AutoModelForCausalLM.from_pretrained({moe_dir!r})
        with torch.no_grad():
            logits = auto(torch.arange(3, 12).reshape(1, 9)).logits.flatten().tolist()
        AutoTokenizer.from_pretrained({moe_dir!r})
        # what transformers passes on its own (download options, its private plumbing) is honoured ...
        again = AutoModelForCausalLM.from_pretrained({parent!r}, subfolder={name!r}, local_files_only=True,
                                                     force_download=False, revision="main")
        hook = AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained({moe_dir!r}))]
        later = hook.from_pretrained({moe_dir!r}, _from_auto=True, _a_later_release_adds_this=1)
        same = all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in
                   zip(auto.state_dict().values(), again.state_dict().values(), later.state_dict().values()))
        try:  # ... an argument it cannot honour is refused, not ignored
            AutoModelForCausalLM.from_pretrained({moe_dir!r}, quantization_config={{"quant_method": "gguf"}})
            refused = False
        except ValueError:
            refused = True
        print(json.dumps({{"moe": xft.is_moe(auto), "logits": logits, "refused": refused, "same": same,
                          "type": AutoConfig.from_pretrained({moe_dir!r}).model_type}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["moe"] and got["type"] == "qwen2" and got["same"] and got["refused"]
    torch.testing.assert_close(got["logits"], logits_of(xft.load(moe_dir)), rtol=0, atol=0)


def test_merged_and_dense_copies_are_written_as_the_base_type(moe_dir, tmp_path):
    dense = xft.merge(xft.load(moe_dir))
    dense.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen2" and "xft" not in config and "base_model_type" not in config


def test_checkpoints_of_the_old_format_still_load(moe_dir, tmp_path):
    import shutil

    shutil.copytree(moe_dir, tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config["model_type"], config["architectures"] = config.pop("base_model_type"), config.pop("base_architectures")
    del config["xft_note"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(logits_of(xft.load(str(tmp_path / "old"))), logits_of(xft.load(moe_dir)),
                               rtol=0, atol=0)


# ---------------------------------------------------------------- one rule for model arguments

def _commands(model: str, tmp_path, data) -> dict[str, list[str]]:
    return {
        "upcycle": ["upcycle", model, "--out", str(tmp_path / "u")],
        "train": ["train", model, "--data", str(data / "train.jsonl"), "--out", str(tmp_path / "t")],
        "merge": ["merge", model, "--method", "init", "--out", str(tmp_path / "m")],
        "eval": ["eval", model, "--benchmark", "humaneval", "--data", str(data / "tasks.jsonl"),
                 "--out", str(tmp_path / "e")],
    }


@pytest.mark.parametrize("command", ["upcycle", "train", "merge", "eval"])
@pytest.mark.parametrize("model,message", [
    ("./no_such_model", "does not exist"),
    ("no_such_bare_model_name", "is not a local directory"),
])
def test_missing_model_is_the_same_one_line_error_everywhere(command, model, message, data, tmp_path, capsys):
    code = cli(_commands(model, tmp_path, data)[command])
    err = capsys.readouterr().err
    assert code == 2 and message in err and model in err and len(err.strip().splitlines()) == 1
    assert not any((tmp_path / d).exists() for d in "utme")


def test_run_directories_are_accepted_wherever_a_model_is(data, tmp_path):
    base = tied_base(tmp_path, "llama")
    run = str(tmp_path / "run")
    assert cli(["train", base, "--data", str(data / "train.jsonl"), "--out", run, "--max-steps", "1", *STEPS]) == 0
    assert not xft.is_moe(xft.load(run))
    assert cli(["eval", run, "--benchmark", "humaneval", "--data", str(data / "tasks.jsonl"),
                "--out", str(tmp_path / "e"), "--max-new-tokens", "2", "--device", "cpu", "--workers", "1"]) == 0


def test_an_unfinished_run_is_named_as_such(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "xft_run.json").write_text("{}")
    with pytest.raises(UserError, match="unfinished xft run"):
        xft.load(str(tmp_path / "run"))


def test_outputs_follow_the_umask(data, tmp_path):
    base = tied_base(tmp_path, "llama")
    old = os.umask(0o022)
    try:
        assert cli(["upcycle", base, "--out", str(tmp_path / "moe"), "--num-experts", "4", "--top-k", "3"]) == 0
        assert cli(["train", base, "--data", str(data / "train.jsonl"), "--out", str(tmp_path / "run"),
                    "--max-steps", "1", *STEPS]) == 0
    finally:
        os.umask(old)
    for root in (tmp_path / "moe", tmp_path / "run"):
        for here, _, files in os.walk(root):
            assert os.stat(here).st_mode & 0o777 == 0o755, here
            for name in files:
                assert os.stat(os.path.join(here, name)).st_mode & 0o777 == 0o644, os.path.join(here, name)


def test_model_cards_name_the_base_only_through_xft_cards(tmp_path):
    from xft.modelcard import base_model_of, write_model_card

    hub_card = tmp_path / "downloaded"  # a Hub model's own card names *its* base, e.g. the non-instruct model
    hub_card.mkdir()
    (hub_card / "README.md").write_text("---\nbase_model: Qwen/Qwen2.5-Coder-0.5B\ntags:\n- code\n---\n# card\n")
    assert base_model_of(str(hub_card)) == str(hub_card)
    ours = tmp_path / "ours"
    ours.mkdir()
    write_model_card(str(ours), kind="moe", base_model="Qwen/Qwen2.5-Coder-0.5B-Instruct")
    assert base_model_of(str(ours)) == "Qwen/Qwen2.5-Coder-0.5B-Instruct"


def test_merged_model_is_servable_with_the_bases_files(data, tmp_path):
    """Tokenizer and generation-config files travel byte for byte base -> MoE -> SFT -> merge; config has both
    `dtype` and `torch_dtype` (older tools read the latter)."""
    from transformers import GenerationConfig

    base = tied_base(tmp_path, "qwen2")
    GenerationConfig(max_new_tokens=7, do_sample=False, eos_token_id=2).save_pretrained(base)
    moe0, moe, merged = (str(tmp_path / n) for n in ("moe0", "moe", "merged"))
    assert cli(["upcycle", base, "--out", moe0, "--num-experts", "4", "--top-k", "3"]) == 0
    assert cli(["train", moe0, "--data", str(data / "train.jsonl"), "--out", moe, "--max-steps", "1", *STEPS]) == 0
    assert cli(["merge", moe, "--method", "init", "--out", merged, "--no-progress"]) == 0
    final = resolve_model(merged)
    names = [n for n in os.listdir(base) if n.startswith(("tokenizer", "special_tokens", "generation_config"))]
    assert "tokenizer.json" in names and "generation_config.json" in names
    for name in names:
        assert open(os.path.join(base, name), "rb").read() == open(os.path.join(final, name), "rb").read(), name
    config = json.loads(open(os.path.join(final, "config.json")).read())
    assert config["torch_dtype"] == config["dtype"] == "float32"
