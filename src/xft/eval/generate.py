"""Generate benchmark answers with a model: `transformers` `generate`, or vLLM.

Guarantees (HF backend):
* Batched with left padding and the KV cache; prompts are sorted by length so a
  batch wastes little padding. Generation stops at the model's EOS or at a stop
  string (the text is then cut at the earliest stop string).
* Results do not depend on the batch size beyond floating-point ties: greedy
  decoding is deterministic, and sampling draws each (task, sample) row from its
  own random generator seeded from (seed, task id, sample index), using the
  Gumbel-max trick (`argmax(logits / T + Gumbel noise)` over the top-p set is an
  exact draw from the tempered, top-p-filtered distribution).
* Dense and MoE checkpoints load through `xft.load`.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Callable, Iterable

import torch

from xft.artifacts import resolve_model
from xft.config import DecodingConfig
from xft.data import check_chat_template, get_template
from xft.errors import UserError
from xft.eval.benchmarks import Benchmark
from xft.eval.prompts import build_prompt, response_prefix, stop_strings
from xft.eval.sanitize import sanitize


def row_seed(seed: int, task_id: str, index: int) -> int:
    """A 63-bit seed for one (task, sample) row, independent of batching."""
    digest = hashlib.sha256(f"{seed}\0{task_id}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class RowSampler:
    """Logits processor turning greedy decoding into per-row seeded sampling.

    scores [batch, vocab] -> tempered, top-p-filtered logits + Gumbel noise drawn
    from row i's own generator; the argmax is then a sample."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            outside = probs.cumsum(dim=-1) - probs > self.top_p  # mass before it already >= p
            sorted_logits = sorted_logits.masked_fill(outside, -math.inf)
            logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
        vocab = logits.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64)
                               for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-300, 1.0 - 1e-16)))
        return logits + gumbel.to(device=logits.device, dtype=logits.dtype)


def load_model(path: str, dtype: str | None = None, device: str | None = None, expert_impl: str | None = None):
    """(model, tokenizer) from a model directory, a finished xft run or a hub id; dense or xft MoE (`expert_impl`:
    its kernel instead of the recorded one)."""
    import xft
    from xft.checkpoint import load_tokenizer

    path = resolve_model(path)
    try:
        tokenizer = load_tokenizer(path)  # checks config.json first (a field of the wrong type: one line)
        model = xft.load(path, dtype=dtype, device=device, expert_impl=expert_impl)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {path}: {str(e).splitlines()[0]}") from None
    _pad_left(tokenizer)
    return model.eval(), tokenizer


def _pad_left(tokenizer) -> None:
    """Batched generation pads on the left (the new tokens then line up at the end of every row)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to the earliest stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate_hf(model, tokenizer, prompts: list[str], seeds: list[int], stops: list[str],
                cfg: DecodingConfig, progress: Callable[[Iterable, int], Iterable] | None = None) -> list[str]:
    """Generated text (prompt excluded, not yet cut at stops) for each prompt, in order."""
    # A chat template's text may already start with BOS; the tokenizer must not add a second one.
    special = not (tokenizer.bos_token and prompts and prompts[0].startswith(tokenizer.bos_token))
    lengths = [len(tokenizer(p, add_special_tokens=special).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    device = next(model.parameters()).device
    texts: list[str] = [""] * len(prompts)
    for batch in (progress(batches, len(batches)) if progress else batches):
        enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                        add_special_tokens=special).to(device)
        extra = {}
        if cfg.temperature > 0:
            extra["logits_processor"] = [RowSampler([seeds[i] for i in batch], cfg.temperature,
                                                    cfg.top_p)]
        out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                             stop_strings=stops or None, tokenizer=tokenizer,
                             pad_token_id=tokenizer.pad_token_id, use_cache=True,
                             temperature=None, top_p=None, top_k=None, **extra)
        new = out[:, enc["input_ids"].shape[1]:]
        for row, i in enumerate(batch):
            texts[i] = tokenizer.decode(new[row], skip_special_tokens=True)
    return texts


def generate_vllm(model_path: str, prompts: list[str], seeds: list[int], stops: list[str],
                  cfg: DecodingConfig, dtype: str | None = None) -> list[str]:
    """The same contract as `generate_hf`, on vLLM (GPU; dense checkpoints only)."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise UserError("--backend vllm needs vLLM (GPU): pip install 'xft[vllm]'") from None
    import xft

    if xft.is_moe_checkpoint(model_path):
        raise UserError("vLLM cannot load an xft MoE checkpoint: use --backend hf, or merge it first")
    llm = LLM(model=model_path, dtype=dtype or "auto", seed=cfg.seed)
    params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p if cfg.temperature else 1.0,
                             max_tokens=cfg.max_new_tokens, stop=stops, seed=s) for s in seeds]
    tokenizer = llm.get_tokenizer()
    if tokenizer.bos_token and prompts and prompts[0].startswith(tokenizer.bos_token):
        # A chat template's text already starts with BOS: give token ids, so none is added (as generate_hf).
        prompts = [{"prompt_token_ids": tokenizer(p, add_special_tokens=False).input_ids} for p in prompts]
    return [o.outputs[0].text for o in llm.generate(prompts, params)]


