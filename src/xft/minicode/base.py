"""MiniCode's tiny base model: its own tokenizer, a few-M-parameter Llama, pretrained on plain code.

`build_base_model(out_dir=None, seed=0, budget="demo")` returns a directory
loadable with `xft.load` / `AutoModelForCausalLM.from_pretrained`, holding the
pretrained dense model and its tokenizer. Steps:

1. write MiniCode's `pretrain` split (plain Python, no instructions) as JSONL;
2. train a byte-level BPE tokenizer (`tokenizers`) on it, plus the training
   instructions and the prompt template, so requests also tokenize compactly
   (the tokenizer sees no eval text);
3. build a random-init `LlamaConfig` model from `seed`;
4. pretrain it with the project's own training code (`xft.train.train_sft`,
   `kind="text"`: loss on every token).

Reproducibility: everything is a function of (budget, seed, xft version);
on CPU with the same thread count and library versions the weights come out
bit for bit identical. Floating-point reduction order can differ across
thread counts, BLAS builds and accelerators, so the cache key records the
torch version and thread count.

Shipped model: the package carries the "demo"-budget, seed-0 model
(`xft/assets/minicode-base`, 3.7 MB), built on one thread with the torch
version recorded in its `minicode_base.json`; with `out_dir=None` that budget
and seed use it instead of building (saves ~1.5 min of `xft demo`). Rebuild it
bit for bit with

    python -m xft.minicode.base --out DIR --threads 1

Caching: with `out_dir=None` any other model is built once under
the xft cache (`xft.artifacts.cache_root()`) in `minicode-base-<hash>` and
reused; the directory appears only complete (built aside, then renamed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from xft.artifacts import atomic_dir, cache_root
from xft.errors import UserError

GENERATOR_VERSION = 2  # bump when MiniCode's generated text changes (and rebuild the shipped model)
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "minicode-base"
RECORD_FILE = "minicode_base.json"  # what a built model was built from (budget, seed, versions)
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>")  # ids 0..3, as xft.testing.tiny_config


@dataclass(frozen=True)
class BaseBudget:
    """Size of the base model and of its pretraining (one source of truth for the cache key)."""

    vocab_size: int = 1024  # BPE vocabulary, special tokens included
    hidden_size: int = 128
    intermediate_size: int = 256  # FFN width: what upcycling copies into experts
    num_layers: int = 4
    num_heads: int = 4
    max_length: int = 256  # tokens per pretraining example (and model context)
    pretrain_records: int = 10000  # records of MiniCode's pretrain split
    tokenizer_instructions: int = 2000  # training instructions the tokenizer also sees
    steps: int = 300  # optimizer steps
    batch_size: int = 32  # examples per step
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.0


# Named budgets: "demo" fits `xft demo`'s time budget on 2 CPU cores; "test" is for the test suite.
BUDGETS: dict[str, BaseBudget] = {
    "demo": BaseBudget(),
    "test": BaseBudget(vocab_size=384, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       max_length=128, pretrain_records=200, tokenizer_instructions=50, steps=4, batch_size=8,
                       warmup_steps=1),
    "full": BaseBudget(steps=2000),
}


def resolve_budget(budget: str | BaseBudget) -> BaseBudget:
    """A `BaseBudget` from a name in `BUDGETS` or a budget itself."""
    if isinstance(budget, BaseBudget):
        return budget
    if budget not in BUDGETS:
        raise UserError(f"unknown MiniCode base-model budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    return BUDGETS[budget]


def build_inputs(budget: BaseBudget, seed: int) -> dict:
    """Everything the built weights depend on: budget, seed, generator, xft and torch versions, threads."""
    import torch

    import xft

    return {"budget": asdict(budget), "seed": seed, "generator": GENERATOR_VERSION, "xft": xft.__version__,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def cache_key(budget: BaseBudget, seed: int) -> str:
    """Short hash of `build_inputs`."""
    return hashlib.sha256(json.dumps(build_inputs(budget, seed), sort_keys=True).encode()).hexdigest()[:12]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts` (pad=0, bos=1, eos=2, unk=3).

    The project's one tokenizer trainer: MiniCode's base model and `xft.testing.tiny_tokenizer` use it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    # Byte level, so any text (model output included) round-trips; no prefix space, so "def" at the
    # start of a response tokenizes as it does inside the pretraining code.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|eos|>", unk_token="<|unk|>")


def context_length(budget: BaseBudget) -> int:
    """Positions the model supports: room for prompts longer than the pretraining examples."""
    return max(512, budget.max_length)


def model_config(budget: BaseBudget, vocab_size: int):
    """The tiny Llama's `LlamaConfig` (random init is seeded by the caller)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=budget.hidden_size,
                       intermediate_size=budget.intermediate_size, num_hidden_layers=budget.num_layers,
                       num_attention_heads=budget.num_heads, num_key_value_heads=budget.num_heads,
                       max_position_embeddings=context_length(budget), rope_theta=10000.0,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _tokenizer_corpus(budget: BaseBudget, seed: int, pretrain: list[str]) -> list[str]:
    from xft.data import TEMPLATES
    from xft.minicode.phrasing import format_response
    from xft.minicode.splits import train_problems

    template = TEMPLATES["magicoder"]
    problems = train_problems(seed, budget.tokenizer_instructions)
    # Whole training examples (prompt + fenced answer): the template and the fences get their own tokens.
    examples = [template.system + template.turn.format(instruction=p.instruction) + format_response(p.solution)
                for p in problems]
    return pretrain + examples


