"""`xft eval`: generate with a model (or read a samples file), run the tests sandboxed, score.

    xft eval MODEL --benchmark humaneval --out DIR [--n-samples N --temperature T ...]
    xft eval --samples FILE --benchmark mbpp+ --data MbppPlus.jsonl --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from xft.errors import UserError


class _DefaultsFormatter(argparse.HelpFormatter):
    """Append "(default: X)" to each option whose default is a value and whose help does not name one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        no_value = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if no_value or not action.option_strings or "default" in help:
            return help
        return f"{help} (default: %(default)s)"


def register(subparsers) -> None:
    """Add the `eval` subcommand (imports only the light benchmark registry and sandbox levels)."""
    from xft.data import TEMPLATES
    from xft.eval.benchmarks import names
    from xft.eval.sandbox import LEVELS

    p = subparsers.add_parser(
        "eval", help="evaluate a model (or a samples file) on a code benchmark, sandboxed",
        formatter_class=_DefaultsFormatter,
        description="Generate answers with MODEL (or read them from --samples), run each in the "
        "sandbox against the benchmark's tests, and write DIR/samples.jsonl and DIR/results.json.",
        epilog="An existing non-empty --out is refused unless --overwrite is given; the results are "
        "written to a temporary directory and renamed into place when complete, so an interrupted or "
        "failed eval leaves the previous --out as it was. See docs/evaluation.md.")
    p.add_argument("model", nargs="?", help="checkpoint directory or hub id (dense or xft MoE)")
    p.add_argument("--samples", metavar="FILE", help="score this samples .jsonl (task_id + "
                   "solution or completion per line) instead of generating")
    p.add_argument("--benchmark", required=True, choices=names(), help="benchmark to run")
    p.add_argument("--data", metavar="PATH", help="benchmark data file (.jsonl or .jsonl.gz), "
                   "e.g. EvalPlus's HumanEvalPlus/MbppPlus release for humaneval+/mbpp+/mbpp")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier eval in --out (once the new ones are complete)")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt-style", default="instruction", choices=("instruction", "completion"),
                   help="instruction: Magicoder template (instruction-tuned models); "
                   "completion: continue the code prompt (base models)")
    g.add_argument("--template", default="magicoder", choices=list(TEMPLATES),
                   help="instruction style: the template the model was trained with (chat: the tokenizer's own "
                        "chat template)")
    g.add_argument("--n-samples", type=int, default=1, help="samples per task (pass@k needs n >= k)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus mass when sampling")
    g.add_argument("--max-new-tokens", type=int, default=512, help="generation length cap")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per generate call "
                   "(results do not depend on it)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--backend", default="hf", choices=("hf", "vllm"),
                   help="hf: transformers generate; vllm: vLLM (GPU, dense models, optional extra)")
    g.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: the checkpoint's)")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, mps")
    g.add_argument("--limit", type=int, default=None, help="only the first N tasks (quick checks; "
                   "implies --partial; default: all)")
    x = p.add_argument_group("execution")
    x.add_argument("--workers", type=int, default=None, help="parallel sandboxes (default: CPU count)")
    x.add_argument("--sandbox", default="auto", choices=("auto", *LEVELS),
                   help="isolation level (auto: the strongest available)")
    x.add_argument("--partial", action="store_true",
                   help="score samples that cover only some tasks (pass@k over those tasks)")
    x.add_argument("--sanitize", action="store_true",
                   help="with --samples: extract the code from each solution first")
    x.add_argument("--min-time-limit", type=float, default=1.0,
                   help="EvalPlus-style tests: minimum seconds per input")
    x.add_argument("--time-limit-factor", type=float, default=4.0,
                   help="EvalPlus-style tests: per-input limit = factor x reference time")
    x.add_argument("--check-timeout", type=float, default=3.0,
                   help="HumanEval-style tests: seconds per program")
    p.set_defaults(func=run)


def _progress(desc: str):
    from tqdm import tqdm

    return lambda it, total: tqdm(it, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True,
                                  leave=False)


