"""The models an experiment can produce: one table that the recipe, the stages and the report read.

    from xft.pipeline.methods import METHODS
    METHODS["xft"].label            # "XFT learned merge" (the report's name for it)
    METHODS["sparse"].upcycle_stage  # "upcycle-sparse" (the stage its untrained MoE comes from)

Each `Method` says what the model is (recipe help, report label and glossary)
and how it is made: the base model as it is, instruction tuning (`sft`) of the
base model or of an MoE upcycled with one routing scheme (EWA optional), or a
merge of the trained MoE (`moe`) by one `MergeConfig.method`. A method's
training or merge stage has the method's name; its upcycle stage, its
dependencies and the compute its model carries follow from the table. The
order of the table is the order of recipes and reports.
"""

from __future__ import annotations

from dataclasses import dataclass

MERGED_MOE = "moe"  # the method whose trained MoE a merge merges unless it says otherwise (Method.merge_of)


@dataclass(frozen=True)
class Method:
    """One model of the experiment."""

    name: str  # recipe and run-directory name (its stage is <run>/<name>, its evaluation <run>/eval/<name>)
    description: str  # one line: what the model is (recipe help, `xft run --help`)
    label: str  # its name in the report's tables and plots
    glossary: str  # the report's glossary entry (markdown)
    stage: str = ""  # the description of its training or merge stage in the run log ("" for the base model)
    routing: str | None = None  # instruction tuning of an MoE upcycled with this routing (None: dense / merge)
    upcycle: tuple[tuple[str, object], ...] = ()  # its MoE's UpcycleConfig settings beyond the recipe's (an init,
    #                                               a balance); such an MoE has its own upcycle stage
    ewa: bool = False  # instruction tuning with expert weight averaging (the experts averaged at the end)
    merge: str | None = None  # a merge of the trained MoE `merge_of` by this MergeConfig.method
    merge_of: str = MERGED_MOE  # a merge: the method whose trained MoE it merges
    section: str = "train"  # the recipe section its training settings come from (xft.pipeline.recipe.LAYERS);
    #                         a section no other method declared first is the method's own: the recipe gets it
    #                         (over `train` for an SFT, over `merge` for a merge) with `defaults` and `extra`
    defaults: tuple[tuple[str, object], ...] = ()  # its own section's defaults (distill: distill_steps 100)
    extra: tuple[str, ...] = ()  # its own section's keys that are not stage settings (ewa: share_rate)
    tune: str = "lr"  # the setting of its section a study tunes (xft.study)
    grid: str = ""  # the study's list of values for `tune` (StudySection field; default: lr, a merge merge_lr)
    grid_values: tuple[float, ...] = ()  # with `grid`: the values that list holds by default
    tune_max: float | None = None  # the largest value `tune` takes (a study's grid grows no further)

    @property
    def kind(self) -> str:
        """"base" (the base model), "sft" (an instruction-tuning stage) or "merge" (a merge stage)."""
        return "merge" if self.merge else "base" if not self.stage else "sft"

    @property
    def upcycle_stage(self) -> str | None:
        """The stage whose untrained MoE this method's SFT starts from (None: not upcycled)."""
        if not self.routing:
            return None
        return f"upcycle-{self.name}" if self.upcycle else upcycle_stage(self.routing)

    @property
    def upcycle_settings(self) -> dict:
        """The UpcycleConfig settings this method's MoE takes on top of the recipe's `upcycle` section."""
        return {"routing": self.routing, **dict(self.upcycle)} if self.routing else {}

    @property
    def study_grid(self) -> str:
        """The StudySection field listing the values a study tries for `tune`."""
        return self.grid or ("lr" if self.kind == "sft" else "merge_lr")

    @property
    def tuned(self) -> bool:
        """Whether a study tunes this method: a training method, a merge that learns, a merge with an option grid."""
        return self.trains or bool(self.grid)

    @property
    def trains(self) -> bool:
        """Whether producing this model runs a training stage of its own (an SFT, or a merge that learns)."""
        return self.kind == "sft" or self.merge == "learned"

    @property
    def is_moe(self) -> bool:
        """Whether the model this method produces is an MoE (an upcycled SFT that is neither merged nor averaged)."""
        return self.routing is not None and not self.ewa

    @property
    def compute_chain(self) -> tuple[str, ...]:
        """The training stages whose compute this method's model carries (a merge: the MoE it merged)."""
        if self.kind == "merge":
            return (self.merge_of, self.name) if self.trains else (self.merge_of,)
        return (self.name,)


