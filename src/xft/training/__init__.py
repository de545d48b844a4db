"""Training stages of XFT on `transformers.Trainer`: instruction tuning (dense, MoE, EWA) and merge learning.

    from xft.training import SFTConfig, MergeConfig, train_sft, learn_merge
    moe_dir = train_sft(SFTConfig(model="runs/upcycled", data="data.jsonl", out="runs/sft"))
    dense_dir = learn_merge(MergeConfig(moe="runs/sft", data="data.jsonl", out="runs/merge"))

See docs/training.md for the run-directory layout, resume and distributed runs.
"""

from xft.training.config import CommonConfig, MergeConfig, SFTConfig, add_arguments, from_args, from_dict
from xft.training.merging import learn_merge
from xft.training.rundir import resolve_model
from xft.training.sft import train_sft

__all__ = ["CommonConfig", "MergeConfig", "SFTConfig", "add_arguments", "from_args", "from_dict", "learn_merge",
           "resolve_model", "train_sft"]
