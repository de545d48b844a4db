"""`xft.train`: the training API in one import (see `xft.training` for the modules).

    from xft.train import SFTConfig, MergeConfig, train_sft, learn_merge
"""

from xft.training import CommonConfig, MergeConfig, SFTConfig, from_dict, learn_merge, resolve_model, train_sft

__all__ = ["CommonConfig", "MergeConfig", "SFTConfig", "from_dict", "learn_merge", "resolve_model", "train_sft"]
