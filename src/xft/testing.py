"""Tiny models and tokenizers built locally, for tests, benchmarks and offline examples.

Nothing here downloads anything: configs come from `transformers` config
classes with random weights (a few hundred KB), tokenizers are trained on the
spot with `tokenizers` (`xft.minicode.base.train_tokenizer`, the one trainer).
Used by the test suite and by documentation examples.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from xft.minicode.base import train_tokenizer  # the one tokenizer trainer (MiniCode's base model uses it too)

# Architectures the core library is checked on (issue: "at minimum").
ARCHITECTURES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "phi", "gpt2", "gpt_neox", "starcoder2", "stablelm",
)
# Checked beyond that list: same-shaped FFNs, and FFNs only the generic expert path runs (phi3: fused
# gate_up_proj; bloom and mpt: the FFN takes the residual as a second argument).
MORE_ARCHITECTURES = ("falcon", "olmo2", "granite", "cohere", "gpt_bigcode", "phi3", "bloom", "mpt")


def tiny_config(arch: str = "llama", vocab_size: int = 384, hidden: int = 32, layers: int = 2,
                intermediate: int = 64, heads: int = 4, **overrides):
    """A small random-init config of `arch` (a `transformers` model_type)."""
    kw = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
              num_attention_heads=heads, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if arch == "gpt2":
        kw.update(n_inner=intermediate, n_positions=512)
        kw.pop("max_position_embeddings")
    else:
        kw.update(intermediate_size=intermediate)
    if arch in ("llama", "mistral", "qwen2", "qwen3", "gemma", "starcoder2", "stablelm", "phi"):
        kw.update(num_key_value_heads=max(1, heads // 2))
    if arch in ("qwen3", "gemma"):
        kw.update(head_dim=hidden // heads)
    if arch == "gpt_neox":
        kw.update(rotary_pct=0.5)
    kw.update(overrides)
    config = AutoConfig.for_model(arch, **kw)
    if hasattr(config, "attn_implementation"):
        pass
    config._attn_implementation = "eager"
    return config


def tiny_model(arch: str = "llama", seed: int = 0, **config_overrides):
    """A tiny random-weight causal LM of `arch` in eval mode (fp32, CPU)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **config_overrides))
    return model.eval()


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus` (default: a few lines of Python).

    Byte-level, so any text round-trips; special tokens pad=0, bos=1, eos=2, unk=3,
    matching `tiny_config`.
    """
    if corpus is None:
        corpus = [
            "def add(a, b):\n    return a + b\n",
            "def is_even(n):\n    return n % 2 == 0\n",
            "for i in range(10):\n    print(i * i)\n",
            "Write a function that returns the sum of a list of numbers.\n",
        ] * 4
    return train_tokenizer(corpus, vocab_size)
