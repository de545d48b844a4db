"""`xft plan MODEL`: per-GPU memory of every XFT stage from the model's config (no weights), and what fits.

A thin wrapper over `xft.plan`; every flag is a setting of `xft.plan.PlanConfig`.
"""

from __future__ import annotations

_EPILOG = ("Estimates from the config alone: weights, gradients, optimizer state, activations and framework "
           "overhead per GPU at the peak of a training step (see xft/plan.py for what is modelled, and "
           "benchmarks/bench_plan.py for the check against measured peaks). Example: "
           "xft plan deepseek-ai/deepseek-coder-1.3b-base --gpus 8 --gpu-memory 80 --precision bf16")


def register(subparsers) -> None:
    """Add the `plan` subcommand."""
    from xft.config import add_arguments
    from xft.plan import PlanConfig

    p = subparsers.add_parser("plan", help="estimate per-GPU memory of every stage before renting GPUs",
                              description="Print, for every stage (dense SFT, MoE SFT, merge learning, "
                                          "evaluation) and strategy (ddp, fsdp, zero3), the per-GPU memory "
                                          "broken down, whether it fits, and the cheapest strategy that does.",
                              epilog=_EPILOG)
    p.add_argument("model", help="a Hub id, a model directory or a config.json path (only the config is read)")
    add_arguments(p, PlanConfig)
    p.set_defaults(func=_plan)


def _plan(args) -> int:
    from xft.config import from_args
    from xft.plan import PlanConfig, format_plan, read_config

    cfg = from_args(PlanConfig, args)
    print(format_plan(cfg, read_config(cfg.model)))
    return 0
