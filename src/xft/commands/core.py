"""`xft upcycle`: turn a dense model into an XFT MoE and save it with its tokenizer.

A thin wrapper over `xft.load` + `xft.upcycle` + `save_pretrained`. `--out` follows
the training commands' convention (`xft.training.rundir`): it becomes the model,
config.json last; the same command again does nothing; another command there
is refused unless `--overwrite`, which deletes only what xft wrote.
"""

from __future__ import annotations

import argparse
import shutil


def register(subparsers) -> None:
    """Add the `upcycle` subcommand."""
    from xft.config import UpcycleConfig, add_arguments
    from xft.device import add_threads_option

    p = subparsers.add_parser("upcycle", help="upcycle a dense model into an MoE (every FFN -> N experts)",
                              description="Copy every FFN of MODEL into N experts behind a router "
                                          "(docs/CORE_API.md) and save the MoE with the tokenizer and a model card.")
    p.add_argument("model", help="dense model: a local directory, a finished xft run, or a Hugging Face Hub id")
    p.add_argument("--out", required=True, help="output directory: becomes the MoE (new, empty, or holding "
                                                "this same command's output)")
    add_arguments(p, UpcycleConfig)  # every UpcycleConfig field, its help and choices from the config
    p.add_argument("--no-noise", dest="noisy_gating", action="store_false", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # old name
    p.add_argument("--overwrite", action="store_true", help="replace the output of another xft command in --out")
    add_threads_option(p)
    p.set_defaults(func=_upcycle)


def _upcycle(args) -> int:
    import xft
    from xft.artifacts import resolve_model
    from xft.training import rundir
    from xft.config import from_args
    from xft.device import start_model_command

    config = from_args(xft.UpcycleConfig, args)
    record = {"stage": "upcycle", "model": args.model, **config.to_dict()}
    plan = rundir.claim(args.out, record, args.overwrite)
    if plan.done:
        print(rundir.already_done(plan.run, "upcycle"))
        return 0
    path = resolve_model(args.model)
    start_model_command(args.threads)  # only now transformers (seconds to import): every check above fails fast
    from xft.checkpoint import skeleton, upcycle_checkpoint

    n_dense = sum(p.numel() for p in skeleton(path).parameters())
    rundir.begin(plan.run, record, args.overwrite)
    tmp = rundir.staging(plan.run)
    try:
        model = upcycle_checkpoint(path, tmp, config, location=args.out)
        rundir.publish(plan.run, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_moe = sum(p.numel() for p in model.parameters())
    print(f"xft upcycle: {type(model).__name__} with {len(xft.moe_blocks(model))} MoE layers "
          f"({config.num_experts} experts, top-{config.top_k}, routing {config.routing}, router {config.router}); "
          f"{n_dense:,} -> {n_moe:,} parameters; saved to {args.out}")
    return 0
