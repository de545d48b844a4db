"""The evaluation stage: `xft.eval` (generation, sandboxed tests, results files) for one model.

Greedy decoding with the template the models were trained with (the
paper's Magicoder template by default; `chat`: the tokenizer's own). The base model is asked the same way on instruction benchmarks
(MiniCode), and gets the plain code prompt to continue on code benchmarks
(HumanEval, MBPP), the fair way to score a model that was never
instruction-tuned. Writes `samples.jsonl` and `results.json` into `out`
(as `xft eval` does); for MiniCode, results.json also holds pass@1 by problem
family and by generalization kind.
"""

from __future__ import annotations

import dataclasses
import sys
import time


def _progress(desc: str):
    from tqdm.auto import tqdm

    return lambda it, total=None: tqdm(it, desc=desc, total=total, file=sys.stderr, leave=False,
                                       dynamic_ncols=True)


def _breakdown(results: dict, labels: dict[str, dict], key: str) -> dict[str, float]:
    groups: dict[str, list[bool]] = {}
    for task_id, entry in results["tasks"].items():
        if task_id in labels:
            groups.setdefault(labels[task_id][key], []).append(entry["passed"])
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def _minicode_labels(ids: list[str]) -> dict[str, dict]:
    from xft.minicode.benchmark import load_tasks

    wanted = set(ids)
    return {t["task_id"]: {"family": t["family"], "generalization": t["generalization"]}
            for t in load_tasks("eval") if t["task_id"] in wanted}


def evaluate_model(model_path: str, benchmark: str, out: str, *, limit: int | None = None,
                   max_new_tokens: int = 512, batch_size: int = 16, workers: int | None = None,
                   data: str | None = None, device: str = "cpu", progress: bool = False,
                   label: str | None = None, base_model: bool = False, template: str = "magicoder") -> dict:
    """Greedy pass@1 of the model at `model_path` on `benchmark`; writes samples and results.json to `out`."""
    from xft.eval import Sandbox, check_samples, load_benchmark
    from xft.eval import generate, report

    bench = load_benchmark(benchmark, data)
    style = "completion" if base_model and bench.prompt_kind == "code" else "instruction"
    cfg = generate.DecodingConfig(prompt_style=style, template=template, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size)
    task_ids = list(bench.tasks)[:limit] if limit else list(bench.tasks)
    sandbox = Sandbox()
    t0 = time.monotonic()
    samples = generate.generate_samples(bench, model_path, cfg, device=device, task_ids=task_ids,
                                        progress=_progress(f"generate {label or ''}") if progress else None)
    t1 = time.monotonic()
    verdicts = check_samples(bench, samples, sandbox, workers=workers,
                             progress=_progress(f"test {label or ''}") if progress else None)
    settings = {"model": model_path, "label": label, "decoding": dataclasses.asdict(cfg),
                "sandbox": sandbox.describe(),
                "seconds": {"generation": round(t1 - t0, 2), "execution": round(time.monotonic() - t1, 2)}}
    results = report.build_results(bench, samples, verdicts, settings=settings)
    if benchmark == "minicode" and data is None:
        labels = _minicode_labels(task_ids)
        results["by_family"] = _breakdown(results, labels, "family")
        results["by_generalization"] = _breakdown(results, labels, "generalization")
    report.write_outputs(out, samples, results)
    return results
