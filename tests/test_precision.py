"""Every `--precision` trains on CPU: a few MoE SFT steps each, what really ran checked from inside.

fp32; bf16 (mixed: fp32 weights and optimizer, forward and backward under bf16
autocast); bf16-pure (bf16 weights, the paper's code); auto (fp32 without a CUDA
GPU). A global forward hook records, during training, the dtype of every Linear
layer's weight and output; OUT/xft_training.json records the precision used.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

from test_train import make_workspace
from xft.training.trainer import precision_used

# Runs `xft train` in a fresh process (accelerate's state is per process) with a hook on every Linear.
TRAIN = r"""
import json, sys
import torch
from xft.cli import main

seen = {"weight": set(), "output": set()}

def hook(module, args, output):
    if isinstance(module, torch.nn.Linear) and module.training and torch.is_tensor(output):
        seen["weight"].add(str(module.weight.dtype))
        seen["output"].add(str(output.dtype))

torch.nn.modules.module.register_module_forward_hook(hook)
code = main(sys.argv[1:])
print("SEEN " + json.dumps({k: sorted(v) for k, v in seen.items()}))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("ws"))
    from xft.cli import main as cli

    assert cli(["upcycle", str(ws / "llama"), "--out", str(ws / "moe"), "--num-experts", "4", "--top-k", "2"]) == 0
    return ws


# precision -> (Linear weights while training, Linear outputs, saved weights)
EXPECTED = {"fp32": ("torch.float32", "torch.float32", torch.float32),
            "bf16": ("torch.float32", "torch.bfloat16", torch.float32),
            "bf16-pure": ("torch.bfloat16", "torch.bfloat16", torch.bfloat16)}


@pytest.mark.slow  # ~7-22 s each on 2 shared cores
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-pure", "auto"])
def test_precision_trains_on_cpu_and_is_recorded(moe, tmp_path, precision):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", TRAIN, "train", str(moe / "moe"), "--data", str(moe / "data.jsonl"),
                          "--out", str(out), "--precision", precision, "--max-steps", "4", "--batch-size", "8",
                          "--micro-batch-size", "8", "--warmup-steps", "0", "--lr", "1e-2", "--logging-steps", "1",
                          "--no-progress"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    used = precision_used(precision)
    record = json.loads((out / "xft_training.json").read_text())
    assert record["precision"] == used and record["config"]["precision"] == precision
    losses = [h["loss"] for h in record["log_history"] if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]

    weight, output, saved = EXPECTED[used]
    seen = json.loads(next(l for l in run.stdout.splitlines() if l.startswith("SEEN "))[5:])
    assert seen == {"weight": [weight], "output": [output]}  # bf16: fp32 master weights, bf16 autocast
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {saved}


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 mixed precision runs on CUDA")
def test_fp16_on_cpu_is_refused_with_one_line(moe, tmp_path, capsys):
    from xft.cli import main as cli

    code = cli(["train", str(moe / "moe"), "--data", str(moe / "data.jsonl"), "--out", str(tmp_path / "out"),
                "--precision", "fp16", "--max-steps", "1", "--batch-size", "8", "--warmup-steps", "0", "--no-progress"])
    assert code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
