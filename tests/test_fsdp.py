"""FSDP2 (and DeepSpeed ZeRO-3, where deepspeed is installed) with two CPU processes, launched as the docs say:

    accelerate launch --config_file $(python -m xft.configs fsdp) --num_processes 2 -m xft.cli train ...

accelerate alone would run such a launch as gloo DDP on CPUs (it turns a launch into FSDP only on
GPUs); xft makes it shard (`xft.training.trainer.fsdp_on_cpu`), and `xft_training.json` records
`"distributed": "FSDP"`. Each test checks one property: the same weights as one process with the
same global batch (MoE with experts that get no token, dense), the same weights after kill -9 and
re-run, one FSDP unit per decoder layer, and a saved model that loads without FSDP.
"""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

import xft
from test_train import make_workspace
from test_train_distributed import ARGS, curve, idle_expert_moe, launch, max_difference

pytestmark = pytest.mark.slow  # each test runs 2-3 trainings on 2 shared cores

TIMEOUT = 400  # s; a hang (a collective waiting for a process that never joins) fails here


def record(run) -> dict:
    with open(run / "xft_training.json") as f:
        return json.load(f)


def fsdp_and_one_process(tmp_path, args: list[str], config: str = "fsdp", strategy: str = "FSDP") -> tuple:
    """Run `xft ARGS` as 2 processes launched with accelerate config `config` and as 1 process;
    (2-process run dir, 1-process run dir)."""
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    two = launch([*args, "--out", str(fsdp)], config=config)
    single = subprocess.run([sys.executable, "-m", "xft.cli", *args, "--out", str(one)], capture_output=True,
                            text=True, timeout=TIMEOUT)
    out, _ = two.communicate(timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr[-2000:]
    assert two.returncode == 0, out[-3000:]
    assert (record(fsdp)["processes"], record(fsdp)["distributed"]) == (2, strategy)  # really sharded
    return fsdp, one


def same_logits(a, b, load) -> None:
    """Models saved in `a` and `b`, loaded by `load` in this process (no FSDP), give the same logits."""
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        la, lb = load(str(a)).eval()(ids).logits, load(str(b)).eval()(ids).logits
    assert torch.isfinite(la).all()
    assert (la - lb).abs().max().item() < 1e-4


def test_fsdp_moe_sft_matches_one_process_with_idle_experts(tmp_path):
    ws = make_workspace(tmp_path)
    moe = idle_expert_moe(ws)  # experts 2 and 3 get no token: their FSDP shards still take part in every step
    t0 = time.perf_counter()
    fsdp, one = fsdp_and_one_process(tmp_path, ["train", str(moe), "--data", str(ws / "data.jsonl"), *ARGS])
    assert time.perf_counter() - t0 < TIMEOUT  # finished, in bounded time

    for run in (fsdp, one):
        first = json.loads((run / "routing.jsonl").read_text().splitlines()[0])
        assert first["layers"]["0"]["load_share"][1:] == [0.0, 0.0]  # experts 2 and 3 got no token
    (_, c_fsdp), (_, c_one) = curve(fsdp), curve(one)
    assert len(c_one) == 6 and c_one[-1] < c_one[0]
    assert c_fsdp == pytest.approx(c_one, rel=1e-4)
    assert max_difference(fsdp, one) < 1e-4
    same_logits(fsdp, one, xft.load)  # the FSDP run's MoE loads whole, without FSDP


def test_fsdp_dense_sft_matches_one_process(tmp_path):
    ws = make_workspace(tmp_path)
    fsdp, one = fsdp_and_one_process(tmp_path, ["train", str(ws / "llama"), "--data", str(ws / "data.jsonl"),
                                                *ARGS])
    (_, c_fsdp), (_, c_one) = curve(fsdp), curve(one)
    assert c_fsdp == pytest.approx(c_one, rel=1e-4) and c_one[-1] < c_one[0]
    assert max_difference(fsdp, one) < 1e-4
    same_logits(fsdp, one, AutoModelForCausalLM.from_pretrained)  # plain transformers, no xft, no FSDP


UNITS = r"""
import json, os, sys
import torch
from torch.distributed.fsdp import FSDPModule
from transformers import TrainingArguments
import xft
from xft.training.trainer import XFTTrainer

model = xft.load(sys.argv[1])
args = TrainingArguments(output_dir=sys.argv[2], use_cpu=True, report_to=[])
trainer = XFTTrainer(model=model, args=args)
model, _ = trainer.accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
units = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
local = {n: [list(p.shape), list(p.to_local().shape)] for n, p in model.named_parameters()}
if os.environ["RANK"] == "0":
    print("UNITS " + json.dumps({"units": units, "local": local}))
"""


def test_fsdp_shards_each_decoder_layer_as_one_unit(tmp_path):
    """TRANSFORMER_BASED_WRAP from `_no_split_modules`: a decoder layer (attention + MoE block with its stacked
    experts) is one FSDP unit; nothing inside it is a unit of its own, and its parameters are sharded."""
    ws = make_workspace(tmp_path)
    moe = idle_expert_moe(ws)
    script = tmp_path / "units.py"
    script.write_text(UNITS)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           xft.configs.accelerate_config("fsdp"), "--num_processes", "2", str(script), str(moe),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("UNITS "))[6:])
    layers = [u for u in found["units"] if u.startswith("model.layers.")]
    assert layers == ["model.layers.0", "model.layers.1"]  # no unit below a layer: the MoE block is inside
    shape, local = found["local"]["model.layers.0.mlp.experts.gate_proj.weight"]
    assert shape[0] == 4 and local[0] == 2  # the 4 stacked experts: 2 on each process


