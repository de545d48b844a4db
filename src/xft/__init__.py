"""xft: upcycle a dense code LLM into a shared-expert MoE, instruction-tune it, merge it back.

The core API (XFT_METHOD.md §1 and §3):

    moe = xft.upcycle(model, xft.UpcycleConfig(num_experts=8, top_k=6, routing="xft"))
    ...train moe...
    dense = xft.merge(moe)                          # init merge, or learn the coefficients:
    merge_model = xft.build_merge_model(moe)        # only the mixing logits train
    ...train merge_model...
    dense = xft.compile_merge(merge_model)          # original class, loads without xft
"""

from xft.checkpoint import is_moe_checkpoint, load
from xft.config import ConfigError, UpcycleConfig
from xft.merge import (
    MERGE_METHODS,
    average_experts,
    build_merge_model,
    compile_merge,
    merge,
    merge_coefficients,
)
from xft.moe import MoEBlock
from xft.routing import ROUTERS, ROUTINGS, combine_weights
from xft.upcycle import expert_weights, ewa_step, is_moe, moe_blocks, routing_stats, upcycle, upcycle_config

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "MERGE_METHODS", "MoEBlock", "ROUTERS", "ROUTINGS", "UpcycleConfig", "average_experts",
    "build_merge_model", "combine_weights", "compile_merge", "expert_weights", "ewa_step", "is_moe",
    "is_moe_checkpoint", "load", "merge", "merge_coefficients", "moe_blocks", "routing_stats", "upcycle",
    "upcycle_config",
]
