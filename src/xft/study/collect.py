"""What a finished study records (`study.json`): protocol, tuning, per-seed results, diagnostics, provenance.

Everything a reader needs to recompute the study's tables is in the file:
per (method, seed) the pass@1, the per-task verdicts (a string of 0/1 in
task order) and the command that re-runs it; per training run the
diagnostics that explain seed-to-seed differences (final training loss,
gradient-norm peaks, router entropy, expert-load imbalance).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import time

from xft.artifacts import read_json
from xft.pipeline.methods import METHODS
from xft.pipeline.report import eval_results, read_routing_log
from xft.pipeline.scheduler import cpu_capability, machine

SCHEMA = 1
GAP_DIR = "merge_gap"  # in the study's directory: per seed, each merge's gap diagnostics measured on validation
GAP_EXAMPLES = 128  # validation problems (with their reference answers) the merge gap is measured on


def commit() -> str | None:
    """The git commit of the xft checkout that ran the study (+ "-dirty" with uncommitted changes), if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def diagnostics(model_dir: str) -> dict:
    """Training diagnostics of one training run (its xft_training.json and routing.jsonl); {} if absent.

    final_loss: mean of the last three logged training losses; loss_curve:
    (step, loss) as logged; grad_norm_max / grad_norm_final; for an MoE, the
    balance loss and the largest expert load as logged (last value, and their
    curves), and the worst layer's load imbalance over training (max / mean
    expert share, routing.jsonl).
    """
    record = read_json(os.path.join(model_dir, "xft_training.json")) or {}
    history = [h for h in record.get("log_history", []) if "loss" in h]
    if not history:
        return {}
    losses = [h["loss"] for h in history]
    norms = [h["grad_norm"] for h in history if "grad_norm" in h]
    out = {"final_loss": sum(losses[-3:]) / len(losses[-3:]),
           "loss_curve": [[h.get("step"), round(h["loss"], 5)] for h in history]}
    if norms:
        out.update(grad_norm_max=max(norms), grad_norm_final=norms[-1])
    for key in ("balance_loss", "max_expert_load"):  # logged by xft.training's trainer for an MoE
        values = [h[key] for h in history if key in h]
        if values:
            out[key] = values[-1]
            out[f"{key}_curve"] = [round(v, 5) for v in values]
    worst = []  # per logging step, the largest max/mean expert-load ratio over the layers
    for record in read_routing_log(model_dir):
        shares = [v["load_share"] for v in (record.get("layers") or {}).values() if v.get("load_share")]
        if shares:
            worst.append(max(max(v) * len(v) / sum(v) for v in shares))
    if worst:
        out["max_layer_load_ratio"] = max(worst)
    return out


def router_entropy(model_dir: str, texts: list[str]) -> list[float]:
    """Per MoE layer, the mean over tokens of the entropy (nats) of the router's softmax over the routed experts.

    Measured on `texts` with the trained model in eval mode (no router noise);
    log(R) is uniform routing, 0 a router that always picks one expert.
    """
    import torch
    from transformers import AutoTokenizer

    import xft
    from xft.upcycle import moe_blocks

    model = xft.load(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(texts, return_tensors="pt", padding=True)
    keep = batch["attention_mask"].flatten().bool()  # [T]
    blocks = moe_blocks(model)
    found: dict[int, float] = {}

    def hook(i):
        def record(module, args, output):
            clean = output[0].float()[keep]  # [T', R] router logits of the real tokens
            p = clean.softmax(-1)
            found[i] = float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
        return record

    handles = [b.gate.register_forward_hook(hook(i)) for i, b in blocks.items()]
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return [found[i] for i in sorted(found)]


def _verdicts(run_dir: str, method: str, benchmark: str) -> str | None:
    """The per-task verdicts of one evaluation as a 0/1 string in task-id order."""
    res = eval_results(run_dir, method, benchmark) or {}
    tasks = res.get("tasks")
    if not isinstance(tasks, dict):
        return None
    order = sorted(tasks, key=lambda t: (len(t), t))  # MiniCode/2 before MiniCode/10
    return "".join("1" if tasks[t].get("passed") else "0" for t in order)


def _result(run_dir: str, method: str, benchmark: str) -> dict | None:
    res = eval_results(run_dir, method, benchmark)
    if not res:
        return None
    out = {"pass@1": res["pass@1"], "n_tasks": res.get("n_tasks"), "verdicts": _verdicts(run_dir, method, benchmark)}
    timings = read_json(os.path.join(run_dir, "timings.json")) or {}
    if method in timings:
        out["train_seconds"] = timings[method]
    if METHODS[method].kind == "sft":
        out["diagnostics"] = diagnostics(os.path.join(run_dir, method))
        if METHODS[method].is_moe and os.path.isfile(os.path.join(run_dir, method, "config.json")):
            layers = router_entropy(os.path.join(run_dir, method), _probe_texts())
            out["diagnostics"].update(router_entropy=sum(layers) / len(layers), router_entropy_layers=layers)
    return out


def _probe_texts(n: int = 64) -> list[str]:
    """The texts router entropy is measured on: MiniCode validation problems with their answers."""
    from xft.minicode.benchmark import load_tasks

    return [t["prompt"] + "\n" + t["response"] for t in load_tasks("valid")[:n]]


def _gap_batches(moe_dir: str, recipe) -> list:
    """Collator batches of the first GAP_EXAMPLES validation problems with their reference answers, as
    instruction data in the recipe's format, tokenized by the MoE's tokenizer."""
    import tempfile

    from transformers import AutoTokenizer

    from xft.config import DataConfig
    from xft.data import Collator, load_dataset, pad_token_id
    from xft.merge_diagnostics import collate
    from xft.minicode.benchmark import load_tasks

    train = recipe.train
    tok = AutoTokenizer.from_pretrained(moe_dir)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "valid.jsonl")
        with open(path, "w") as f:
            for t in load_tasks("valid")[:GAP_EXAMPLES]:
                f.write(json.dumps({"instruction": t["prompt"], "response": t["response"]}) + "\n")
        kwargs = {k: train[k] for k in ("max_length", "template") if k in train}
        ds, _ = load_dataset(DataConfig(path=path, **kwargs), tok)
    return collate(ds, Collator(pad_token_id(tok)), 16)