def _imports_of(prompt: str) -> str:
    return "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))


def make_sample(bench: Benchmark, task_id: str, prompt_style: str, text: str, stops: list[str]) -> dict:
    """One samples.jsonl record from generated text: raw answer, completion, tested solution."""
    task = bench.tasks[task_id]
    prefix = response_prefix(bench, prompt_style)
    completion = cut_at_stop(text, stops)
    if prompt_style == "completion":
        solution = task.prompt + completion
    else:
        solution = sanitize(prefix + completion + ("\n```" if prefix else ""), task.entry_point)
        if bench.prompt_kind == "code":  # e.g. `from typing import List` the answer may omit
            solution = "\n".join(filter(None, [_imports_of(task.prompt), solution]))
    return {"task_id": task_id, "solution": solution, "completion": completion, "raw": prefix + text}


def _prompts(bench: Benchmark, rows: list[tuple[str, int]], cfg: DecodingConfig, tokenizer) -> list[str]:
    if tokenizer is not None:
        check_chat_template(tokenizer, cfg.template)
    return [build_prompt(bench, bench.tasks[t], cfg.prompt_style, cfg.template, tokenizer) for t, _ in rows]


def _chat_tokenizer(model_path: str, cfg: DecodingConfig):
    """The tokenizer, when the prompts need its chat template (vLLM loads its own for generation)."""
    if cfg.prompt_style != "instruction" or not get_template(cfg.template).from_tokenizer:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def generate_samples(bench: Benchmark, model, cfg: DecodingConfig, *, dtype: str | None = None,
                     device: str | None = None, task_ids: list[str] | None = None,
                     progress: Callable[[Iterable, int], Iterable] | None = None) -> list[dict]:
    """n_samples answers per task, as samples.jsonl records in (task, sample) order.

    `model`: a model directory, finished xft run or Hub id (loaded here, on `device` in `dtype`), or a
    loaded `(model, tokenizer)` pair (hf backend; used where it is, its tokenizer set to left padding).
    """
    cfg.validate()
    ids = task_ids or list(bench.tasks)
    rows = [(t, k) for t in ids for k in range(cfg.n_samples)]
    seeds = [row_seed(cfg.seed, t, k) for t, k in rows]
    stops = stop_strings(bench, cfg.prompt_style)
    is_path = isinstance(model, (str, os.PathLike))
    if cfg.backend == "vllm":
        if not is_path:
            raise UserError("--backend vllm loads the model itself: give a model path, not a loaded model")
        model_path = resolve_model(model)  # one rule for both backends: model dir, finished run, Hub id
        prompts = _prompts(bench, rows, cfg, _chat_tokenizer(model_path, cfg))
        texts = generate_vllm(model_path, prompts, seeds, stops, cfg, dtype)
    else:
        if is_path:
            model, tokenizer = load_model(model, dtype, device, cfg.expert_impl)  # resolves the path as above
        else:
            model, tokenizer = model
            _pad_left(tokenizer)
        prompts = _prompts(bench, rows, cfg, tokenizer)
        texts = generate_hf(model.eval(), tokenizer, prompts, seeds, stops, cfg, progress)
    return [make_sample(bench, t, cfg.prompt_style, text, stops) for (t, _), text in zip(rows, texts)]
