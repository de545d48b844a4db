"""`xft upcycle`: turn a dense model into an XFT MoE and save it with its tokenizer.

A thin wrapper over `xft.load` + `xft.upcycle` + `save_pretrained`; the output
directory is written atomically and never silently replaced.
"""

from __future__ import annotations

import os

from xft.errors import UserError


def register(subparsers) -> None:
    """Add the `upcycle` subcommand."""
    import xft

    defaults = xft.UpcycleConfig()
    p = subparsers.add_parser("upcycle", help="upcycle a dense model into an MoE (every FFN -> N experts)",
                              description="Copy every FFN of MODEL into N experts behind a router "
                                          "(docs/CORE_API.md) and save the MoE with the tokenizer and a model card.")
    p.add_argument("model", help="dense model: a local directory, a finished xft run, or a Hugging Face Hub id")
    p.add_argument("--out", required=True, help="directory to write the MoE to (must not exist or be empty)")
    p.add_argument("--num-experts", type=int, default=defaults.num_experts,
                   help=f"experts per layer, the shared one included (default: {defaults.num_experts})")
    p.add_argument("--top-k", type=int, default=defaults.top_k,
                   help=f"active experts per token, counting the shared one (default: {defaults.top_k})")
    p.add_argument("--routing", choices=sorted(xft.ROUTINGS), default=defaults.routing,
                   help="xft: shared expert + normalized routing weights (paper); sparse: no shared expert "
                        "(sparse upcycling); unnormalized: shared expert, raw weights (ablation)")
    p.add_argument("--router", choices=sorted(xft.ROUTERS), default=defaults.router,
                   help="mlp: Linear-tanh-Linear (paper); linear: one Linear")
    p.add_argument("--no-noise", action="store_true", help="disable noisy top-k gating during training")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the routers' initialisation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.set_defaults(func=_upcycle)


def _upcycle(args) -> int:
    import xft
    from xft.artifacts import resolve_model
    from xft.training.rundir import atomic_dir

    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise UserError(f"{args.out} exists and is not empty; pass --overwrite or choose another --out")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"{args.out} exists and is not a directory")
    config = xft.UpcycleConfig(num_experts=args.num_experts, top_k=args.top_k, routing=args.routing,
                               router=args.router, noisy_gating=not args.no_noise, seed=args.seed)
    path = resolve_model(args.model)
    # Only now transformers (seconds to import): every check above fails fast.
    from transformers.utils import logging

    from xft.training.stage import load_tokenizer

    logging.disable_progress_bar()  # per-file load/save bars
    tokenizer = load_tokenizer(path)
    model = xft.load(path)
    if xft.is_moe(model):
        raise UserError(f"{args.model} is already an xft MoE")
    n_dense = sum(p.numel() for p in model.parameters())
    xft.upcycle(model, config)
    from xft.modelcard import base_model_of, write_model_card

    with atomic_dir(args.out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_model_card(tmp, kind="upcycled", base_model=base_model_of(path), source=args.model,
                         settings=config.to_dict(), location=args.out)
    n_moe = sum(p.numel() for p in model.parameters())
    print(f"xft upcycle: {type(model).__name__} with {len(xft.moe_blocks(model))} MoE layers "
          f"({config.num_experts} experts, top-{config.top_k}, routing {config.routing}, router {config.router}); "
          f"{n_dense:,} -> {n_moe:,} parameters; saved to {args.out}")
    return 0
