"""Resume: kill -9 an `xft train` after its first checkpoint, re-run the same command, get the same weights
(and a routing log with every step once).

MoE with noisy gating (router noise comes from the global RNG the Trainer
checkpoints), checkpoint in the middle of an epoch, gradient accumulation.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from test_train import make_workspace

STEPS, SAVE = 10, 3  # 8 steps per epoch: the checkpoint at step 3 is mid-epoch


def command(ws, out):
    return [sys.executable, "-m", "xft.cli", "train", str(ws / "moe"), "--data", str(ws / "data.jsonl"),
            "--out", str(out), "--max-steps", str(STEPS), "--save-steps", str(SAVE), "--batch-size", "8",
            "--micro-batch-size", "4", "--warmup-steps", "2", "--lr", "1e-2", "--logging-steps", "1"]


def wait_for_checkpoint(proc, out, timeout=240):
    state = out / f"checkpoint-{SAVE}" / "trainer_state.json"
    t0 = time.time()
    while not state.exists():
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.time() - t0 < timeout, "no checkpoint in time"
        time.sleep(0.02)


def test_kill_9_then_rerun_gives_identical_weights(tmp_path):
    ws = make_workspace(tmp_path)
    from xft.cli import main as cli

    assert cli(["upcycle", str(ws / "llama"), "--out", str(ws / "moe"), "--num-experts", "4", "--top-k", "3"]) == 0

    interrupted = tmp_path / "interrupted"
    # The uninterrupted reference runs alongside (2 cores), to keep the test short.
    reference = subprocess.Popen(command(ws, tmp_path / "reference"), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(command(ws, interrupted), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_checkpoint(proc, interrupted)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (interrupted / "config.json").exists()  # an interrupted run never looks finished

    resumed = subprocess.run(command(ws, interrupted), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(resumed)" in resumed.stdout  # it did resume: the summary says so
    record = json.loads((interrupted / "xft_training.json").read_text())
    assert record["resumed_from"].endswith(f"checkpoint-{SAVE}")
    reference_out, reference_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_err[-2000:]
    # The summary's loss is the whole run's, the steps before the kill included: as the uninterrupted run's.
    loss_row = [[line for line in out.splitlines() if line.startswith("training loss")][0]
                for out in (resumed.stdout, reference_out)]
    assert "(step 1)" in loss_row[0]
    mean = [float(row.rsplit("mean ", 1)[1]) for row in loss_row]
    assert mean[0] == pytest.approx(mean[1], abs=2e-4), loss_row

    # The resumed run replayed the steps after checkpoint-3; the routing log has each step once, in order.
    steps = [json.loads(line)["step"] for line in (interrupted / "routing.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))

    a = load_file(interrupted / "model.safetensors")
    b = load_file(tmp_path / "reference" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-5, worst
    # and training really moved the weights (the comparison is not vacuous)
    start = load_file(ws / "moe" / "model.safetensors")
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3
    assert not torch.equal(a["model.layers.0.mlp.experts.up_proj.weight"][1],
                           a["model.layers.0.mlp.experts.up_proj.weight"][2])

    # --out is the model: the same command again has nothing to do; the MoE loads with the Auto classes
    # (after `import xft`) and merges, through the CLI, into a model plain transformers loads from its --out.
    again = subprocess.run(command(ws, interrupted), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-2000:]
    import xft
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 2]])
    auto = AutoModelForCausalLM.from_pretrained(interrupted).eval()
    assert torch.equal(auto(ids).logits, xft.load(str(interrupted)).eval()(ids).logits)
    assert cli(["merge", str(interrupted), "--out", str(tmp_path / "merged"), "--method", "init",
                "--no-progress"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM" and not xft.is_moe(merged)
