"""Recipes: the whole XFT experiment as one typed, validated YAML file plus `--set` overrides.

A recipe names the base model and data, which methods to produce, and the
settings of every stage. Sections `train`, `dense`, `ewa` and `merge` hold
flat settings of `xft.config.SFTConfig` / `MergeConfig` (the names `xft train`
and `xft merge` take as flags, so help, types and defaults live in one place),
`upcycle` those of `xft.config.UpcycleConfig`. Sections are layered as
`LAYERS` declares: each training method's own section (`dense` for `sft`,
`moe`, `ewa`, `sparse`, `unnormalized`) is `train` plus its own settings,
`merge` is `train` less the settings `MergeConfig` declares defaults for (its
schedule) plus its own.

    recipe = load_recipe("recipes/minicode.yaml", ["train.max_steps=2", "model=/path/to/model"])

Guarantees: every key of the file and of every override is checked against
the dataclasses below (a section's against its config's flat settings) before
anything runs; an unknown key or a value of the wrong type is a `UserError`
naming it (and, for a typo, the closest known key). The values are checked
when the stages' configs are built (`xft.pipeline.preflight`), also before
anything runs.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from xft import recipes
from xft.config import (
    DecodingConfig, ExecutionConfig, MergeConfig, SFTConfig, UpcycleConfig, check_flat, closest, coerce,
    flat_settings, setting, setting_of, type_name, type_ok,
)
from xft.errors import UserError
from xft.pipeline.methods import METHODS, PAPER_METHODS, SECTION_OWNERS  # the models a recipe can produce


@dataclass(frozen=True)
class Layer:
    """A recipe section: flat settings of a stage config, over the settings of the section it inherits."""

    config: type  # the config class whose flat settings (xft.config.flat_settings) the section holds
    inherits: str | None = None  # the section whose settings are this one's defaults
    extra: tuple[str, ...] = ()  # section keys that are not settings of `config` (ewa.share_rate)

    def own(self) -> set[str]:
        """Settings never inherited: those `config` declares with defaults of its own (the merge's schedule)."""
        parents = {f.name for base in self.config.__mro__[1:] if dataclasses.is_dataclass(base)
                   for f in dataclasses.fields(base)}
        return set(self.config.__annotations__) & parents


# Settings the pipeline fills in itself (paths between stages, the routing per method, the upcycle stage).
_PIPELINE_OWNED = {"model", "moe", "data", "out", "method", "overwrite", "ewa_share_rate"} | {
    name for name, slot in flat_settings(SFTConfig).items() if slot.path[0] == "upcycle"}

def _own_layer(method) -> Layer:
    """A method's own section: its config's settings over `train` (an SFT) or over `merge` (a merge)."""
    if method.kind == "merge":
        return Layer(MergeConfig, inherits="merge", extra=method.extra)
    return Layer(SFTConfig, inherits="train", extra=method.extra)


# The sections every recipe has, then one per method that names a section of its own (xft.pipeline.methods).
_BASE_LAYERS = {
    "upcycle": Layer(UpcycleConfig),
    "train": Layer(SFTConfig),
    "merge": Layer(MergeConfig, inherits="train"),
}
LAYERS = {**_BASE_LAYERS, **{name: _own_layer(m) for name, m in SECTION_OWNERS.items() if name not in _BASE_LAYERS}}
_OWNED = {"upcycle": {"routing", "seed"}}  # per section; the training sections: _PIPELINE_OWNED


@dataclass
class BaseSection:
    """How to get the base model when `model: minicode`."""

    budget: str = setting("demo", "MiniCode base-model budget (xft.minicode.base.BUDGETS): demo, test or full")
    steps: int | None = setting(None, "override the budget's pretraining steps")
    seed: int = setting(0, "seed of the base model's pretraining (fixed across the experiment's seeds)")


@dataclass
class DataSection:
    """Instruction-tuning data."""

    path: str | None = setting("minicode", "instruction data file (JSONL/JSON/Parquet/datasets dir), or 'minicode' "
                                      "to generate MiniCode's training split")
    size: int | None = setting(None, "records of the MiniCode training split to generate (default: the generator's)")
    merge_subset: float | None = setting(None, "data used to learn the merge: a fraction or a record count "
                                          "(default: all of it, as the paper)")


@dataclass
class EvalSection:
    """Evaluation of every produced model."""

    benchmarks: list = setting(["minicode"], "benchmarks (xft eval registry names), e.g. minicode, humaneval, "
                                        "humaneval+, mbpp, mbpp+")
    limit: int | None = setting(None, "evaluate on the first N tasks of each benchmark only (default: all)")
    # generation settings: DecodingConfig's own (default, help), the one place `xft eval` and the pipeline read
    max_new_tokens: int = setting_of(DecodingConfig, "max_new_tokens")
    batch_size: int = setting_of(DecodingConfig, "batch_size")
    workers: int | None = setting(None, "parallel sandboxed test runs (default: the CPU count)")
    data: dict = setting({}, "benchmark name -> data file, for benchmarks that are not bundled (EvalPlus), e.g. "
                        "--set eval.data.mbpp+=MbppPlus.jsonl.gz (mbpp reads the mbpp+ file unless given its own)")
    expert_impl: str | None = setting_of(DecodingConfig, "expert_impl")  # as xft eval --expert-impl
    sandbox: str = setting_of(ExecutionConfig, "sandbox")  # as xft eval --sandbox


def _study_fields() -> list[tuple]:
    """The study's protocol: seeds, the shared grids, one grid per method that tunes an option of its own."""
    own = [(m.grid, list, setting(list(m.grid_values), f"values of {m.section}.{m.tune} {m.name} is tried with "
                                                       f"({m.label})"))
           for m in METHODS.values() if m.grid and m.grid not in ("lr", "merge_lr")]
    return [
        ("seeds", int, setting(8, "seeds of the study (0 .. seeds-1): every method runs on each, paired by seed")),
        ("tune_seed", int, setting(100, "the seed of the tuning runs (not one of the study's seeds)")),
        ("lr", list, setting([1.5e-3, 3e-3, 6e-3], "learning rates every training method is tried with (same "
                                                   "grid, same budget for all)")),
        ("merge_lr", list, setting([5e-3, 2e-2, 8e-2], "learning rates the learned merge is tried with")),
        *own,
        ("extend", int, setting(2, "times a grid grows by one step beyond an end where some method scored "
                                   "strictly best (every method gets the new rate)")),
        ("select", str, setting("minicode-valid", "the validation benchmark every choice is made on (greedy "
                                                  "pass@1); never one of eval.benchmarks")),
    ]


StudySection = dataclasses.make_dataclass("StudySection", _study_fields(), namespace={
    "__doc__": "The protocol of `xft demo --study` (xft.study); a single `xft run` ignores it.",
    "__module__": __name__})

_SECTION_HELP = {
    "upcycle": "xft.UpcycleConfig fields (num_experts, top_k, router, noisy_gating, ...); routing is set per method",
    "train": "SFTConfig fields for every instruction-tuning run (MoE, dense, EWA, ablations)",
    "merge": "MergeConfig fields for learning the merge (lr, epochs, shared_weight, ...)",
}


def _section_field(name: str) -> tuple:
    """A recipe section's field: a mapping of settings, with its owner's defaults and a help line."""
    layer, owner = LAYERS[name], SECTION_OWNERS.get(name)
    if name in _SECTION_HELP:
        return name, dict, setting({}, _SECTION_HELP[name])
    extra = f"{', '.join(layer.extra)}, plus " if layer.extra else ""
    return name, dict, setting(dict(owner.defaults), f"{extra}{layer.config.__name__} fields overriding "
                                                     f"`{layer.inherits}` for {owner.name} ({owner.label})")


Recipe = dataclasses.make_dataclass("Recipe", [
    ("model", str, setting("minicode", "base model: a local directory, a Hub id, or 'minicode' (build MiniCode's "
                                       "tiny pretrained model)")),
    ("seed", int, setting(0, "seed of every fine-tuning stage (data order, router init, noise)")),
    ("methods", list, setting(list(PAPER_METHODS), f"models to produce and evaluate: {', '.join(METHODS)}")),
    ("precision", str, setting("auto", "training precision for every stage (see xft train --precision)")),
    ("base", BaseSection, field(default_factory=BaseSection, metadata={"help": "MiniCode base model"})),
    ("data", DataSection, field(default_factory=DataSection, metadata={"help": "instruction data"})),
    *[_section_field(name) for name in LAYERS],
    ("eval", EvalSection, field(default_factory=EvalSection, metadata={"help": "evaluation"})),
    ("study", StudySection, field(default_factory=StudySection, metadata={"help": "the study's protocol "
                                                                                    "(xft demo --study)"})),
], namespace={"__doc__": "One XFT experiment: base model -> upcycle -> MoE SFT -> merge -> evaluate, plus "
                         "baselines. Its sections follow from xft.pipeline.methods (one per method's own section).",
              "__module__": __name__})


def upcycle_config(recipe, settings: dict):
    """The `UpcycleConfig` of an upcycle stage: the recipe's `upcycle` section, the stage's `settings` (a method's
    routing, init, balance) on top, the recipe's seed (ConfigError on a bad value)."""
    return UpcycleConfig(**{**recipe.upcycle, **settings, "seed": recipe.seed})


# ---------------------------------------------------------------- sections

def section_settings(recipe: "Recipe", name: str) -> dict:
    """The settings of section `name` with what it inherits: e.g. `merge` is `train` (less the merge's own
    schedule) updated by `merge`; `extra` keys (ewa.share_rate) left out."""
    layer = LAYERS[name]
    inherited = {}
    if layer.inherits:  # a section of the same config (distill over merge) inherits everything
        own = layer.own() if LAYERS[layer.inherits].config is not layer.config else set()
        inherited = {k: v for k, v in section_settings(recipe, layer.inherits).items() if k not in own}
    mine = {k: v for k, v in getattr(recipe, name).items() if k not in layer.extra}
    return {**inherited, **mine}


def _check_sections(recipe: "Recipe") -> None:
    """Every key of every section is a setting of its config with the right type (values: when built)."""
    for name, layer in LAYERS.items():
        values = getattr(recipe, name)
        if not isinstance(values, dict):
            raise UserError(f"{name}: expected a mapping of settings, got {values!r}")
        settings = {k: v for k, v in values.items() if k not in layer.extra}
        checked = check_flat(layer.config, settings, name, skip=_OWNED.get(name, _PIPELINE_OWNED), what="recipe key")
        values.update(checked)  # coerced (YAML's "5e-5" is a float)


def validate(recipe: Recipe) -> Recipe:
    """Check a whole recipe; returns it. Raises UserError naming the first bad key."""
    unknown = [m for m in recipe.methods if m not in METHODS]
    if unknown:
        raise UserError(f"methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if not recipe.methods:
        raise UserError("methods: choose at least one of " + ", ".join(METHODS))
    _check_sections(recipe)
    share_rate = recipe.ewa.get("share_rate")
    if not isinstance(share_rate, (int, float)) or isinstance(share_rate, bool) or not 0 < share_rate <= 1:
        raise UserError(f"ewa.share_rate: expected a number in (0, 1], got {share_rate!r}")
    if recipe.model == "minicode":
        from xft.minicode.base import BUDGETS
        if recipe.base.budget not in BUDGETS:
            raise UserError(f"base.budget: unknown budget {recipe.base.budget!r}; choose from {', '.join(BUDGETS)}")
    if not recipe.data.path:
        raise UserError("data.path: this recipe needs your instruction data: --set data.path=FILE")
    if recipe.data.path != "minicode" and not Path(recipe.data.path).exists():
        raise UserError(f"data.path: {recipe.data.path} does not exist")
    if not recipe.eval.benchmarks:
        raise UserError("eval.benchmarks: name at least one benchmark")
    for key in sorted({m.study_grid for m in METHODS.values() if m.tuned}):
        grid = getattr(recipe.study, key)
        if not grid or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in grid):
            raise UserError(f"study.{key}: expected a non-empty list of positive values, got {grid!r}")
    return recipe


# ---------------------------------------------------------------- building from YAML + overrides

def _build(cls, values: dict, where: str):
    """Dataclass `cls` from a mapping; nested dataclass sections are built recursively."""
    _check_fields_shallow(cls, values, where)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    defaults = {f.name: f.default_factory() for f in dataclasses.fields(cls)
                if f.default_factory is not dataclasses.MISSING}
    for key, value in values.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{where}.{key}" if where else key)
        elif isinstance(defaults.get(key), dict) and isinstance(value, dict):
            kwargs[key] = {**defaults[key], **value}  # a section given in part keeps its other defaults
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _check_fields_shallow(cls, values, where):
    if not isinstance(values, dict):
        raise UserError(f"{where or 'recipe'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            raise UserError(f"unknown recipe key {path}{closest(key, known)}; known keys here: "
                            f"{', '.join(known)}")
        tp = hints[key]
        value = values[key] = coerce(value, tp)
        if not dataclasses.is_dataclass(tp) and not type_ok(value, tp):
            raise UserError(f"{path}: expected {type_name(tp)}, got {value!r}")


def parse_override(text: str) -> tuple[list[str], object]:
    """`"train.max_steps=2"` -> (["train", "max_steps"], 2); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.max_steps=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML: take it as a plain string
    return [part.strip().replace("-", "_") for part in key.split(".")], value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """A copy of the recipe mapping `values` with every `KEY=VALUE` override set (keys checked later)."""
    import copy

    out = copy.deepcopy(values)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        if path == ["data"] and isinstance(value, str) and isinstance(node.get("data"), dict):
            path = ["data", "path"]  # --set data=FILE
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise UserError(f"--set {text!r}: {'.'.join(path[:i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """The mapping in recipe file `path` (UserError if missing or not YAML)."""
    p = Path(path)
    if not p.is_file():
        if not recipe_path(str(path)).is_file():
            raise UserError(f"recipe {path} does not exist (bundled recipes: {', '.join(bundled_recipes())})")
        p = recipe_path(str(path))
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"recipe {p}: expected a mapping at the top level")
    return values


def bundled_recipes() -> list[str]:
    """Names of the recipes shipped in the package."""
    return recipes.names()


def recipe_path(name: str) -> Path:
    """The file of bundled recipe `name` (e.g. "minicode" or "minicode.yaml")."""
    return recipes.path(name)


def from_dict(values: dict) -> Recipe:
    """A validated `Recipe` from a mapping (`data: FILE` is short for `data: {path: FILE}`)."""
    if isinstance(values.get("data"), str):
        values = dict(values, data={"path": values["data"]})
    return validate(_build(Recipe, values, ""))


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read recipe `path` (a file, or the name of a bundled recipe), apply `--set` overrides, validate."""
    return from_dict(apply_overrides(read_yaml(path), list(overrides)))


def to_dict(recipe: Recipe) -> dict:
    """Plain mapping (for run directories and reports)."""
    return dataclasses.asdict(recipe)