def run(args: argparse.Namespace) -> int:
    """`xft eval`: check every argument (cheap first), then generate or read samples, score, write --out."""
    from xft.device import resolve_device
    from xft.eval import benchmarks
    from xft.eval.sandbox import Sandbox

    if (args.model is None) == (args.samples is None):
        raise UserError("give either MODEL (to generate) or --samples FILE (to score), not both")
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be positive")
    _check_out(args.out, args.overwrite)
    device = resolve_device(args.device) if args.model is not None else None
    bench = benchmarks.load_benchmark(args.benchmark, args.data)
    with Sandbox(args.sandbox) as sandbox:  # fail on a bad level before a long generation
        return _run(args, bench, sandbox, device)


# What `xft eval` writes into --out; --overwrite replaces only a directory holding nothing else.
_OUTPUTS = ("results.json", "samples.jsonl")


def _check_out(out: str, overwrite: bool) -> None:
    """UserError unless `out` is free: missing, empty, or (with --overwrite) an earlier eval's results."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} exists and is not a directory")
    entries = os.listdir(out) if os.path.isdir(out) else []
    if entries and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; pass --overwrite to replace its results "
                        "or choose another --out")
    others = sorted(set(entries) - set(_OUTPUTS))
    if others:  # never delete what an eval did not write
        raise UserError(f"--out {out} holds files xft eval did not write ({', '.join(others[:3])}); "
                        "choose another --out")


def _write(out: str, overwrite: bool, samples: list[dict], results: dict) -> None:
    """Write samples.jsonl and results.json into a fresh `out`, renamed into place only when complete."""
    from xft.eval import report
    from xft.training.rundir import atomic_dir

    _check_out(out, overwrite)  # again: the directory may have appeared during a long generation
    try:
        with atomic_dir(out) as tmp:
            report.write_outputs(tmp, samples, results)
    except OSError as e:
        raise UserError(f"cannot write --out {out}: {e.strerror or e}") from None


def _run(args: argparse.Namespace, bench, sandbox, device: str | None) -> int:
    from xft.eval import execute, generate, report

    settings: dict = {"sandbox": sandbox.describe()}
    t0 = time.monotonic()
    if args.samples:
        samples = report.read_samples(args.samples)
        if args.sanitize:
            samples = [dict(s, solution=_sanitized(bench, s)) for s in samples]
        settings["decoding"] = None
        settings["samples_file"] = os.path.abspath(args.samples)
    else:
        cfg = generate.DecodingConfig(
            prompt_style=args.prompt_style, template=args.template, n_samples=args.n_samples,
            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, seed=args.seed, backend=args.backend)
        cfg.validate()
        task_ids = list(bench.tasks)[:args.limit] if args.limit else None
        samples = generate.generate_samples(bench, args.model, cfg, dtype=args.dtype,
                                            device=device,
                                            task_ids=task_ids, progress=_progress("generate"))
        settings["decoding"] = dataclasses.asdict(cfg)
        settings["model"] = args.model
    t1 = time.monotonic()
    report.check_coverage(bench, samples, partial=args.partial or bool(args.limit))
    limits = execute.TimeLimits(check_seconds=args.check_timeout, min_per_input=args.min_time_limit,
                                factor=args.time_limit_factor)
    verdicts = execute.check_samples(bench, samples, sandbox, workers=args.workers,
                                     time_limits=limits, progress=_progress("test"))
    settings["time_limits"] = dataclasses.asdict(limits)
    settings["seconds"] = {"generation": round(t1 - t0, 2), "execution": round(time.monotonic() - t1, 2)}
    results = report.build_results(bench, samples, verdicts, settings=settings)
    _write(args.out, args.overwrite, samples, results)
    print(report.summary(results, args.out))
    return 0


def _sanitized(bench, sample: dict) -> str:
    from xft.eval.execute import program_for
    from xft.eval.sanitize import sanitize

    return sanitize(program_for(bench, sample), bench.tasks[sample["task_id"]].entry_point) \
        if sample["task_id"] in bench.tasks else program_for(bench, sample)