STEPS, SAVE = 10, 3  # 8 steps per epoch: the checkpoint at step 3 is mid-epoch


def test_fsdp_kill_9_after_checkpoint_then_rerun_gives_identical_weights(tmp_path):
    ws = make_workspace(tmp_path)
    from xft.cli import main as cli

    # Noisy gating: the router noise comes from the RNG state the Trainer checkpoints.
    assert cli(["upcycle", str(ws / "llama"), "--out", str(ws / "moe"), "--num-experts", "4", "--top-k", "3"]) == 0
    args = ["train", str(ws / "moe"), "--data", str(ws / "data.jsonl"), "--max-steps", str(STEPS), "--save-steps",
            str(SAVE), "--batch-size", "8", "--micro-batch-size", "2", "--warmup-steps", "2", "--lr", "1e-2",
            "--logging-steps", "1", "--no-progress"]
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    proc = launch([*args, "--out", str(interrupted)], config="fsdp")
    state = interrupted / f"checkpoint-{SAVE}" / "trainer_state.json"
    t0 = time.time()
    while not state.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() - t0 < TIMEOUT, "no checkpoint in time"
        time.sleep(0.05)
    # kill -9 the launcher and both training processes at once, as a lost node would (the workers do not
    # share the launcher's process group).
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        os.kill(p.pid, signal.SIGKILL)
    proc.communicate()
    assert not (interrupted / "config.json").exists()

    out, _ = launch([*args, "--out", str(interrupted)], config="fsdp").communicate(timeout=TIMEOUT)
    assert record(interrupted)["resumed_from"].endswith(f"checkpoint-{SAVE}"), out[-3000:]
    out, _ = launch([*args, "--out", str(reference)], config="fsdp").communicate(timeout=TIMEOUT)
    assert record(reference)["distributed"] == "FSDP", out[-3000:]
    assert max_difference(interrupted, reference) < 1e-5
    assert curve(interrupted)[1] == pytest.approx(curve(reference)[1], rel=1e-5)


ZERO3 = r"""
import json, os, sys
import torch
from deepspeed.utils import get_z3_leaf_modules
from transformers import TrainingArguments
import xft
from xft.training.trainer import XFTTrainer

moe = xft.load(sys.argv[1])
merge = xft.build_merge_model(xft.load(sys.argv[1]))
found = {}
for name, model in (("moe", moe), ("merge", merge)):
    for m in model.modules():
        m._z3_leaf = False  # start from nothing: what is a leaf below, the trainer registered
    args = TrainingArguments(output_dir=sys.argv[2], use_cpu=True, report_to=[])
    trainer = XFTTrainer(model=model, args=args)
    found[name] = {"deepspeed": trainer.is_deepspeed_enabled,
                   "leaves": sorted({type(m).__name__ for m in get_z3_leaf_modules(model)}),
                   "count": len(get_z3_leaf_modules(model))}
if os.environ["RANK"] == "0":
    print("LEAVES " + json.dumps(found))
"""


