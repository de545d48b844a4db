"""Core-library performance, as ratios against baselines measured in the same run.

(a) MoE block forward+backward vs the ideal — a dense FFN's forward+backward on
    the same T tokens × 6 (active experts per token, equal FLOPs) — for the
    paper's N=8, top-6 with a shared expert, Llama FFN d=512, I=1376; beside it
    a per-expert loop in the style of transformers' "eager" experts
    (`W[e]` indexing of a stacked parameter + `torch.where` masks).
(b) a learnable-merge step (FFN weights recomputed from 8 stacks, gradient to
    the mixing logits and the input) vs a dense step with frozen weights
    (gradient to the input only) and vs a dense step with trainable weights,
    T=2048: for one FFN block, and for a whole 4-layer model (attention included).
    The block-level ratio vs frozen cannot go below ~1.5: dL/dc needs dL/dW, one
    extra matmul of the forward's size beside the two of a frozen step.
(c) peak memory (RSS) of building a dense model and upcycling it vs the size
    of the resulting MoE checkpoint (in a fresh subprocess).

Timings interleave the variants and report medians; the machine is noisy, so
only the ratios mean anything. On CUDA every timed step is bracketed by
`torch.cuda.synchronize()`, T goes up to 131072, and (c) (CPU RSS) is skipped.

    python benchmarks/bench_moe.py            # everything (~3-5 min on 2 cores)
    python benchmarks/bench_moe.py --quick    # fewer repeats, T up to 2048
    python benchmarks/bench_moe.py --device cuda --dtype bf16   # GPU; --dtype fp32 is the default
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

import xft
from xft.merge import LearnableMerge
from xft.moe import MoEBlock

D, I, N, K = 512, 1376, 8, 6
DEVICE, DTYPE = torch.device("cpu"), torch.float32  # set by --device / --dtype
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _mlp(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=D, intermediate_size=I, hidden_act="silu")
    return LlamaMLP(cfg).to(DEVICE, DTYPE)


def _moe_block():
    block = MoEBlock(_mlp(), D, xft.UpcycleConfig(num_experts=N, top_k=K, noisy_gating=True)).train()
    with torch.no_grad():  # distinct experts and a router that spreads tokens, as after some training
        for p in block.experts.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return block


class EagerExperts(torch.nn.Module):
    """Per-expert loop as transformers' eager MoE experts: W[e] of stacked params, torch.where masks."""

    def __init__(self, block: MoEBlock):
        super().__init__()
        self.block = block

    def forward(self, x):
        b = self.block
        _, logits, _ = b.gate(x)
        weights, top_i = b.routing.combine(logits.float(), b.k)
        weights = weights.to(x.dtype)
        gate_w, up_w, down_w = b.experts.gate_proj.weight, b.experts.up_proj.weight, b.experts.down_proj.weight
        out = torch.zeros_like(x)
        selected = torch.cat([torch.zeros_like(top_i[:, :1]), top_i + 1], 1)  # shared expert 0 + routed
        for e in range(N):
            tok = torch.where((selected == e).any(-1))[0]
            if tok.numel() == 0:
                continue
            h = x[tok]
            y = F.linear(F.silu(F.linear(h, gate_w[e])) * F.linear(h, up_w[e]), down_w[e])
            out.index_add_(0, tok, y * weights[tok, e, None])
        return out


def _time_fwd_bwd(fn, x, grad):
    _sync()
    t = time.perf_counter()
    y = fn(x)
    y.backward(grad)
    _sync()
    return time.perf_counter() - t


