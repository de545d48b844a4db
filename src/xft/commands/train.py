"""`xft train` and `xft merge`: thin wrappers over `xft.training.train_sft` / `learn_merge`.

Every flag is a field of `SFTConfig` / `MergeConfig` (help text lives there).
"""

from __future__ import annotations

from xft.training.config import MergeConfig, SFTConfig, add_arguments, from_args

_EPILOG = ("The finished model is written to OUT/final; checkpoints go to OUT/checkpoints. "
           "Re-running the same command after an interruption resumes from the last checkpoint. "
           "Multi-GPU: accelerate launch --config_file $(python -m xft.configs ddp) -m xft.cli train ... "
           "(also fsdp, deepspeed_zero3; see docs/training.md).")


def register(subparsers) -> None:
    """Add the `train` and `merge` subcommands."""
    p = subparsers.add_parser("train", help="instruction-tune a dense or MoE model (SFT, EWA)",
                              description="Instruction-tune MODEL (dense or xft MoE, detected) on --data with "
                                          "the paper's settings (Adafactor, lr 5e-5, batch 64, linear schedule).",
                              epilog=_EPILOG)
    p.add_argument("model", help="dense or MoE model: a local directory, a finished xft run, or a Hub id")
    add_arguments(p, SFTConfig, required=("data", "out"))
    p.set_defaults(func=_train)

    p = subparsers.add_parser("merge", help="merge a trained MoE into a dense model (learned, init, uniform)",
                              description="Merge the MoE back into a dense model of the original architecture; "
                                          "--method learned trains only the per-layer mixing coefficients.",
                              epilog=_EPILOG)
    p.add_argument("moe", help="trained MoE: a local directory, a finished xft run, or a Hub id")
    add_arguments(p, MergeConfig, required=("out",))
    p.set_defaults(func=_merge)


def _quiet_io() -> None:
    """Hide transformers' per-file load/save progress bars; the training bar stays."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _train(args) -> int:
    from xft.training import train_sft

    _quiet_io()
    train_sft(from_args(SFTConfig, args))
    return 0


def _merge(args) -> int:
    from xft.training import learn_merge

    _quiet_io()
    learn_merge(from_args(MergeConfig, args))
    return 0
