"""`xft train` and `xft merge`: thin wrappers over `xft.training.train_sft` / `learn_merge`.

Every flag is a setting of `xft.config.SFTConfig` / `MergeConfig`, the configs they compose included
(`--num-experts` is `SFTConfig.upcycle.num_experts`); help text, defaults and choices live there.
"""

from __future__ import annotations

from xft.artifacts import resolve_model
from xft.config import MergeConfig, SFTConfig, add_arguments, from_args
from xft.device import add_threads_option, start_model_command

_MULTI_GPU = ("Multi-GPU: accelerate launch --config_file $(python -m xft.configs ddp) -m xft.cli {cmd} ... "
              "(also fsdp, deepspeed_zero3; see docs/training.md).")

_TRAIN_EPILOG = ("OUT is the finished model (AutoModelForCausalLM.from_pretrained(OUT) for a dense one, "
                 "xft.load(OUT) for an MoE); checkpoints go to OUT/checkpoint-N while training. Re-running the "
                 "same command after an interruption resumes from the last checkpoint; after it finished, it "
                 "does nothing. "
                 + _MULTI_GPU.format(cmd="train"))

_MERGE_EPILOG = ("OUT is the dense model (the base architecture, loadable with plain transformers), "
                 "its tokenizer, and merge_coefficients.json: per layer, the coefficient of each expert "
                 "(expert 0 is the shared one; none for task_arithmetic and ties). Methods other than learned "
                 "need no --data and take no training steps, unless --distill-steps. --method learned (and a "
                 "distillation, in OUT/distill/) trains with checkpoints in OUT/checkpoint-N; re-running the same "
                 "command after an interruption resumes from the last one, and after it finished does nothing. "
                 + _MULTI_GPU.format(cmd="merge"))


def register(subparsers) -> None:
    """Add the `train` and `merge` subcommands."""
    p = subparsers.add_parser("train", help="instruction-tune a dense or MoE model (SFT, EWA)",
                              description="Instruction-tune MODEL (dense or xft MoE, detected) on --data with "
                                          "the paper's settings (Adafactor, lr 5e-5, batch 64, linear schedule).",
                              epilog=_TRAIN_EPILOG)
    p.add_argument("model", help="dense or MoE model: a local directory, a finished xft run, or a Hub id")
    add_arguments(p, SFTConfig, required=("data", "out"))
    add_threads_option(p)
    p.set_defaults(func=_train)

    p = subparsers.add_parser("merge", help="merge a trained MoE into a dense model (learned or fixed merges, "
                                            "optional distillation)",
                              description="Merge the trained MoE back into a dense model of the original "
                                          "architecture (docs/training.md): each FFN becomes a weighted sum of "
                                          "its experts. --method learned (the paper's) trains only the per-layer "
                                          "mixing coefficients on --data (the shared expert's weight is "
                                          "--shared-weight, fixed unless --learn-shared-weight); init uses the "
                                          "initial coefficients, uniform the plain average of the experts; "
                                          "task_arithmetic and ties merge the experts' weight deltas to the "
                                          "shared expert (--merge-scale, --merge-density). --distill-steps N "
                                          "then trains the merged model N steps to match the MoE's next-token "
                                          "distributions on --data.",
                              epilog=_MERGE_EPILOG)
    p.add_argument("moe", help="trained MoE: a local directory, a finished xft run, or a Hub id")
    add_arguments(p, MergeConfig, required=("out",))
    add_threads_option(p)
    p.set_defaults(func=_merge)


def _train(args) -> int:
    return _run(SFTConfig, args, "model", "train_sft")


def _merge(args) -> int:
    return _run(MergeConfig, args, "moe", "learn_merge")


def _run(cls, args, source: str, entry: str) -> int:
    config = from_args(cls, args)  # a bad setting fails here, before torch and transformers load
    resolve_model(getattr(config, source))
    start_model_command(args.threads)
    import xft.training

    getattr(xft.training, entry)(config)
    return 0