def upcycle_stage(routing: str) -> str:
    """The name of the stage that upcycles the base model with `routing`: upcycle (XFT's), upcycle-<routing>."""
    return "upcycle" if routing == "xft" else f"upcycle-{routing}"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method(
        "base", "the base model, not instruction-tuned", "base model",
        "**base model**: the pretrained model before instruction tuning; every other model starts from it."),
    Method(
        "sft", "dense SFT baseline (SFT_DS)", "dense SFT",
        "**dense SFT** (SFT_DS): the base model instruction-tuned as it is, the baseline XFT must beat.",
        stage="dense SFT baseline", section="dense"),
    Method(
        "moe", "upcycled MoE after SFT, not merged (MoE_DS)", "MoE (unmerged)",
        "**MoE (unmerged)** (MoE_DS): the base model *upcycled* — each FFN copied into N experts, one of "
        "them the *shared expert* every token uses, the others chosen per token by a router (top-k) — then "
        "instruction-tuned. XFT's routing normalizes the expert weights to sum to 1.",
        stage="MoE SFT (shared expert, normalized routing)", routing="xft", section="moe"),
    Method(
        "ewa", "EWA: MoE SFT with experts pulled to their mean, then averaged (EWA_DS)", "EWA",
        "**EWA** (expert weight averaging, EWA_DS): MoE SFT in which, after every optimizer step, each "
        "expert moves a fraction β (ewa.share_rate) toward the experts' mean; at the end the experts are "
        "averaged into one dense FFN. A baseline for merging.",
        stage="MoE SFT with EWA, experts averaged", routing="xft", ewa=True, section="ewa",
        defaults=(("share_rate", 0.3),), extra=("share_rate",)),
    Method(
        "xft_init", "XFT init merge: shared expert λ, routed experts (1-λ)/(N-1), no learning", "XFT init merge",
        "**XFT init merge**: the trained MoE merged back into the base architecture without learning: "
        "per layer, the shared expert's FFN weighted λ plus each of the N − 1 routed experts weighted "
        "(1 − λ)/(N − 1).",
        stage="init merge (no learning)", merge="init"),
    Method(
        "xft_uniform", "uniform average of all experts of the trained MoE", "uniform merge",
        "**uniform merge**: the trained MoE merged with every expert weighted 1/N (no λ), to show "
        "what weighting the shared expert adds.",
        stage="uniform merge of all experts", merge="uniform"),
    Method(
        "xft", "XFT: learned merge of the trained MoE (XFT_DS)", "XFT learned merge",
        "**XFT learned merge** (XFT_DS): starts from the init merge and learns, on the instruction data, "
        "one vector of mixing logits per layer (routed experts weighted (1 − λ)·softmax(logits)), then "
        "compiles them into an ordinary dense model: the method's final model, the size of the base model.",
        stage="learn the merge (XFT)", merge="learned", section="merge"),
    Method(
        "sparse", "ablation: sparse upcycling, no shared expert (MoE_SS), not merged",
        "sparse upcycling (no shared expert)",
        "**sparse upcycling** (ablation, MoE_SS): an upcycled MoE with no shared expert, every expert "
        "routed; not merged.",
        stage="MoE SFT, sparse upcycling (no shared expert)", routing="sparse", section="sparse"),
    Method(
        "unnormalized", "ablation: shared expert without routing-weight normalization, not merged",
        "shared expert, unnormalized",
        "**shared expert, unnormalized** (ablation): the shared expert weighted 1 − (top routing "
        "probability) and the routed experts their raw probabilities, so the weights do not sum to "
        "1 (the paper's scale mismatch); not merged.",
        stage="MoE SFT, shared expert, unnormalized routing", routing="unnormalized", section="unnormalized"),
)}

