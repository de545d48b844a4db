"""xft: upcycle a dense code LLM into a shared-expert MoE, instruction-tune it, merge it back.

The core API (docs/method.md §1 and §3):

    moe = xft.upcycle(model, xft.UpcycleConfig(num_experts=8, top_k=6, routing="xft"))
    ...train moe...
    dense = xft.merge(moe)                          # init merge, or learn the coefficients:
    merge_model = xft.build_merge_model(moe)        # only the mixing logits train
    ...train merge_model...
    dense = xft.compile_merge(merge_model)          # original class, loads without xft
"""

from xft._lazy import after_import, export_lazily

__version__ = "0.1.0"

# Public name -> defining module, imported on first use: `import xft`, `xft --help` and the light
# submodules (xft.errors, xft.data, ...) do not pay for torch and transformers.
export_lazily(__name__, {
    "is_moe_checkpoint": "xft.checkpoint", "load": "xft.checkpoint",
    "ConfigError": "xft.config", "UpcycleConfig": "xft.config",
    "INITS": "xft.inits",
    "MERGE_METHODS": "xft.merge", "average_experts": "xft.merge", "build_merge_model": "xft.merge",
    "compile_merge": "xft.merge", "merge": "xft.merge", "merge_coefficients": "xft.merge",
    "MoEBlock": "xft.moe",
    "expert_drift": "xft.merge_diagnostics", "held_out_loss": "xft.merge_diagnostics",
    "merge_gap": "xft.merge_diagnostics", "routing_spread": "xft.merge_diagnostics",
    "BALANCES": "xft.routing", "ROUTERS": "xft.routing", "ROUTINGS": "xft.routing", "combine_weights": "xft.routing",
    "balance_step": "xft.upcycle", "expert_weights": "xft.upcycle", "ewa_step": "xft.upcycle", "is_moe": "xft.upcycle",
    "moe_blocks": "xft.upcycle", "routing_stats": "xft.upcycle", "upcycle": "xft.upcycle",
    "upcycle_config": "xft.upcycle",
})


def _know_moe_checkpoints() -> None:
    """Teach transformers' Auto classes the `xft_moe` model type (xft.hfconfig) as soon as it is imported."""
    import importlib

    importlib.import_module("xft.hfconfig")


# Not now: importing transformers' Auto classes costs seconds (torch), which `xft --help` must not pay.
after_import("transformers", _know_moe_checkpoints)
