"""`xft eval`: generate with a model (or read a samples file), run the tests sandboxed, score.

    xft eval MODEL --benchmark humaneval --out DIR [--n-samples N --temperature T ...]
    xft eval --samples FILE --benchmark mbpp+ --data MbppPlus.jsonl --out DIR
"""

from __future__ import annotations

import argparse


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
    from xft.config import DecodingConfig, ExecutionConfig, add_arguments
    from xft.device import add_threads_option
    from xft.eval.benchmarks import names

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
    add_arguments(g, DecodingConfig)  # its settings, help, defaults and choices from xft.config
    g.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: the checkpoint's)")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, mps")
    g.add_argument("--limit", type=int, default=None, help="only the first N tasks (quick checks; "
                   "implies --partial; default: all)")
    x = p.add_argument_group("execution")
    add_threads_option(g)
    x.add_argument("--workers", type=int, default=None, help="parallel sandboxes (default: CPU count)")
    add_arguments(x, ExecutionConfig)  # --sandbox: its help and levels from xft.config, as recipes' eval.sandbox
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


def run(args: argparse.Namespace) -> int:
    """`xft eval`: one call of `xft.eval.evaluate` (it checks --out first), then the summary."""
    from xft.device import resolve_device, set_threads
    from xft.eval import evaluate
    from xft.eval.execute import TimeLimits
    from xft.config import DecodingConfig, ExecutionConfig, from_args
    from xft.eval.report import summary

    decoding = from_args(DecodingConfig, args)
    set_threads(args.threads)
    limits = TimeLimits(check_seconds=args.check_timeout, min_per_input=args.min_time_limit,
                        factor=args.time_limit_factor)
    ev = evaluate(args.model, args.benchmark, args.out, samples=args.samples, data=args.data, decoding=decoding,
                  limit=args.limit, partial=args.partial, sanitize=args.sanitize, workers=args.workers,
                  sandbox=from_args(ExecutionConfig, args).sandbox, time_limits=limits, dtype=args.dtype,
                  device=resolve_device(args.device) if args.model is not None else None,
                  overwrite=args.overwrite, progress=True)
    print(summary(ev.results, args.out))
    return 0
