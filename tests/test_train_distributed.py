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
from xft.configs import accelerate_config
from test_train import make_workspace

pytestmark = pytest.mark.slow  # ~80 s on 2 shared cores

ARGS = ["--max-steps", "6", "--batch-size", "8", "--micro-batch-size", "2", "--warmup-steps", "0", "--lr", "1e-2",
        "--logging-steps", "1", "--no-progress"]


def curve(run):
    """(number of training processes, logged losses) of a finished run."""
    with open(run / "xft_training.json") as f:
        record = json.load(f)
    return record["processes"], [h["loss"] for h in record["log_history"] if "loss" in h]


def idle_expert_moe(ws):
    """`ws/moe`: a 4-expert top-2 MoE of `ws/llama` whose routers are zero, so in the first steps every token
    goes to routed expert 1 and experts 2 and 3 receive none."""
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
    return ws / "moe"


def launch(args: list[str], processes: int = 2, config: str | None = None, **popen) -> subprocess.Popen:
    """`accelerate launch` of `python -m xft.cli ARGS` in `processes` CPU processes, started, output piped.

    config None: plain DDP (`--multi_gpu`, see the module docstring); else a shipped accelerate config
    (`python -m xft.configs CONFIG`), as the docs tell users to launch.
    """
    how = ["--multi_gpu"] if config is None else ["--config_file", accelerate_config(config)]
    return subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes",
                             str(processes), "--num_cpu_threads_per_process", "1", "-m", "xft.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def max_difference(a, b) -> float:
    """Largest absolute difference between the weights of two saved models (same tensor names)."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def test_two_processes_match_one_process_with_idle_experts(tmp_path):
    ws = make_workspace(tmp_path)
    moe = idle_expert_moe(ws)

    train = ["train", str(moe), "--data", str(ws / "data.jsonl"), *ARGS]
    two = launch([*train, "--out", str(tmp_path / "two")])
    one = subprocess.run([sys.executable, "-m", "xft.cli", *train, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=400)
    assert one.returncode == 0, one.stderr[-2000:]
    out, _ = two.communicate(timeout=400)  # a hang would time out here
    assert two.returncode == 0, out[-3000:]

    for run in ("one", "two"):
        first = json.loads((tmp_path / run / "routing.jsonl").read_text().splitlines()[0])
        assert first["layers"]["0"]["load_share"][1:] == [0.0, 0.0]  # experts 2 and 3 got no token

    (n1, c1), (n2, c2) = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert (n1, n2) == (1, 2)  # really two processes in one process group
    assert json.loads((tmp_path / "two" / "xft_training.json").read_text())["distributed"] == "MULTI_CPU"
    assert len(c1) == len(c2) == 6 and c1[-1] < c1[0]
    assert c2 == pytest.approx(c1, rel=1e-3), (c1, c2)
    assert max_difference(tmp_path / "one", tmp_path / "two") < 1e-4
