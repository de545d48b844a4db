"""Recipes: the whole XFT experiment as one typed, validated YAML file plus `--set` overrides.

A recipe names the base model and data, which methods to produce, and the
settings of every stage. Sections `train`, `dense`, `merge` and `ewa` hold
fields of `xft.train.SFTConfig` / `MergeConfig` (the training stages' own
configs, so the help text and defaults live in one place); `upcycle` holds
fields of `xft.UpcycleConfig`.

    recipe = load_recipe("recipes/minicode.yaml", ["train.max_steps=2", "model=/path/to/model"])

Guarantees: every key of the file and of every override is checked against
the dataclasses below before anything runs; an unknown key or a value of the
wrong type is a `UserError` naming it (and, for a typo, the known keys).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from xft.errors import UserError
from xft import recipes
from xft.pipeline.methods import METHODS  # the models a recipe can produce, in report order

# Fields the pipeline fills in itself (paths between stages); a recipe may not set them.
_PIPELINE_OWNED = {"model", "moe", "data", "out", "upcycle", "num_experts", "top_k", "routing", "router",
                   "ewa_share_rate", "method", "overwrite"}


def _f(default, help: str):
    """A dataclass field with help text; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class BaseSection:
    """How to get the base model when `model: minicode`."""

    budget: str = _f("demo", "MiniCode base-model budget (xft.minicode.base.BUDGETS): demo, test or full")
    steps: int | None = _f(None, "override the budget's pretraining steps")
    seed: int = _f(0, "seed of the base model's pretraining (fixed across the experiment's seeds)")


@dataclass
class DataSection:
    """Instruction-tuning data."""

    path: str | None = _f("minicode", "instruction data file (JSONL/JSON/Parquet/datasets dir), or 'minicode' "
                                      "to generate MiniCode's training split")
    size: int | None = _f(None, "records of the MiniCode training split to generate (default: the generator's)")
    merge_subset: float | None = _f(None, "data used to learn the merge: a fraction or a record count "
                                          "(default: all of it, as the paper)")


@dataclass
class EvalSection:
    """Evaluation of every produced model."""

    benchmarks: list = _f(["minicode"], "benchmarks (xft eval registry names), e.g. minicode, humaneval, "
                                        "humaneval+, mbpp, mbpp+")
    limit: int | None = _f(None, "evaluate on the first N tasks of each benchmark only (default: all)")
    max_new_tokens: int = _f(384, "generation length limit per task (greedy decoding)")
    batch_size: int = _f(16, "prompts generated together")
    workers: int | None = _f(None, "parallel sandboxed test runs (default: the CPU count)")
    data: dict = _f({}, "benchmark name -> data file, for benchmarks that are not bundled (EvalPlus), e.g. "
                        "--set eval.data.mbpp+=MbppPlus.jsonl.gz (mbpp reads the mbpp+ file unless given its own)")


@dataclass
class Recipe:
    """One XFT experiment: base model -> upcycle -> MoE SFT -> merge -> evaluate, plus baselines."""

    model: str = _f("minicode", "base model: a local directory, a Hub id, or 'minicode' (build MiniCode's "
                                "tiny pretrained model)")
    seed: int = _f(0, "seed of every fine-tuning stage (data order, router init, noise)")
    methods: list = _f(list(METHODS), f"models to produce and evaluate: {', '.join(METHODS)}")
    precision: str = _f("auto", "training precision for every stage (see xft train --precision)")
    base: BaseSection = field(default_factory=BaseSection, metadata={"help": "MiniCode base model"})
    data: DataSection = field(default_factory=DataSection, metadata={"help": "instruction data"})
    upcycle: dict = _f({}, "xft.UpcycleConfig fields (num_experts, top_k, router, noisy_gating, ...); "
                           "routing is set per method")
    train: dict = _f({}, "SFTConfig fields for every instruction-tuning run (MoE, dense, EWA, ablations)")
    dense: dict = _f({}, "SFTConfig fields overriding `train` for the dense SFT baseline")
    ewa: dict = _f({"share_rate": 0.3}, "EWA: share_rate (β), plus SFTConfig fields overriding `train`")
    merge: dict = _f({}, "MergeConfig fields for learning the merge (lr, epochs, shared_weight, ...)")
    eval: EvalSection = field(default_factory=EvalSection, metadata={"help": "evaluation"})


# ---------------------------------------------------------------- validation helpers

def _closest(name: str, known) -> str:
    match = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _type_ok(value, tp) -> bool:
    """Whether `value` fits the annotation `tp` (int is accepted for float, None for Optional)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", ())):
        return any(_type_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, tp)


def _coerce(value, tp):
    """YAML 1.1 reads `5e-5` as a string: give float fields their number back; an empty section is {}."""
    if value is None and tp is dict:
        return {}
    if isinstance(value, str) and float in (typing.get_args(tp) or (tp,)):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    return " or ".join(_type_name(a) for a in args) if args else getattr(tp, "__name__", str(tp))


def _check_fields(cls, values: dict, where: str, skip: set[str] = frozenset()) -> None:
    """Every key of `values` is a field of dataclass `cls` and has its type; UserError otherwise."""
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a mapping of settings, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - skip
    for key, value in values.items():
        if key not in known:
            if key in skip:
                raise UserError(f"recipe key {where}.{key} cannot be set: the pipeline sets it per stage")
            raise UserError(f"unknown recipe key {where}.{key}{_closest(key, known)}")
        value = values[key] = _coerce(value, hints[key])
        if not _type_ok(value, hints[key]):
            raise UserError(f"{where}.{key}: expected {_type_name(hints[key])}, got {value!r}")


def _section_classes():
    """Section name -> (config class it holds fields of, fields the pipeline owns there)."""
    import xft
    from xft.train import MergeConfig, SFTConfig

    return {"train": (SFTConfig, _PIPELINE_OWNED), "dense": (SFTConfig, _PIPELINE_OWNED),
            "merge": (MergeConfig, _PIPELINE_OWNED), "upcycle": (xft.UpcycleConfig, {"routing"})}


def validate(recipe: Recipe) -> Recipe:
    """Check a whole recipe; returns it. Raises UserError naming the first bad key."""
    unknown = [m for m in recipe.methods if m not in METHODS]
    if unknown:
        raise UserError(f"methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if not recipe.methods:
        raise UserError("methods: choose at least one of " + ", ".join(METHODS))
    for name, (cls, owned) in _section_classes().items():
        _check_fields(cls, getattr(recipe, name), name, skip=owned)
    from xft.train import SFTConfig
    ewa = dict(recipe.ewa)
    share_rate = ewa.pop("share_rate", None)
    if not isinstance(share_rate, (int, float)) or isinstance(share_rate, bool) or not 0 < share_rate <= 1:
        raise UserError(f"ewa.share_rate: expected a number in (0, 1], got {share_rate!r}")
    _check_fields(SFTConfig, ewa, "ewa", skip=_PIPELINE_OWNED)
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
    return recipe


# ---------------------------------------------------------------- building from YAML + overrides

def _build(cls, values: dict, where: str):
    """Dataclass `cls` from a mapping; nested dataclass sections are built recursively."""
    _check_fields_shallow(cls, values, where)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{where}.{key}" if where else key)
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
            raise UserError(f"unknown recipe key {path}{_closest(key, known)}; known keys here: "
                            f"{', '.join(known)}")
        tp = hints[key]
        value = values[key] = _coerce(value, tp)
        if not dataclasses.is_dataclass(tp) and not _type_ok(value, tp):
            raise UserError(f"{path}: expected {_type_name(tp)}, got {value!r}")


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
