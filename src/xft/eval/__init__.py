"""Evaluation: generate answers, run them sandboxed against benchmark tests, score pass@k.

    from xft.eval import load_benchmark, check_samples
    bench = load_benchmark("humaneval")
    verdicts = check_samples(bench, [{"task_id": "HumanEval/0", "completion": "    return False\n"}])
    ev = evaluate("path/to/model", "humaneval", "out/he")   # generate, test, score, write the files

Modules, one concept each: `benchmarks` (registry and loaders), `prompts`,
`generate` (HF / vLLM decoding), `sanitize` (code extraction), `sandbox` (isolated
processes; `_harness` runs inside them), `plain` (the only data that leaves the
sandbox), `judge` (verdicts, outside the sandbox) with `oracles` (EvalPlus's output
checks), `groundtruth` (expected outputs), `execute` (tests in parallel),
`metrics` (pass@k), `report` (files, summary), `evaluate` (all of it, for one model:
the entry point of `xft eval` and the pipeline), `cli` (`xft eval`).
"""

from xft._lazy import export_lazily

# Public name -> defining module, imported on first use so that `xft eval --help` stays light.
export_lazily(__name__, {
    "Benchmark": "xft.eval.benchmarks", "Task": "xft.eval.benchmarks", "load_benchmark": "xft.eval.benchmarks",
    "Evaluation": "xft.eval.evaluate", "evaluate": "xft.eval.evaluate",
    "TimeLimits": "xft.eval.execute", "Verdict": "xft.eval.execute", "check_samples": "xft.eval.execute",
    "mean_pass_at_k": "xft.eval.metrics", "pass_at_k": "xft.eval.metrics",
    "Limits": "xft.eval.sandbox", "Sandbox": "xft.eval.sandbox", "detect_level": "xft.eval.sandbox",
    "sanitize": "xft.eval.sanitize",
})
