"""Training stages of XFT on `transformers.Trainer`: instruction tuning (dense, MoE, EWA) and merge learning.

    from xft.training import SFTConfig, MergeConfig, train_sft, learn_merge
    moe_dir = train_sft(SFTConfig(model="runs/upcycled", data="data.jsonl", out="runs/sft"))
    dense_dir = learn_merge(MergeConfig(moe="runs/sft", data="data.jsonl", out="runs/merge"))

See docs/training.md for the run-directory layout, resume and distributed runs.
"""

from xft._lazy import export_lazily

# Public name -> defining module, imported on first use: the configs and `rundir` are light, the
# trainers pull in torch and transformers.
export_lazily(__name__, {
    "CommonConfig": "xft.training.config", "MergeConfig": "xft.training.config", "SFTConfig": "xft.training.config",
    "add_arguments": "xft.training.config", "from_args": "xft.training.config", "from_dict": "xft.training.config",
    "learn_merge": "xft.training.merging", "resolve_model": "xft.artifacts", "train_sft": "xft.training.sft",
})
