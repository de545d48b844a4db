"""`xft upcycle`: turn a dense model into an XFT MoE and save it with its tokenizer.

A thin wrapper over `xft.load` + `xft.upcycle` + `save_pretrained`; the output
directory is written atomically and never silently replaced.
"""

from __future__ import annotations

import argparse
import os

from xft.errors import UserError


def register(subparsers) -> None:
    """Add the `upcycle` subcommand."""
    from xft.config import UpcycleConfig
    from xft.training.config import add_arguments

    p = subparsers.add_parser("upcycle", help="upcycle a dense model into an MoE (every FFN -> N experts)",
                              description="Copy every FFN of MODEL into N experts behind a router "
                                          "(docs/CORE_API.md) and save the MoE with the tokenizer and a model card.")
    p.add_argument("model", help="dense model: a local directory, a finished xft run, or a Hugging Face Hub id")
    p.add_argument("--out", required=True, help="directory to write the MoE to (must not exist or be empty)")
    add_arguments(p, UpcycleConfig)  # every UpcycleConfig field, its help and choices from the config
    p.add_argument("--no-noise", dest="noisy_gating", action="store_false", help=argparse.SUPPRESS)  # old name
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.set_defaults(func=_upcycle)


def _upcycle(args) -> int:
    import xft
    from xft.training.config import from_args
    from xft.artifacts import resolve_model
    from xft.training.rundir import atomic_dir

    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise UserError(f"{args.out} exists and is not empty; pass --overwrite or choose another --out")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"{args.out} exists and is not a directory")
    config = from_args(xft.UpcycleConfig, args)
    path = resolve_model(args.model)
    # Only now transformers (seconds to import): every check above fails fast.
    from transformers.utils import logging

    from xft.checkpoint import skeleton, upcycle_checkpoint

    logging.disable_progress_bar()  # per-file load/save bars
    n_dense = sum(p.numel() for p in skeleton(path).parameters())
    with atomic_dir(args.out) as tmp:
        model = upcycle_checkpoint(path, tmp, config, location=args.out)
    n_moe = sum(p.numel() for p in model.parameters())
    print(f"xft upcycle: {type(model).__name__} with {len(xft.moe_blocks(model))} MoE layers "
          f"({config.num_experts} experts, top-{config.top_k}, routing {config.routing}, router {config.router}); "
          f"{n_dense:,} -> {n_moe:,} parameters; saved to {args.out}")
    return 0
