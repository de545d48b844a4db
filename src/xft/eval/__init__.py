"""Evaluation: generate answers, run them sandboxed against benchmark tests, score pass@k.

    from xft.eval import load_benchmark, check_samples
    bench = load_benchmark("humaneval")
    verdicts = check_samples(bench, [{"task_id": "HumanEval/0", "completion": "    return False\n"}])

Modules, one concept each: `benchmarks` (registry and loaders), `prompts`,
`generate` (HF / vLLM decoding), `sanitize` (code extraction), `sandbox` (isolated
processes; `_harness` runs inside them), `groundtruth` (expected outputs),
`execute` (tests in parallel), `metrics` (pass@k), `report` (files, summary),
`cli` (`xft eval`).
"""

from xft.eval.benchmarks import Benchmark, Task, load_benchmark
from xft.eval.execute import TimeLimits, Verdict, check_samples
from xft.eval.metrics import mean_pass_at_k, pass_at_k
from xft.eval.sandbox import Limits, Sandbox, detect_level
from xft.eval.sanitize import sanitize

__all__ = ["Benchmark", "Limits", "Sandbox", "Task", "TimeLimits", "Verdict", "check_samples",
           "detect_level", "load_benchmark", "mean_pass_at_k", "pass_at_k", "sanitize"]
