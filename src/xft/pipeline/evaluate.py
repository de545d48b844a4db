"""The evaluation stage: one `xft.eval.evaluate` call per model and benchmark.

Greedy decoding with the template the models were trained with (the paper's
Magicoder template by default; `chat`: the tokenizer's own). The base model is
asked the same way on instruction benchmarks (MiniCode), and gets the plain
code prompt to continue on code benchmarks (HumanEval, MBPP), the fair way to
score a model that was never instruction-tuned. Writes `samples.jsonl` and
`results.json` into `out` exactly as `xft eval` does (for MiniCode,
results.json also holds pass@1 by problem family and by generalization kind).
"""

from __future__ import annotations


def evaluate_model(model_path: str, benchmark: str, out: str, *, max_new_tokens: int, batch_size: int,
                   limit: int | None = None, workers: int | None = None,
                   data: str | None = None, device: str = "cpu", progress: bool = False,
                   label: str | None = None, base_model: bool = False, template: str = "magicoder",
                   expert_impl: str | None = None, sandbox: str = "auto") -> dict:
    """Greedy pass@1 of the model at `model_path` on `benchmark`; writes samples and results.json to `out`."""
    from xft.eval import evaluate, load_benchmark
    from xft.eval.evaluate import prompt_style_for
    from xft.config import DecodingConfig

    bench = load_benchmark(benchmark, data)
    decoding = DecodingConfig(prompt_style=prompt_style_for(bench, base_model), template=template,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, expert_impl=expert_impl)
    return evaluate(model_path, bench, out, decoding=decoding, limit=limit, workers=workers, device=device,
                    progress=progress, label=label, sandbox=sandbox).results