def test_zero3_registers_moe_and_merge_blocks_as_leaf_modules(tmp_path):
    """Under an `accelerate launch` with the shipped ZeRO-3 config, the trainer marks every MoE block and every
    learnable-merge block a ZeRO-3 leaf (real deepspeed.utils.set_z3_leaf_modules / get_z3_leaf_modules)."""
    pytest.importorskip("deepspeed")
    ws = make_workspace(tmp_path)
    moe = idle_expert_moe(ws)
    script = tmp_path / "zero3.py"
    script.write_text(ZERO3)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           xft.configs.accelerate_config("deepspeed_zero3"), "--num_processes", "2", str(script),
                           str(moe), str(tmp_path / "out")], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("LEAVES "))[7:])
    assert found["moe"] == {"deepspeed": True, "leaves": ["MoEBlock"], "count": 2}  # one per decoder layer
    assert found["merge"] == {"deepspeed": True, "leaves": ["LearnableMerge"], "count": 2}


def test_zero3_moe_sft_matches_one_process_with_idle_experts(tmp_path):
    """DeepSpeed runs on CPU here (its CPU accelerator, gloo): ZeRO-3 trains like one process. With AdamW:
    DeepSpeed hands a client optimizer flat 1-D partitions, on which Adafactor is not Adafactor (no factored
    row/column statistics), so xft warns when Adafactor is used under DeepSpeed."""
    pytest.importorskip("deepspeed")
    ws = make_workspace(tmp_path)
    moe = idle_expert_moe(ws)
    fsdp, one = fsdp_and_one_process(tmp_path, ["train", str(moe), "--data", str(ws / "data.jsonl"), *ARGS,
                                                "--optimizer", "adamw_torch"], "deepspeed_zero3", "DEEPSPEED")
    (_, c_z3), (_, c_one) = curve(fsdp), curve(one)
    assert c_z3 == pytest.approx(c_one, rel=1e-4) and c_one[-1] < c_one[0]
    assert max_difference(fsdp, one) < 1e-4
    same_logits(fsdp, one, xft.load)


@pytest.mark.parametrize("precision", ["bf16", "bf16-pure"])
def test_fsdp_trains_in_bf16_on_cpu(tmp_path, precision):
    """bf16 mixed (FSDP casts the fp32 shards to bf16 for compute) and bf16-pure (bf16 shards) under FSDP."""
    ws = make_workspace(tmp_path)
    moe = idle_expert_moe(ws)
    out = tmp_path / "fsdp"
    log, _ = launch(["train", str(moe), "--data", str(ws / "data.jsonl"), *ARGS, "--precision", precision,
                     "--out", str(out)], config="fsdp").communicate(timeout=TIMEOUT)
    assert (out / "config.json").exists(), log[-3000:]
    assert (record(out)["distributed"], record(out)["precision"]) == ("FSDP", precision)
    losses = curve(out)[1]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    saved = {v.dtype for v in xft.load(str(out)).state_dict().values() if v.is_floating_point()}
    assert saved == {torch.float32 if precision == "bf16" else torch.bfloat16}


def test_fsdp_learned_merge_matches_one_process(tmp_path):
    ws = make_workspace(tmp_path)
    moe = idle_expert_moe(ws)
    from xft.cli import main as cli

    # A trained MoE (the upcycled one's experts are identical: every merge would be the same).
    assert cli(["train", str(moe), "--data", str(ws / "data.jsonl"), *ARGS, "--out", str(ws / "trained")]) == 0
    fsdp, one = fsdp_and_one_process(tmp_path, ["merge", str(ws / "trained"), "--data", str(ws / "data.jsonl"),
                                                *ARGS, "--lr", "1e-1"])
    logits = [json.loads((run / "merge_coefficients.json").read_text())["mixing_logits"] for run in (fsdp, one)]
    assert logits[0].keys() == logits[1].keys() and logits[1]["0"] != [0.0] * 3
    assert all(logits[0][k] == pytest.approx(logits[1][k], abs=1e-5) for k in logits[0])
    assert curve(fsdp)[1] == pytest.approx(curve(one)[1], rel=1e-4)
    assert max_difference(fsdp, one) < 1e-4
    same_logits(fsdp, one, AutoModelForCausalLM.from_pretrained)  # a plain dense Llama
