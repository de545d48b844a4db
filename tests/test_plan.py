"""`xft plan` and `benchmarks/gpu_check.py`: relations the memory plan must respect, and the GPU check on CPU.

No expected numbers: the parameter count is checked against the model itself
(built on the meta device), everything else as a relation between plans.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import xft
from xft.cli import main
from xft.plan import STAGES, PlanConfig, Shape, plan_stage

ROOT = Path(__file__).resolve().parents[1]
DEEPSEEK_1_3B = dict(model_type="llama", hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                     num_attention_heads=16, num_key_value_heads=16, vocab_size=32256,
                     max_position_embeddings=16384, tie_word_embeddings=False)


@pytest.fixture
def config_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(DEEPSEEK_1_3B))
    return path


def _cfg(**kw):
    return PlanConfig(model="m", **kw)


def _shape(**kw):
    return Shape.from_config(DEEPSEEK_1_3B, **kw)


@pytest.mark.parametrize("kv_heads,tied", [(4, False), (2, True)])
def test_parameter_counts_equal_the_models(kv_heads, tied):
    """Dense and upcycled parameter counts from the config alone equal those of the real modules."""
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=300, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        model.tie_weights()
        dense = sum(p.numel() for p in model.parameters())
        xft.upcycle(model, xft.UpcycleConfig(num_experts=4, top_k=2))
        moe = sum(p.numel() for p in model.parameters())
    shape = Shape.from_config(config.to_dict(), num_experts=4, top_k=2)
    assert (shape.parameters(False), shape.parameters(True)) == (dense, moe)


def test_cli_prints_every_stage_from_a_config_json(config_json, capsys):
    assert main(["plan", str(config_json)]) == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert f"{stage}: cheapest that fits:" in out
    for column in ("weights", "grads", "optimizer", "activations", "overhead", "total", "fits"):
        assert column in out


def test_cli_takes_a_model_directory(config_json, capsys):
    assert main(["plan", str(config_json.parent), "--stage", "moe-sft", "--strategy", "fsdp"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("moe-sft ")]
    assert len(rows) == 1 and " fsdp " in rows[0]


@pytest.mark.parametrize("argv,needle", [
    (["--strategy", "zero2"], "invalid choice"),
    (["--gpus", "many"], "invalid int value"),
    (["--gpus", "0"], "gpus must be at least 1"),
    (["--gpu-memory", "-1"], "gpu memory must be positive"),
])
def test_a_bad_flag_is_a_one_line_error(config_json, capsys, argv, needle):
    try:
        code = main(["plan", str(config_json), *argv])
    except SystemExit as e:  # argparse's own errors (after its usage line)
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("xft plan: error:") and needle in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_a_missing_model_and_a_non_llama_config_are_one_line_errors(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "nothing_here")]) == 2
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    assert main(["plan", str(tmp_path / "config.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("xft plan: error:") for line in err)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-pure"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_moe_sft_needs_more_than_dense_sft(precision, strategy):
    cfg, shape = _cfg(precision=precision), _shape()
    assert plan_stage(shape, cfg, "moe-sft", strategy).total > plan_stage(shape, cfg, "dense-sft", strategy).total


@pytest.mark.parametrize("stage", ["dense-sft", "moe-sft", "merge"])
def test_sharding_over_8_gpus_needs_less_per_gpu_than_ddp(stage):
    cfg, shape = _cfg(gpus=8), _shape()
    ddp = plan_stage(shape, cfg, stage, "ddp")
    for strategy in ("fsdp", "zero3"):
        sharded = plan_stage(shape, cfg, stage, strategy)
        assert sharded.total < ddp.total and sharded.weights < ddp.weights


def test_on_one_gpu_sharding_saves_nothing():
    cfg, shape = _cfg(gpus=1), _shape()
    assert plan_stage(shape, cfg, "moe-sft", "fsdp").total >= plan_stage(shape, cfg, "moe-sft", "ddp").total


def test_merge_trains_almost_nothing_but_holds_the_moe():
    cfg, shape = _cfg(), _shape()
    merge, moe = plan_stage(shape, cfg, "merge", "ddp"), plan_stage(shape, cfg, "moe-sft", "ddp")
    assert merge.trainable < 1e-4 * merge.parameters
    assert merge.optimizer < 1e-4 * moe.optimizer + 1e6
    assert merge.weights >= 0.99 * moe.weights * (merge.parameters / moe.parameters)


def test_relations_of_precision_optimizer_checkpointing_and_batch():
    shape = _shape()
    for stage in ("dense-sft", "moe-sft"):
        plans = {p: plan_stage(shape, _cfg(precision=p), stage, "ddp") for p in ("fp32", "bf16", "bf16-pure")}
        assert plans["bf16-pure"].total < plans["fp32"].total
        assert plans["bf16-pure"].weights < plans["bf16"].weights  # mixed keeps fp32 master weights
        ada = plan_stage(shape, _cfg(micro_batch=1, seq_len=16), stage, "ddp")
        adam = plan_stage(shape, _cfg(micro_batch=1, seq_len=16, optimizer="adamw_torch"), stage, "ddp")
        assert adam.optimizer > 10 * ada.optimizer  # two full moments vs factored rows + columns
        full = plan_stage(shape, _cfg(), stage, "fsdp")
        ckpt = plan_stage(shape, _cfg(gradient_checkpointing=True), stage, "fsdp")
        assert ckpt.activations < full.activations
        bigger = plan_stage(shape, _cfg(micro_batch=16), stage, "fsdp")
        assert bigger.activations > full.activations


def test_more_experts_and_a_larger_top_k_cost_more():
    cfg = _cfg()
    base = plan_stage(_shape(), cfg, "moe-sft", "ddp")
    assert plan_stage(_shape(num_experts=16), cfg, "moe-sft", "ddp").weights > base.weights
    assert plan_stage(_shape(top_k=8), cfg, "moe-sft", "ddp").activations > base.activations


def test_the_suggestion_fits_and_nothing_fits_a_tiny_gpu():
    from xft.plan import suggest

    shape = _shape()
    assert suggest(shape, _cfg(gpus=8, gpu_memory=80), "dense-sft") == "ddp"
    assert suggest(shape, _cfg(gpus=8, gpu_memory=0.5), "moe-sft").startswith("nothing fits")


def test_an_moe_config_gives_its_own_experts():
    config = {**DEEPSEEK_1_3B, "xft": {"num_experts": 4, "top_k": 2, "routing": "xft"}}
    shape = Shape.from_config(config)
    assert (shape.num_experts, shape.top_k) == (4, 2)
    assert Shape.from_config(config, num_experts=6).num_experts == 6


def test_a_saved_moe_is_planned_with_its_own_experts(tmp_path, capsys):
    from xft.testing import tiny_model

    moe = xft.upcycle(tiny_model("llama"), xft.UpcycleConfig(num_experts=4, top_k=2))
    moe.save_pretrained(tmp_path / "moe")
    assert main(["plan", str(tmp_path / "moe"), "--stage", "moe-sft"]) == 0
    assert "MoE with 4 experts, top-2" in capsys.readouterr().out


def test_plan_help_imports_no_torch():
    code = ("import sys\nfrom xft.cli import main\ntry:\n    main(['plan', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.slow  # ~15 s; CI runs the slow suite, so the script cannot rot
def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    """benchmarks/gpu_check.py --tiny: the GPU check's whole path on CPU, so the script cannot rot."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    for stage in ("moe-sft", "merge (learn + compile)", "generate (transformers)"):
        assert stage in run.stdout
    assert "gpu_check: done" in run.stdout
    merged = tmp_path / "merged"
    assert (merged / "config.json").is_file() and "xft" not in json.loads((merged / "config.json").read_text())


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw_torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_state_equals_what_the_trainers_optimizer_allocates(tmp_path, optimizer, dtype):
    """The plan's optimizer state for the MoE equals the bytes of the state tensors after one real step."""
    from transformers import Trainer, TrainingArguments

    from xft.plan import _optimizer_state

    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    xft.upcycle(model, xft.UpcycleConfig(num_experts=4, top_k=2))
    args = TrainingArguments(output_dir=str(tmp_path), optim=optimizer, report_to=[], use_cpu=True)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    opt = cls(model.parameters(), **kwargs)
    ids = torch.randint(0, 100, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    allocated = sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values()
                    if torch.is_tensor(t) and t.dim() > 0)
    shape = Shape.from_config(config.to_dict(), num_experts=4, top_k=2)
    assert _optimizer_state(shape.shapes(True), optimizer, dtype.itemsize) == allocated


def test_merge_activations_hold_the_merged_weights_and_moe_the_k_copies():
    from xft.plan import _activations

    cfg, shape = _cfg(micro_batch=1, seq_len=256), _shape()
    dense, moe, merge = (_activations(shape, cfg, s) for s in ("dense-sft", "moe-sft", "merge"))
    assert dense < merge and dense < moe
