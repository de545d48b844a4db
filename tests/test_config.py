"""The config layer: one typed definition per setting, composed configs, and one bridge to flags and mappings."""

from __future__ import annotations

import dataclasses

import pytest

from xft.cli import main
from xft.config import (
    ConfigError, DataConfig, MergeConfig, SFTConfig, UpcycleConfig, flat_settings, from_flat, to_flat,
)


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["upcycle", "train"])
def test_every_upcycle_setting_is_a_flag(command, capsys):
    out = _help(command, capsys)
    for f in dataclasses.fields(UpcycleConfig):
        if command == "train" and f.name == "seed":
            continue  # in a training run the routers' init follows the run's --seed
        assert "--" + f.name.replace("_", "-") in out, f.name


def test_sft_config_composes_upcycle_and_data():
    cfg = from_flat(SFTConfig, {"model": "m", "data": "d.jsonl", "out": "o", "upcycle": True, "num_experts": 4,
                                "top_k": 3, "balance_loss_weight": 0.02, "expert_impl": "generic",
                                "template": "alpaca", "eval_fraction": 0.1, "seed": 7})
    assert cfg.upcycle == UpcycleConfig(num_experts=4, top_k=3, balance_loss_weight=0.02, expert_impl="generic",
                                        seed=7)
    assert cfg.data == DataConfig(path="d.jsonl", template="alpaca", eval_fraction=0.1, seed=7)
    flat = to_flat(cfg)
    assert flat["upcycle"] is True and flat["num_experts"] == 4 and flat["data"] == "d.jsonl"
    assert from_flat(SFTConfig, flat) == cfg  # the bridge round-trips
    dense = SFTConfig(model="m", data="d.jsonl", out="o")
    assert dense.upcycle is None and to_flat(dense)["upcycle"] is False and to_flat(dense)["num_experts"] is None
    assert from_flat(SFTConfig, to_flat(dense)) == dense


def test_one_flat_name_per_setting():
    slots = flat_settings(SFTConfig)
    assert slots["num_experts"].path == ("upcycle", "num_experts")
    assert slots["data"].path == ("data", "path") and slots["eval_data"].path == ("data", "eval_path")
    assert slots["seed"].path == ("seed",)  # the run's seed; the composed configs' seeds follow it
    names = [f.name for f in dataclasses.fields(UpcycleConfig) if f.name != "seed"]
    assert all(n in slots for n in names)


def test_bad_settings_are_named(capsys):
    with pytest.raises(ConfigError, match=r"unknown setting train\.lrr \(did you mean 'lr'\?\)"):
        from_flat(SFTConfig, {"lrr": 1e-4}, where="train")
    with pytest.raises(ConfigError, match=r"train\.lr: expected float, got 'fast'"):
        from_flat(SFTConfig, {"lr": "fast"}, where="train")
    with pytest.raises(ConfigError, match=r"--num-experts only applies with --upcycle"):
        from_flat(SFTConfig, {"model": "m", "data": "d", "out": "o", "num_experts": 4})
    with pytest.raises(ConfigError, match="lr must be positive"):
        SFTConfig(model="m", data="d", out="o", lr=0)  # validated on construction
    with pytest.raises(ConfigError, match="routing='nope'; expected one of"):
        UpcycleConfig(routing="nope")
    with pytest.raises(ConfigError, match="missing required setting: data"):
        SFTConfig(model="m", out="o")
    assert from_flat(SFTConfig, {"model": "m", "data": "d", "out": "o", "lr": "5e-5"}).lr == 5e-5  # YAML 1.1


def test_registries_are_the_lists_of_choices(monkeypatch, capsys):
    """A routing, expert kernel or merge method registered at runtime is a valid choice at once."""
    import xft.routing
    from xft.merge_methods import MERGE_METHODS

    monkeypatch.setitem(xft.routing.ROUTINGS, "mine", xft.routing.ROUTINGS["xft"])
    assert UpcycleConfig(routing="mine").shared_expert
    monkeypatch.setitem(MERGE_METHODS, "mine", MERGE_METHODS["init"])
    assert MergeConfig(moe="m", out="o", method="mine").method == "mine"
    from xft.cli import build_parser

    # the flag reads the registry when it is given (not to build the parser: --help loads no torch)
    assert build_parser("upcycle").parse_args(["upcycle", "m", "--out", "o", "--routing", "mine"]).routing == "mine"


def test_merge_settings_inherit_as_declared_defaults():
    merge, sft = MergeConfig(moe="m", out="o", method="init"), SFTConfig(model="m", data="d", out="o")
    assert (merge.lr, merge.epochs, merge.warmup_steps) == (1e-5, 1.0, 125)  # the paper's merge schedule
    assert merge.batch_size == sft.batch_size and merge.data is None  # a fixed merge needs no data
    with pytest.raises(ConfigError, match="trains on data"):
        MergeConfig(moe="m", out="o")


def test_eval_generation_flags_are_the_decoding_config(capsys):
    from xft.config import DecodingConfig

    out = _help("eval", capsys)
    for f in dataclasses.fields(DecodingConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name
    with pytest.raises(ConfigError, match="greedy decoding"):
        DecodingConfig(n_samples=2)  # validated on construction
    with pytest.raises(ConfigError, match="template='nope'"):
        DecodingConfig(template="nope")


def test_recipe_sections_layer_as_declared():
    """merge = train less the schedule MergeConfig declares + merge; dense and ewa = train + their own."""
    from xft.pipeline.recipe import load_recipe, section_settings

    recipe = load_recipe("minicode", ["train.max_steps=2", "train.batch_size=32", "merge.lr=0.01", "ewa.lr=0.5"])
    merge, ewa, dense = (section_settings(recipe, s) for s in ("merge", "ewa", "dense"))
    assert merge["batch_size"] == ewa["batch_size"] == dense["batch_size"] == 32
    assert dense["max_steps"] == ewa["max_steps"] == 2 and merge.get("max_steps") != 2
    assert merge["lr"] == 0.01 and ewa["lr"] == 0.5 and dense["lr"] == recipe.train["lr"]
    assert "share_rate" not in ewa
    with pytest.raises(ConfigError, match=r"unknown recipe key merge\.lrr \(did you mean 'lr'\?\)"):
        load_recipe("minicode", ["merge.lrr=1"])
