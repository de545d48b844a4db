"""Training-step cost of the XFT MoE vs the dense model it came from, against the FLOP ratio.

One interleaved run on the same tiny-but-not-trivial Llama (d=512, I=1376,
4 layers, 8 heads, vocab 4096; batch 4 x 128 tokens): a full training step
(forward + backward + Adafactor step, as `xft train` runs it) of

* the dense model,
* its upcycled MoE (N=8 experts, top-6 counting the shared one, MLP router, noisy gating),
* the learnable merge model (only the mixing logits train),

timed alternately and summarised by medians; reported as ratios to the dense
step, beside the FLOP ratios

    per layer:   (attention + K·FFN + router) / (attention + FFN)
    whole model: the same plus embeddings/LM head on both sides.

Step times are split into forward+backward (compared with the FLOP ratio)
and the Adafactor step (memory-bound; it scales with the parameter count,
N x the FFN parameters for the MoE). Attention FLOPs count the q/k/v/o projections and the T x T score and
value products (eager attention computes the full square). Backward ≈ 2 x
forward on both sides, so the training-step FLOP ratio equals the forward one.

    python benchmarks/bench_train.py                 # ~1-2 min on 2 idle CPU cores
    python benchmarks/bench_train.py --device cuda --repeats 30
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.optimization import Adafactor

import xft


def build(args):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=args.seq,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    dense = LlamaForCausalLM(cfg)
    moe = xft.upcycle(copy.deepcopy(dense), xft.UpcycleConfig(num_experts=args.experts, top_k=args.top_k))
    with torch.no_grad():  # distinct experts and routers, as after some training
        for p in moe.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    merge = xft.build_merge_model(copy.deepcopy(moe))
    return {"dense": dense, "moe": moe, "merge": merge}


def flops_per_token(args) -> dict[str, float]:
    """Forward FLOPs per token: attention, one FFN, the router, the LM head (per model, not per layer)."""
    d, i, t, r = args.d, args.ffn, args.seq, args.experts - 1
    attention = 2 * 4 * d * d + 2 * 2 * t * d  # projections + QK^T and AV over the full T x T square
    ffn = 2 * 3 * d * i  # gate, up, down
    router = 2 * (d * r + r * r) + 2 * d * r  # MLP router + noise projection
    return {"attention": attention, "ffn": ffn, "router": router, "head": 2 * d * args.vocab}


def flop_ratios(args) -> dict[str, float]:
    f, L, k = flops_per_token(args), args.layers, args.top_k
    layer_dense = f["attention"] + f["ffn"]
    layer_moe = f["attention"] + k * f["ffn"] + f["router"]
    return {"per_layer": layer_moe / layer_dense,
            "whole_model": (L * layer_moe + f["head"]) / (L * layer_dense + f["head"])}


def make_step(model, batch, device):
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = Adafactor(params, lr=1e-5, scale_parameter=False, relative_step=False)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> tuple[float, float]:
        """One training step; returns (forward+backward seconds, optimizer seconds)."""
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return t1 - t0, time.perf_counter() - t1
    return step


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=512, help="hidden size")
    p.add_argument("--ffn", type=int, default=1376, help="FFN intermediate size")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--experts", type=int, default=8, help="experts per layer N")
    p.add_argument("--top-k", type=int, default=6, help="active experts per token K (shared one included)")
    p.add_argument("--repeats", type=int, default=6, help="timed rounds (each times every variant once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    steps = {name: make_step(m, batch, device) for name, m in build(args).items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for round_ in range(args.warmup + args.repeats):
        for name, step in steps.items():  # interleaved: machine noise hits every variant alike
            t = step()
            if round_ >= args.warmup:
                times[name].append(t)

    med = {name: statistics.median(a + b for a, b in ts) for name, ts in times.items()}
    compute = {name: statistics.median(a for a, _ in ts) for name, ts in times.items()}
    tokens = args.batch * args.seq
    result = {
        "setup": {k: v for k, v in vars(args).items() if k != "json"} | {"threads": torch.get_num_threads()},
        "median_step_s": {k: round(v, 4) for k, v in med.items()},
        "tokens_per_s": {k: round(tokens / v) for k, v in med.items()},
        "measured_ratio_vs_dense": {k: round(v / med["dense"], 3) for k, v in med.items()},
        "fwd_bwd_ratio_vs_dense": {k: round(v / compute["dense"], 3) for k, v in compute.items()},
        "flop_ratio_moe_vs_dense": {k: round(v, 3) for k, v in flop_ratios(args).items()},
    }
    if args.json:
        print(json.dumps(result))
        return result
    f = flop_ratios(args)
    print(f"training step, {tokens} tokens ({args.batch} x {args.seq}), d={args.d} I={args.ffn} "
          f"L={args.layers} V={args.vocab}, N={args.experts} top-{args.top_k}, {device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds")
    print(f"  {'':<6} {'step':>9}  {'tok/s':>9}  {'step/dense':>10}  {'fwd+bwd/dense':>13}")
    for name in steps:
        print(f"  {name:<6} {med[name] * 1e3:7.0f}ms  {tokens / med[name]:9,.0f}  {med[name] / med['dense']:10.2f}  "
              f"{compute[name] / compute['dense']:13.2f}")
    print(f"  FLOP ratio MoE/dense: per layer (attention + {args.top_k}·FFN + router)/(attention + FFN) = "
          f"{f['per_layer']:.2f}; whole model incl. LM head = {f['whole_model']:.2f}")
    print(f"  MoE fwd+bwd time ratio / FLOP ratio (whole model): "
          f"{compute['moe'] / compute['dense'] / f['whole_model']:.2f} (1.00 = the MoE costs exactly its extra "
          "FLOPs; the optimizer step, memory-bound, scales with the parameter count instead)")
    return result


if __name__ == "__main__":
    main()