def merge_gaps(study, run_dir: str, seed: int, methods: list[str]) -> dict[str, dict]:
    """Per merge method of `methods` in run `run_dir`: its merge-gap diagnostics (xft.merge_diagnostics) on
    validation data — the MoE's expert drift, routing spread and held-out loss, the merged model's held-out loss.

    Measured once and kept in the study's GAP_DIR/seed-N/<method>.json (the runs themselves are not touched;
    delete that directory to measure again); the MoE's part once per MoE.
    """
    import copy

    from transformers import AutoModelForCausalLM

    import xft
    from xft.artifacts import atomic_write_json
    from xft.merge_diagnostics import before_merge, held_out_loss

    out, moes = {}, {}
    for method in methods:
        m = METHODS[method]
        if m.kind != "merge" or not os.path.isfile(os.path.join(run_dir, method, "config.json")):
            continue
        path = os.path.join(study.out, GAP_DIR, f"seed-{seed}", f"{method}.json")
        saved = read_json(path)
        if saved is None:
            if m.merge_of not in moes:
                moe_dir = os.path.join(run_dir, m.merge_of)
                batches = _gap_batches(moe_dir, study.recipe)
                moes[m.merge_of] = (batches, before_merge(xft.load(moe_dir), batches))
            batches, gap = moes[m.merge_of]
            gap = copy.copy(gap)
            gap.merged_loss = held_out_loss(AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, method)),
                                            batches)
            saved = gap.to_dict()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_json(path, saved)
        out[method] = saved
    return out


def _compute(run_dir: str, methods: list[str], benchmark: str) -> dict:
    """Per method: parameters, active parameters, training tokens and ≈6·N·D FLOPs (xft.pipeline.report.collect)."""
    from xft.pipeline.report import collect

    return {r.method: {"params": r.params, "active_params": r.active_params, "tokens": r.tokens, "flops": r.flops}
            for r in collect([run_dir], benchmark, methods)}


def collect_study(study, tune: dict, merge_runs: dict, chosen: dict, seeds: list, *, wall_seconds: float,
                  command: str | None, jobs: int) -> dict:
    """The contents of study.json for a finished study (`xft.study.run_study`)."""
    import torch
    import transformers

    from xft.pipeline.recipe import to_dict

    r = study.recipe
    bench = r.eval.benchmarks[0]
    sel = r.study.select

    def tuning_entry(method: str, runs: dict) -> dict:
        scores = {}  # the tuned setting's value -> validation pass@1 (and final training loss)
        for lr, run in runs.items():
            res = _result(run.out, method, sel) or {}
            scores[f"{lr:g}"] = {"valid_pass@1": res.get("pass@1"),
                                 "final_loss": (res.get("diagnostics") or {}).get("final_loss")}
        return {"setting": f"{METHODS[method].section}.{METHODS[method].tune}", "grid": scores,
                "chosen": chosen[method]}

    tuning = {m: tuning_entry(m, runs) for m, runs in {**tune, **merge_runs}.items()}
    per_seed = []
    for i, run in enumerate(seeds):
        methods = [m for m in r.methods if (i == 0 or m != "base")]
        results = {m: res for m in methods if (res := _result(run.out, m, bench))}
        for m, gap in merge_gaps(study, run.out, i, list(results)).items():
            results[m]["merge_gap"] = gap
        per_seed.append({
            "seed": i, "run": os.path.relpath(run.out, study.out),
            "command": shlex.join(run.command(study.recipe_name, study.user)), "results": results,
        })
    return {
        "schema": SCHEMA,
        "what": "xft seed-paired study (xft demo --study)",
        "benchmark": bench,
        "recipe": study.recipe_name,
        "overrides": study.user,
        "protocol": {**to_dict(r)["study"], "budget": r.train, "merge": r.merge,
                     "selection": f"greedy pass@1 on {sel}; ties: the lower learning rate"},
        "methods": {m: {"label": METHODS[m].label, "section": METHODS[m].section,
                        "compute_chain": list(METHODS[m].compute_chain), "merge_of": METHODS[m].merge_of
                        if METHODS[m].kind == "merge" else None} for m in r.methods},
        "tuning": tuning,
        "seeds": per_seed,
        "compute": _compute(seeds[0].out, r.methods, bench),
        "provenance": {"commit": commit(), "command": command, "machine": machine(),
                       "cpu_capability": cpu_capability(), "jobs": jobs,
                       "threads_per_run": 1, "wall_seconds": round(wall_seconds, 1),
                       "python": platform.python_version(), "torch": torch.__version__,
                       "transformers": transformers.__version__,
                       "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
