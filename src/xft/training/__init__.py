"""Training stages of XFT on `transformers.Trainer`: instruction tuning (dense, MoE, EWA), merge learning, and
distillation after a merge.

    from xft.training import SFTConfig, MergeConfig, train_sft, learn_merge
    moe_dir = train_sft(SFTConfig(model="runs/upcycled", data="data.jsonl", out="runs/sft"))
    dense_dir = learn_merge(MergeConfig(moe="runs/sft", data="data.jsonl", out="runs/merge"))
    kd_dir = learn_merge(MergeConfig(moe="runs/sft", method="ties", distill_steps=500, data="data.jsonl",
                                     out="runs/ties_kd"))

See docs/training.md for the run-directory layout, resume and distributed runs.
"""

from xft._lazy import export_lazily

# Public name -> defining module, imported on first use: the configs (`xft.config`) are light, the
# trainers pull in torch and transformers.
export_lazily(__name__, {
    "DataConfig": "xft.config", "MergeConfig": "xft.config", "SFTConfig": "xft.config", "TrainConfig": "xft.config",
    "UpcycleConfig": "xft.config", "learn_merge": "xft.training.merging", "train_sft": "xft.training.sft",
    "DistillTrainer": "xft.training.distill", "distill_loss": "xft.training.distill",
})
