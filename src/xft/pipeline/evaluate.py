"""The evaluation stage: greedy generation with a model, then the benchmark's tests in xft.eval's sandbox.

Writes into `out`: `samples.jsonl` (one generation per task) and
`results.json` (pass@1, per-task verdicts, breakdowns by MiniCode family and
generalization kind, the sandbox level that ran). Prompts use the paper's
Magicoder template; the program is the first fenced code block of the answer
(or the whole answer when there is none).
"""

from __future__ import annotations

import json
import os
import re
import time

import torch

_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.S)


def extract_code(text: str) -> str:
    """The first fenced code block of a model's answer (an unclosed one runs to the end), else the text."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


def instruction_for(task, prompt_kind: str) -> str:
    """The instruction a chat model gets for `task` (code benchmarks: complete the given function)."""
    if prompt_kind == "instruction":
        return task.prompt
    return ("Complete the following Python function:\n```python\n" + task.prompt.strip() + "\n```")


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             progress=None) -> list[str]:
    """Greedy completions of `prompts` (left-padded batches, longest first for less padding)."""
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in (progress(batches) if progress else batches):
        enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, text in zip(batch, texts):
            outputs[i] = text
    return outputs


def _breakdown(rows: list[dict], key: str) -> dict[str, float]:
    groups: dict[str, list[bool]] = {}
    for row in rows:
        if row.get(key):
            groups.setdefault(row[key], []).append(row["passed"])
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def evaluate_model(model_path: str, benchmark: str, out: str, *, limit: int | None = None,
                   max_new_tokens: int = 384, batch_size: int = 16, workers: int | None = None,
                   data: str | None = None, device: str = "cpu", progress: bool = False,
                   label: str | None = None) -> dict:
    """Greedy pass@1 of the model at `model_path` on `benchmark`; writes samples and results.json to `out`."""
    from transformers import AutoTokenizer
    from tqdm.auto import tqdm

    import xft
    from xft.data import format_prompt
    from xft.eval.benchmarks import load_benchmark
    from xft.eval.execute import check_samples
    from xft.eval.sandbox import Sandbox

    bench = load_benchmark(benchmark, data)
    tasks = list(bench.tasks.values())[:limit] if limit else list(bench.tasks.values())
    extra = _task_fields(benchmark, data, [t.task_id for t in tasks])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = xft.load(model_path, device=device).eval()
    t0 = time.perf_counter()
    prompts = [format_prompt(instruction_for(t, bench.prompt_kind)) for t in tasks]
    bar = (lambda it: tqdm(it, desc=f"generate {label or ''}".strip(), unit="batch", leave=False)) \
        if progress else None
    answers = generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress=bar)
    gen_seconds = time.perf_counter() - t0
    del model
    samples = [{"task_id": t.task_id, "solution": extract_code(a), "raw": a} for t, a in zip(tasks, answers)]
    sandbox = Sandbox()
    t1 = time.perf_counter()
    verdicts = check_samples(bench, [{"task_id": s["task_id"], "solution": s["solution"]} for s in samples],
                             sandbox=sandbox, workers=workers)
    rows = [{"task_id": v.task_id, "passed": v.passed, "status": v.status, **extra.get(v.task_id, {})}
            for v in verdicts]
    results = {
        "benchmark": benchmark, "model": model_path, "label": label, "n_tasks": len(rows),
        "pass@1": sum(r["passed"] for r in rows) / max(len(rows), 1),
        "decoding": {"greedy": True, "max_new_tokens": max_new_tokens, "template": "magicoder"},
        "by_family": _breakdown(rows, "family"), "by_generalization": _breakdown(rows, "generalization"),
        "sandbox": sandbox.describe(), "seconds": {"generate": round(gen_seconds, 1),
                                                   "execute": round(time.perf_counter() - t1, 1)},
        "tasks": rows,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "samples.jsonl"), "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def _task_fields(benchmark: str, data: str | None, ids: list[str]) -> dict[str, dict]:
    """MiniCode's per-task `family` / `generalization` labels (other benchmarks: none)."""
    if benchmark != "minicode" or data is not None:
        return {}
    from xft.minicode.benchmark import load_tasks

    wanted = set(ids)
    return {t["task_id"]: {"family": t["family"], "generalization": t["generalization"]}
            for t in load_tasks("eval") if t["task_id"] in wanted}