PAPER_METHODS: tuple[str, ...] = tuple(METHODS)  # the paper's models, baselines and ablations

# Beyond the paper (docs/method.md): other upcycling inits and load balancing, each an MoE and its learned
# merge; other merge operators and distillation, each a merge of XFT's MoE.
_VARIANTS = (
    ("drop", (("init", "drop"), ("drop_rate", 0.5)), "Drop-Upcycling MoE (r = 0.5)",
     "each routed expert re-initialises half of its FFN neurons (Drop-Upcycling), the shared expert stays exact"),
    ("granular", (("init", "granular"), ("granularity", 2)), "granular MoE (G = 2)",
     "each routed expert split into 2 half-size experts (granular upcycling, router in virtual groups)"),
    ("aux_free", (("balance", "aux_free"),), "aux-loss-free MoE",
     "balanced by a per-expert selection bias instead of the cv² loss (DeepSeek-V3)"),
    ("switch", (("balance", "switch"),), "Switch-balanced MoE", "balanced by the Switch Transformer loss"),
)
for _name, _settings, _label, _what in _VARIANTS:
    METHODS[f"moe_{_name}"] = Method(
        f"moe_{_name}", f"beyond the paper: {_what}; not merged", _label,
        f"**{_label}** (beyond the paper): XFT's MoE except that {_what}; not merged.",
        stage=f"MoE SFT, {_label}", routing="xft", upcycle=_settings, section=f"moe_{_name}")
    METHODS[f"xft_{_name}"] = Method(
        f"xft_{_name}", f"beyond the paper: learned merge of the {_label}", f"XFT of the {_label}",
        f"**XFT of the {_label}**: the {_label} merged back by XFT's learned merge.",
        stage=f"learn the merge of the {_label}", merge="learned", merge_of=f"moe_{_name}", section="merge")
for _method, _label, _what, _option, _max, _values in (
        ("task_arithmetic", "task-arithmetic merge", "shared expert + α·Σ of the routed experts' deltas to it",
         "merge_scale", None, (0.1, 0.2, 0.4)),
        ("ties", "TIES merge", "TIES on the routed experts' deltas to the shared expert (trim, elect sign, "
                               "disjoint mean)", "merge_density", 1.0, (0.1, 0.2, 0.4))):
    METHODS[f"xft_{_method}"] = Method(
        f"xft_{_method}", f"beyond the paper: {_what}, of the trained MoE", _label,
        f"**{_label}** (beyond the paper): the trained MoE merged by {_what}; no learning "
        f"(`{_method}` section; a study tunes its `{_option}`).",
        stage=_label, merge=_method, section=_method, tune=_option, grid=f"{_method}_{_option.split('_')[1]}",
        grid_values=_values, tune_max=_max)
METHODS["xft_distill"] = Method(
    "xft_distill", "beyond the paper: XFT's learned merge, then distilled from the MoE (KL)", "XFT + distillation",
    "**XFT + distillation** (beyond the paper): the learned merge, then the whole dense model trained to match "
    "the MoE's next-token distributions on the instruction data (`distill` section: steps, learning rate).",
    stage="learn the merge, then distil the MoE into it", merge="learned", section="distill",
    defaults=(("distill_steps", 100),), tune="distill_lr", grid="distill_lr", grid_values=(1e-4, 3e-4, 1e-3))

# Recipe section -> the first method that names it (whose row declares the section's defaults and extras).
SECTION_OWNERS: dict[str, Method] = {}
for _m in METHODS.values():
    SECTION_OWNERS.setdefault(_m.section, _m)

# Upcycle stage -> the UpcycleConfig settings of its MoE (beyond the recipe's), for every MoE a method trains.
UPCYCLE_STAGES: dict[str, dict] = {m.upcycle_stage: m.upcycle_settings for m in METHODS.values() if m.routing}


def check_pairs(pairs, what: str):
    """`pairs` ((method, method, ...), ...) unchanged, once every method it names is in the table."""
    for pair in pairs:
        for name in pair[:2]:
            if name not in METHODS:
                raise ValueError(f"{what} names {name!r}, which is not a method of xft.pipeline.methods")
    return pairs
