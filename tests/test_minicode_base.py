"""MiniCode base model: tokenizer, config, pretraining through xft.train, caching, reproducibility."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

import xft
from xft.errors import UserError
from xft.minicode import base
from xft.minicode.base import BUDGETS, build_base_model, train_tokenizer


def _weights_hash(path: str) -> str:
    return hashlib.sha256((Path(path) / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return build_base_model(tmp_path_factory.mktemp("base") / "model", seed=0, budget="test")


def test_tokenizer_round_trips():
    tok = train_tokenizer(["def f(xs):\n    return [x for x in xs if x > 3]\n"] * 20, vocab_size=300)
    text = "def g(s):\n    return s.upper()[::-1]  # é ✓\n"
    assert tok.decode(tok(text).input_ids) == text  # byte level: anything round-trips
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id] == [0, 1, 2]


def test_base_tokenizer_knows_the_template(tiny_base):
    from transformers import AutoTokenizer

    from xft.data import format_prompt

    tok = AutoTokenizer.from_pretrained(tiny_base)
    prompt = format_prompt("Write a Python function `f(xs)` that returns the even numbers in `xs`.")
    assert len(tok(prompt).input_ids) < len(prompt) / 2.5  # the template and the wording are merged tokens


def test_build_loads_and_generates(tiny_base):
    model = xft.load(tiny_base)
    assert model.config.model_type == "llama" and not xft.is_moe(model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert model.config.vocab_size == len(tok)
    ids = tok("def f(n):\n", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] <= ids.shape[1] + 4
    assert (Path(tiny_base) / "minicode_base.json").is_file()


def test_existing_model_is_reused(tiny_base):
    stamp = (Path(tiny_base) / "model.safetensors").stat().st_mtime_ns
    assert build_base_model(tiny_base, seed=0, budget="test") == str(tiny_base)
    assert (Path(tiny_base) / "model.safetensors").stat().st_mtime_ns == stamp


def test_cache_dir_and_key(monkeypatch, tmp_path):
    monkeypatch.setenv("XFT_CACHE_DIR", str(tmp_path))
    assert base.cache_root() == tmp_path
    k = base.cache_key(BUDGETS["demo"], 0)
    assert k == base.cache_key(BUDGETS["demo"], 0)
    assert k != base.cache_key(BUDGETS["demo"], 1) and k != base.cache_key(BUDGETS["full"], 0)


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError):
        build_base_model(tmp_path / "m", budget="huge")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError):
        build_base_model(tmp_path / "busy", budget="test")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"


def test_demo_config_is_a_few_m_params_or_less():
    from transformers import LlamaForCausalLM

    budget = BUDGETS["demo"]
    model = LlamaForCausalLM(base.model_config(budget, budget.vocab_size))
    n = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n < 5e6


@pytest.mark.slow
def test_build_is_bit_for_bit_reproducible(tmp_path, tiny_base):
    again = build_base_model(tmp_path / "again", seed=0, budget="test")
    assert _weights_hash(again) == _weights_hash(tiny_base)
    other = build_base_model(tmp_path / "other", seed=1, budget="test")
    assert _weights_hash(other) != _weights_hash(tiny_base)


def test_shipped_model_is_current_and_loads():
    """The shipped model is what this MiniCode's demo budget builds (else rebuild it: see xft.minicode.base)."""
    import json

    from transformers import AutoTokenizer

    shipped = base.shipped_model("demo", 0)
    assert shipped is not None, "assets/minicode-base is stale: rebuild with python -m xft.minicode.base"
    assert build_base_model(None, seed=0, budget="demo") == shipped
    assert base.shipped_model("demo", 1) is None and base.shipped_model("test", 0) is None
    record = json.loads((Path(shipped) / base.RECORD_FILE).read_text())
    assert record["threads"] == 1
    model, tok = xft.load(shipped), AutoTokenizer.from_pretrained(shipped)
    budget = BUDGETS["demo"]
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (budget.hidden_size, budget.num_layers)
    assert model.config.vocab_size == len(tok) == budget.vocab_size
    text = "def f(xs):\n    return [x for x in xs if x > 3]\n"
    assert tok.decode(tok(text).input_ids) == text


@pytest.mark.slow
def test_demo_budget_rebuilds_the_shipped_model_bit_for_bit(tmp_path):
    """The reproduce command rebuilds the shipped weights exactly (same torch version, one thread)."""
    import json
    import subprocess
    import sys

    import torch

    t0 = time.perf_counter()
    out = tmp_path / "demo"
    subprocess.run([sys.executable, "-m", "xft.minicode.base", "--out", str(out), "--threads", "1"], check=True)
    print(f"demo base model rebuilt in {time.perf_counter() - t0:.0f} s")
    shipped = Path(base.SHIPPED_DIR)
    record = json.loads((shipped / base.RECORD_FILE).read_text())
    assert (out / "tokenizer.json").read_text() == (shipped / "tokenizer.json").read_text()
    if record["torch"] != torch.__version__:
        pytest.skip(f"shipped model built with torch {record['torch']}; float results may differ in {torch.__version__}")
    assert _weights_hash(out) == _weights_hash(shipped)
