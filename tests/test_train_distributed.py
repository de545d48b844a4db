"""Two CPU processes (accelerate launch, gloo DDP) train an MoE like one process with the same global batch.

`accelerate launch --cpu --num_processes 2` starts a single process unless MPI is set up
(accelerate 1.x runs multi-CPU jobs through mpirun), so the two processes are started with
`accelerate launch --multi_gpu --num_processes 2` (torch's elastic launcher); on a machine
without CUDA, xft makes them join a gloo process group.

The MoE starts with an all-zero router and no noise, so in the first steps
every token goes to routed expert 1 and the other routed experts receive no
tokens at all: DDP must neither fail nor hang on their missing gradients.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import xft
from test_train import make_workspace

pytestmark = pytest.mark.slow  # ~80 s on 2 shared cores

ARGS = ["--max-steps", "6", "--batch-size", "8", "--micro-batch-size", "2", "--warmup-steps", "0", "--lr", "1e-2",
        "--logging-steps", "1", "--no-progress"]


def curve(run):
    """(number of training processes, logged losses) of a finished run."""
    with open(run / "xft_training.json") as f:
        record = json.load(f)
    return record["processes"], [h["loss"] for h in record["log_history"] if "loss" in h]


def test_two_processes_match_one_process_with_idle_experts(tmp_path):
    ws = make_workspace(tmp_path)
    from xft.cli import main as cli

    assert cli(["upcycle", str(ws / "llama"), "--out", str(ws / "moe0"), "--num-experts", "4", "--top-k", "2",
                "--router", "linear", "--no-noise"]) == 0
    moe = xft.load(str(ws / "moe0"))
    with torch.no_grad():
        for block in xft.moe_blocks(moe).values():
            for p in block.gate.parameters():
                p.zero_()  # equal logits: top-1 ties all go to the first routed expert
    moe.save_pretrained(ws / "moe")
    AutoTokenizer.from_pretrained(ws / "moe0").save_pretrained(ws / "moe")
    shutil.rmtree(ws / "moe0")

    train = ["xft.cli", "train", str(ws / "moe"), "--data", str(ws / "data.jsonl"), *ARGS]
    two = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                            "--num_cpu_threads_per_process", "1", "-m", *train, "--out", str(tmp_path / "two")],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    one = subprocess.run([sys.executable, "-m", *train, "--out", str(tmp_path / "one")], capture_output=True,
                         text=True, timeout=400)
    assert one.returncode == 0, one.stderr[-2000:]
    out, _ = two.communicate(timeout=400)  # a hang would time out here
    assert two.returncode == 0, out[-3000:]

    for run in ("one", "two"):
        first = json.loads((tmp_path / run / "routing.jsonl").read_text().splitlines()[0])
        assert first["layers"]["0"]["load_share"][1:] == [0.0, 0.0]  # experts 2 and 3 got no token

    (n1, c1), (n2, c2) = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert (n1, n2) == (1, 2)  # really two processes in one process group
    assert len(c1) == len(c2) == 6 and c1[-1] < c1[0]
    assert c2 == pytest.approx(c1, rel=1e-3), (c1, c2)
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