def prepare_init(work: Path, budget: BaseBudget, seed: int) -> tuple[Path, Path]:
    """Write the pretraining data and the random-init model + tokenizer into `work`.

    Returns (data path, init model directory).
    """
    import torch
    from transformers import LlamaForCausalLM

    from xft.minicode.splits import pretrain_texts

    texts = pretrain_texts(seed, budget.pretrain_records)
    data = work / "pretrain.jsonl"
    with data.open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    tokenizer = train_tokenizer(_tokenizer_corpus(budget, seed, texts), budget.vocab_size)
    tokenizer.model_max_length = context_length(budget)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(budget, len(tokenizer)))
    init = work / "init"
    model.save_pretrained(init)
    tokenizer.save_pretrained(init)
    return data, init


def pretrain(init: Path, data: Path, out: Path, budget: BaseBudget, seed: int, progress: bool = False) -> Path:
    """Pretrain the model in `init` on `data` with `xft.training` (loss on every token); returns the model's dir."""
    from xft.config import DataConfig, SFTConfig
    from xft.training import train_sft

    config = SFTConfig(model=str(init), data=DataConfig(path=str(data), kind="text", max_length=budget.max_length),
                       out=str(out),
                       max_steps=budget.steps, lr=budget.lr, warmup_steps=budget.warmup_steps,
                       lr_scheduler="cosine", optimizer="adamw_torch", weight_decay=budget.weight_decay,
                       max_grad_norm=1.0, batch_size=budget.batch_size, micro_batch_size=budget.batch_size,
                       seed=seed, precision="fp32", save_steps=10 ** 9, logging_steps=50, progress=progress)
    return Path(train_sft(config))


def build_record(budget: BaseBudget, seed: int) -> dict:
    """What a model built now from (budget, seed) depends on, and its cache key: its minicode_base.json."""
    return {**build_inputs(budget, seed), "cache_key": cache_key(budget, seed)}


def shipped_model(budget: str | BaseBudget = "demo", seed: int = 0) -> str | None:
    """The shipped model's directory if it is what (budget, seed) builds with this MiniCode, else None."""
    try:
        with (SHIPPED_DIR / RECORD_FILE).open() as f:
            record = json.load(f)
    except OSError:
        return None
    same = (record.get("budget") == asdict(resolve_budget(budget)) and record.get("seed") == seed
            and record.get("generator") == GENERATOR_VERSION)
    return str(SHIPPED_DIR) if same else None


def build_base_model(out_dir: str | os.PathLike | None = None, seed: int = 0, budget: str | BaseBudget = "demo",
                     progress: bool = False, use_shipped: bool = True) -> str:
    """The pretrained MiniCode base model (dense Llama + tokenizer); returns its directory.

    With `out_dir=None` it is the shipped model when that is the one asked for
    (and `use_shipped`), else cached (see module docstring) and built only on
    first use; with an `out_dir` it is built there unless a finished model is
    already in it. `budget`: a name in `BUDGETS` or a `BaseBudget`.
    """
    b = resolve_budget(budget)
    if out_dir is None and use_shipped and (shipped := shipped_model(b, seed)) is not None:
        return shipped
    target = Path(out_dir) if out_dir is not None else cache_root() / f"minicode-base-{cache_key(b, seed)}"
    if (target / "config.json").is_file():
        return str(target)
    if target.exists() and any(target.iterdir()):
        raise UserError(f"{target} exists and does not hold a finished model; choose an empty or new directory")
    with tempfile.TemporaryDirectory(prefix="xft-minicode-base-") as work, atomic_dir(str(target)) as model:
        data, init = prepare_init(Path(work), b, seed)
        pretrain(init, data, Path(model), b, seed, progress=progress)
        with (Path(model) / RECORD_FILE).open("w") as f:
            json.dump(build_record(b, seed), f, indent=1)
    return str(target)


def with_steps(budget: str | BaseBudget, steps: int) -> BaseBudget:
    """`budget` with another number of pretraining steps (for quick experiments)."""
    return replace(resolve_budget(budget), steps=steps)


def main(argv: list[str] | None = None) -> int:
    """`python -m xft.minicode.base --out DIR`: build the base model (e.g. to reproduce the shipped one)."""
    p = argparse.ArgumentParser(prog="python -m xft.minicode.base", description=main.__doc__)
    p.add_argument("--out", required=True, help="new or empty directory for the model")
    p.add_argument("--budget", default="demo", choices=list(BUDGETS), help="size and pretraining budget")
    p.add_argument("--seed", type=int, default=0, help="pretraining seed")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (the shipped model was built with 1; other counts change the last bits)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    try:
        path = build_base_model(args.out, seed=args.seed, budget=args.budget, progress=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