def _interleaved(variants: dict, x_shape, repeats: int) -> dict[str, float]:
    """Median seconds per forward+backward of each variant, run round-robin."""
    times = {k: [] for k in variants}
    x = torch.randn(*x_shape, device=DEVICE, dtype=DTYPE)
    grad = torch.randn(*x_shape, device=DEVICE, dtype=DTYPE)
    for r in range(repeats + 1):
        for name, fn in variants.items():
            xi = x.clone().requires_grad_(True)
            dt = _time_fwd_bwd(fn, xi, grad)
            if r:  # first round is warm-up
                times[name].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_moe_block(tokens: list[int], repeats: int) -> list[dict]:
    block = _moe_block()
    grouped = copy.deepcopy(block)
    grouped.expert_impl = "grouped_mm"  # same weights, torch._grouped_mm kernel
    variants = {"dense": _mlp(), "xft": block, "grouped_mm": grouped, "eager": EagerExperts(block)}
    rows = []
    for t in tokens:
        reps = max(3, repeats * 2048 // max(t, 512))
        m = _interleaved(variants, (t, D), reps)
        ideal = m["dense"] * K
        rows.append({"T": t, "dense_ms": m["dense"] * 1e3,
                     **{f"{k}_vs_ideal": v / ideal for k, v in m.items() if k != "dense"}})
        print(f"  T={t:5d}  xft MoE block (fast loop) {rows[-1]['xft_vs_ideal']:.2f}x ideal   "
              f"grouped_mm {rows[-1]['grouped_mm_vs_ideal']:.2f}x   "
              f"eager-style loop {rows[-1]['eager_vs_ideal']:.2f}x   "
              f"(dense FFN fwd+bwd {m['dense'] * 1e3:.1f} ms, "
              f"{18 * t * D * I / m['dense'] / 1e12:.1f} TFLOP/s)", flush=True)
    return rows


def bench_merge_step(t: int, repeats: int) -> dict:
    block = _moe_block().eval()
    merge = LearnableMerge(block, 0.75, learn_shared_weight=False)
    frozen = _mlp().requires_grad_(False)
    trainable = _mlp()
    m = _interleaved({"frozen": frozen, "trainable": trainable, "merge": merge}, (t, D), repeats)
    row = {"T": t, "merge_vs_frozen_dense": m["merge"] / m["frozen"],
           "merge_vs_trainable_dense": m["merge"] / m["trainable"]}
    print(f"  T={t}  learnable-merge step {row['merge_vs_frozen_dense']:.2f}x a frozen dense step, "
          f"{row['merge_vs_trainable_dense']:.2f}x a trainable dense step", flush=True)
    return row


def bench_merge_model_step(t: int, repeats: int) -> dict:
    """Whole-model step: Llama d=512, I=1376, 4 layers; merge model vs the dense model, T tokens."""
    cfg = LlamaConfig(hidden_size=D, intermediate_size=I, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=4096, max_position_embeddings=t)
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(cfg).to(DEVICE, DTYPE)
    merge_model = xft.build_merge_model(xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig()))
    frozen = copy.deepcopy(dense).requires_grad_(False)
    ids = torch.randint(0, cfg.vocab_size, (1, t), device=DEVICE)

    def frozen_step():  # gradients flow to the input embeddings only: backward through every layer
        emb = frozen.get_input_embeddings()(ids).detach().requires_grad_(True)
        frozen(inputs_embeds=emb, labels=ids).loss.backward()

    steps = {"frozen": frozen_step,
             "trainable": lambda: dense(ids, labels=ids).loss.backward(),
             "merge": lambda: merge_model(ids, labels=ids).loss.backward()}
    times = {k: [] for k in steps}
    for r in range(repeats + 1):
        for name, step in steps.items():
            _sync()
            start = time.perf_counter()
            step()
            _sync()
            if r:
                times[name].append(time.perf_counter() - start)
    m = {k: statistics.median(v) for k, v in times.items()}
    row = {"T": t, "model_merge_vs_frozen_dense": m["merge"] / m["frozen"],
           "model_merge_vs_trainable_dense": m["merge"] / m["trainable"]}
    print(f"  whole model (4 layers), T={t}: learnable-merge step {row['model_merge_vs_frozen_dense']:.2f}x a "
          f"frozen dense step, {row['model_merge_vs_trainable_dense']:.2f}x a trainable dense step", flush=True)
    return row


_MEMORY_CHILD = r"""
import json, os, sys, torch, xft
from transformers import AutoModelForCausalLM, LlamaConfig
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=8192)
base = rss("VmRSS:")
model = AutoModelForCausalLM.from_config(cfg)
dense_rss = rss("VmRSS:") - base
xft.upcycle(model, xft.UpcycleConfig())
peak = rss("VmHWM:") - base
model.save_pretrained(sys.argv[1])
size = sum(os.path.getsize(os.path.join(sys.argv[1], f)) for f in os.listdir(sys.argv[1]) if f.endswith(".safetensors"))
print(json.dumps({"peak_bytes": peak, "checkpoint_bytes": size, "dense_bytes": dense_rss}))
"""


def bench_upcycle_memory() -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, d], capture_output=True, text=True,
                             check=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["peak_vs_checkpoint"] = r["peak_bytes"] / r["checkpoint_bytes"]
    print(f"  upcycle peak memory {r['peak_bytes'] / 2**20:.0f} MiB vs MoE checkpoint "
          f"{r['checkpoint_bytes'] / 2**20:.0f} MiB: {r['peak_vs_checkpoint']:.2f}x", flush=True)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, T up to 2048")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameter and activation dtype")
    args = ap.parse_args()
    global DEVICE, DTYPE
    DEVICE, DTYPE = torch.device(args.device), DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    cuda = DEVICE.type == "cuda"
    if cuda:
        tokens = [512, 2048, 8192] if args.quick else [512, 2048, 8192, 32768, 131072]
        repeats = 5 if args.quick else 20
        where = f"{torch.cuda.get_device_name(DEVICE)}, torch {torch.__version__}"
    else:
        tokens = [64, 512, 2048] if args.quick else [64, 512, 2048, 8192]
        repeats = 3 if args.quick else 7
        where = f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"device: {where}; dtype {args.dtype}")
    print(f"(a) MoE block fwd+bwd vs ideal (6 x dense FFN), d={D} I={I} N={N} top-{K}")
    a = bench_moe_block(tokens, repeats)
    print("(b) learnable-merge step, T=2048")
    b = {**bench_merge_step(2048, repeats), **bench_merge_model_step(2048, max(3, repeats // 2))}
    if cuda:
        print("(c) upcycling memory: skipped on CUDA (it measures CPU RSS)")
        c = None
    else:
        print("(c) upcycling memory")
        c = bench_upcycle_memory()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "dtype": args.dtype, "moe_block": a, "merge_step": b,
                       "upcycle_memory": c}, f, indent=1)


if __name__ == "__main__":
    main()
