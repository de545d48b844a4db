"""Tables and plots of finished pipeline runs (one run directory per seed).

    report_path, summary = build_report("runs/minicode")   # a run of xft run, or xft demo's folder of seeds
    rows = collect(["runs/seed-0", "runs/seed-1"])    # per method: pass@1 per seed, sizes, compute

`build_report` works on finished and partial runs alike (it reports what was
evaluated) and writes `report.md` and `plots/*.png` into the directory it is
given. The report says what one seed cannot show, defines the names it uses,
captions every plot and takes its wall times from the runs' own records
(`sessions.json`, `timings.json`), so rebuilding it changes none of them.

Compute is counted as training tokens (the Trainer's `num_input_tokens_seen`,
padding included) and approximate training FLOPs `6 · N_active · tokens`,
with `N_active` the parameters a token passes through (an MoE's inactive
experts excluded). A merged model's compute includes the MoE training it came
from; the base model's pretraining is listed on its own row and common to all.
The confidence interval of a mean over seeds is Student's t at 95%.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from dataclasses import dataclass, field

from xft.artifacts import atomic_write_json, atomic_write_text, read_json, read_jsonl
from xft.pipeline.methods import METHODS, check_pairs
from xft.stats import mean_ci, proportion_ci
from xft.training import rundir

REPORT_SETTINGS = "report.json"  # title and preamble of report.md, so that `xft report` rebuilds the same one


@dataclass
class Row:
    """One method across seeds."""

    method: str
    scores: list[float] = field(default_factory=list)  # pass@1 per seed (first benchmark)
    params: int = 0
    active_params: int = 0
    tokens: int = 0  # training tokens of the method's own chain, seed 0
    flops: float = 0.0

    @property
    def mean(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else float("nan")

    @property
    def ci95(self) -> float | None:
        """Half-width of the 95% confidence interval of the mean (None with one seed)."""
        return mean_ci(self.scores).half_width if self.scores else None

    def half_width(self, n_tasks: int | None = None) -> float | None:
        """The 95% interval's half-width: over seeds, or over the `n_tasks` tasks for one seed (None without)."""
        return self.ci95 if self.ci95 is not None else proportion_ci(self.mean, n_tasks) if n_tasks else None

    def score(self, n_tasks: int | None = None) -> str:
        """pass@1 in %: mean ± t interval over seeds, or ± the binomial interval over tasks for one seed."""
        return points(self.mean, self.half_width(n_tasks))


def label(method: str) -> str:
    """A method's name in tables and plots (xft.pipeline.methods); an unknown name as it is."""
    return METHODS[method].label if method in METHODS else method


# ---------------------------------------------------------------- reading run directories

def eval_results(run: str, method: str, benchmark: str) -> dict | None:
    """results.json of `method` on `benchmark` in run directory `run` (None if not evaluated)."""
    return read_json(os.path.join(run, "eval", method, benchmark, "results.json"))


def model_dir(run: str, method: str) -> str | None:
    """Directory of the model a method produced in `run` (the base: as evaluated)."""
    if method == "base":
        evaluated = os.path.join(run, "eval", "base")
        names = sorted(os.listdir(evaluated)) if os.path.isdir(evaluated) else []
        res = next((r for b in names if (r := eval_results(run, "base", b))), None)
        return (res or {}).get("model") or os.path.join(run, "base")
    legacy = os.path.join(run, method, rundir.LEGACY_FINAL)  # a run of xft 0.1
    return legacy if os.path.isfile(os.path.join(legacy, "config.json")) else os.path.join(run, method)


def training_tokens(model_path: str, part: str | None = None) -> int:
    """Tokens the run that produced `model_path` trained on (from its xft_training.json); `part="distillation"`:
    those of the distillation after a merge (0 without one)."""
    record = read_json(os.path.join(model_path, "xft_training.json")) or {}
    if part:
        record = record.get(part) or {}
    seen = [h["num_input_tokens_seen"] for h in record.get("log_history", []) if "num_input_tokens_seen" in h]
    return int(max(seen)) if seen else 0


def parameter_counts(model_path: str) -> tuple[int, int]:
    """(total, active per token) parameters of the model at `model_path`."""
    import xft
    from xft.checkpoint import skeleton

    model = skeleton(model_path)  # shapes only: a 7B MoE costs no memory and no weight reads here
    total = sum(p.numel() for p in model.parameters())
    if not xft.is_moe(model):
        return total, total
    cfg = xft.upcycle_config(model)
    inactive = 0
    for stacks in xft.expert_weights(model).values():
        per_expert = sum(p[0].numel() for p in stacks.values()) * cfg.shards  # granular: G stacked shards each
        inactive += (cfg.num_experts - cfg.top_k) * per_expert
    return total, total - inactive


def collect(runs: list[str], benchmark: str = "minicode", methods: list[str] | None = None) -> list[Row]:
    """One Row per method found in the runs (scores from every run, sizes and compute from the first)."""
    rows = []
    sizes: dict[str, tuple[int, int, int]] = {}  # training stage -> (params, active, tokens)
    for method in methods or list(METHODS):
        scores = [r["pass@1"] for run in runs if (r := eval_results(run, method, benchmark))]
        if not scores:
            continue
        row = Row(method, scores)
        first = next(run for run in runs if eval_results(run, method, benchmark))
        path = model_dir(first, method)
        if os.path.isdir(path):
            row.params, _ = parameter_counts(path)
        chain = METHODS[method].compute_chain
        for stage in chain:
            m = METHODS[stage]
            if stage not in sizes:
                stage_model = path if stage == method else model_dir(first, stage)
                if not os.path.isdir(stage_model):
                    continue
                total, active = parameter_counts(stage_model)
                upcycled = os.path.join(first, m.upcycle_stage) if m.ewa else None
                if upcycled and os.path.isdir(upcycled):
                    active = parameter_counts(upcycled)[1]  # it trained the MoE it averaged at the end
                sizes[stage] = (total, active, training_tokens(stage_model))
            _, active, tokens = sizes[stage]
            if m.kind == "merge":  # a merge step: forward/backward through the dense architecture
                active = row.params
            row.tokens += tokens
            row.flops += 6.0 * active * tokens
            if m.kind == "merge" and stage == method and (distilled := training_tokens(path, "distillation")):
                teacher = sizes.get(m.merge_of, (0, 0, 0))[1]  # the MoE's forward (2·N) beside the student's 6·N
                row.tokens += distilled
                row.flops += (6.0 * row.params + 2.0 * teacher) * distilled
        own = sizes.get(chain[0])
        row.active_params = own[1] if METHODS[method].is_moe and own else row.params
        rows.append(row)
    return rows


# ---------------------------------------------------------------- table

def points(x: float | None, half_width: float | None = None, sign: bool = False) -> str:
    """A share in points (× 100, one decimal), "± half-width" when there is one; "-" for None or nan."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    text = f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}"
    return text if half_width is None else f"{text} ± {100 * half_width:.1f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table of `rows` under `header`."""
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def _si(x: float) -> str:
    if not x:
        return "-"  # not measured (e.g. a Hub base model that is not on disk)
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def table(rows: list[Row], n_tasks: int | None = None) -> str:
    """Markdown table: pass@1 (mean ± 95% CI over seeds, or ± binomial CI for one seed), sizes, compute."""
    seeds = max((len(r.scores) for r in rows), default=1)
    head = f"pass@1 (mean ± 95% CI, {seeds} seeds)" if seeds > 1 else "pass@1 (± 95% CI over tasks)"
    cells = []
    for r in rows:
        note = " (pretraining)" if r.method == "base" else ""
        cells.append([label(r.method), r.score(n_tasks), _si(r.params), _si(r.active_params),
                      f"{_si(r.tokens)}{note}", f"{_si(r.flops)}{note}"])
    return markdown_table(["model", head, "params", "active params", "training tokens",
                           "training FLOPs (≈6·N·D)"], cells)


# The paper's claims as paired comparisons (first minus second), in the order the paper states them.
CLAIMS: tuple[tuple[str, str, str], ...] = check_pairs((
    ("xft", "moe", "XFT ≥ MoE (merging keeps the MoE's gains)"),
    ("moe", "sft", "MoE > dense SFT"),
    ("xft", "sft", "XFT > dense SFT"),
    ("xft", "xft_init", "learned merge ≥ init merge"),
    ("xft", "ewa", "XFT ≥ EWA"),
    ("xft_init", "xft_uniform", "init merge (λ on the shared expert) > uniform average"),
    ("moe", "sparse", "shared expert + normalization > sparse upcycling"),
    ("moe", "unnormalized", "normalized > unnormalized routing"),
), "report.CLAIMS")

# Beyond the paper (docs/method.md): each variant against the paper's method it replaces, paired by seed.
COMPARISONS: tuple[tuple[str, str, str], ...] = check_pairs(tuple(
    (m.name, "moe" if m.kind == "sft" else "xft", f"{m.label} − {METHODS['moe' if m.kind == 'sft' else 'xft'].label}")
    for m in METHODS.values() if m.name.startswith(("moe_", "xft_")) and m.name not in ("xft_init", "xft_uniform")
) + (("xft_distill", "moe", "XFT + distillation − MoE"),), "report.COMPARISONS")


def paired_differences(runs: list[str], benchmark: str = "minicode") -> list[tuple[str, list[float]]]:
    """Per claim whose two methods were evaluated in the same runs: pass@1 differences, one per run (seed).

    Pairing by seed removes what two methods share within a seed (data order,
    router initialisation), so the interval of the mean difference is the
    right one for "is A better than B", narrower than comparing two intervals.
    """
    out = []
    for a, b, claim in CLAIMS:
        diffs = [ra["pass@1"] - rb["pass@1"] for run in runs
                 if (ra := eval_results(run, a, benchmark)) and (rb := eval_results(run, b, benchmark))]
        if diffs:
            out.append((claim, diffs))
    return out


def claims_table(diffs: list[tuple[str, list[float]]]) -> str:
    """Markdown table of paired differences: mean ± 95% CI (Student's t) over seeds, per seed, and a verdict."""
    if not diffs:
        return ""
    cells = []
    for claim, d in diffs:
        row = Row("diff", d)
        if row.ci95 is None:
            reading = "one seed: no interval"
        else:
            lo, hi = row.mean - row.ci95, row.mean + row.ci95
            reading = "holds" if lo > 0 else "reversed" if hi < 0 else "not resolved (interval spans 0)"
        cells.append([claim, points(row.mean, row.ci95, sign=True), ", ".join(points(x, sign=True) for x in d),
                      reading])
    return markdown_table(["paper's claim", "difference in pass@1 (points)", "per seed", "reading"], cells)


# ---------------------------------------------------------------- plots

def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 110, **layout) -> str:
    """Lay `fig` out, write it to `path` and close it; returns `path`."""
    fig.tight_layout(**layout)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_pass_at_1(rows: list[Row], path: str, n_tasks: int | None = None, benchmark: str = "MiniCode") -> str:
    """Bar chart of pass@1 per model with 95% error bars."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = ["\n".join(textwrap.wrap(label(r.method), 16)) for r in rows]
    means = [100 * r.mean for r in rows]
    errs = [100 * (r.half_width(n_tasks) or 0) for r in rows]
    colors = ["#999999" if r.method == "base" else "#d62728" if r.method == "xft" else "#1f77b4" for r in rows]
    ax.bar(range(len(rows)), means, yerr=errs, capsize=4, color=colors)
    for i, r in enumerate(rows):
        for s in r.scores if len(r.scores) > 1 else []:
            ax.plot(i, 100 * s, "k.", ms=4)
        ax.text(i, means[i] + errs[i] + 0.5, f"{means[i]:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), names, fontsize=8, rotation=30, ha="right")
    ax.set_ylabel("pass@1 (%)")
    seeds = max(len(r.scores) for r in rows)
    ax.set_title(f"{benchmark} pass@1 by model" + (f" (mean ± 95% CI, {seeds} seeds)" if seeds > 1
                                                   else " (± 95% CI over tasks)"))
    ax.set_ylim(0, max([m + e for m, e in zip(means, errs)] + [1]) * 1.08 + 4)  # room for bars, CIs, labels
    return save_figure(fig, path)


def read_routing_log(run_dir: str) -> list[dict]:
    """The per-layer expert loads `xft.train` logged during an MoE run (routing.jsonl)."""
    path = os.path.join(run_dir, "routing.jsonl")
    if not os.path.isfile(path):
        return []
    return [record for _, record in read_jsonl(path)]


def plot_expert_load(records: list[dict], path: str) -> str | None:
    """Per layer: each routed expert's share of the routed tokens over training steps."""
    if not records:
        return None
    plt = pyplot()
    layers = sorted(records[0]["layers"], key=int)
    cols = min(4, len(layers))
    rows_ = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.2 * cols, 2.6 * rows_), squeeze=False, sharey=True)
    steps = [r["step"] for r in records]
    for ax, layer in zip(axes.flat, layers):
        shares = [r["layers"][layer]["load_share"] for r in records]
        n = len(shares[0])
        for e in range(n):
            ax.plot(steps, [s[e] for s in shares], lw=1.2, label=f"expert {e + 1}")
        ax.axhline(1 / n, color="k", ls="--", lw=0.8)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    axes[0][0].set_ylabel("share of routed tokens")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 8), fontsize=7, frameon=False)
    fig.suptitle("Expert load during MoE SFT (routed experts; dashed: even split)", fontsize=10)
    return save_figure(fig, path, rect=(0, 0.08, 1, 1))


def plot_merge_coefficients(record: dict | None, path: str) -> str | None:
    """Heat map of the learned mixing coefficients, layer × expert (expert 0 = shared)."""
    if not record:
        return None
    plt = pyplot()
    import numpy as np

    layers = sorted(record["coefficients"], key=int)
    c = np.array([record["coefficients"][k] for k in layers])  # [L, N]
    n = c.shape[1]
    lam = record.get("shared_weight", 0.75)
    init = (1 - lam) / (n - 1)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 0.5 * len(layers) + 2.2),
                                   gridspec_kw={"width_ratios": [1, 2.2]})
    ax0.barh(range(len(layers)), c[:, 0], color="#7f7f7f")
    ax0.set_yticks(range(len(layers)), [f"layer {k}" for k in layers])
    ax0.set_xlim(0, 1)
    ax0.set_title(f"shared expert (λ = {lam})", fontsize=9)
    ax0.invert_yaxis()
    routed = c[:, 1:] / init  # relative to the initial (1-λ)/(N-1)
    lim = max(abs(np.log2(routed)).max(), 1e-3)
    im = ax1.imshow(np.log2(routed), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for i in range(routed.shape[0]):
        for j in range(routed.shape[1]):
            ax1.text(j, i, f"{c[i, j + 1]:.4f}", ha="center", va="center", fontsize=7)
    ax1.set_xticks(range(n - 1), [f"{j + 1}" for j in range(n - 1)])
    ax1.set_yticks(range(len(layers)), [f"layer {k}" for k in layers])
    ax1.set_xlabel("routed expert")
    ax1.set_title(f"routed experts' coefficients (colour: log2 of ratio to init {init:.4f})", fontsize=9)
    fig.colorbar(im, ax=ax1, fraction=0.04)
    fig.suptitle(f"Learned merge coefficients ({record.get('method', 'learned')})", fontsize=10)
    return save_figure(fig, path)


# ---------------------------------------------------------------- finding runs

def find_runs(path: str) -> list[str]:
    """The run directories in `path`: `path` itself (xft run) or its sub-directories that are runs (xft demo)."""
    from xft.errors import UserError
    from xft.pipeline.runner import RECIPE_FILE

    if os.path.isfile(os.path.join(path, RECIPE_FILE)):
        return [path]
    subs = sorted(os.listdir(path)) if os.path.isdir(path) else []
    runs = [os.path.join(path, d) for d in subs if os.path.isfile(os.path.join(path, d, RECIPE_FILE))]
    if not runs:
        what = "does not exist" if not os.path.exists(path) else f"holds no {RECIPE_FILE} (nor do its folders)"
        raise UserError(f"{path} is not a run directory of xft run or xft demo: it {what}")
    return runs


def _saved_recipe(run: str) -> dict:
    from xft.pipeline.runner import saved_recipe

    return saved_recipe(run) or {}


def benchmarks_of(runs: list[str]) -> list[str]:
    """Benchmarks evaluated in the runs: the recipes' order first, then any other found on disk."""
    order = [b for run in runs for b in (_saved_recipe(run).get("eval") or {}).get("benchmarks", [])]
    for run in runs:
        for method in METHODS:
            evaluated = os.path.join(run, "eval", method)
            order += sorted(os.listdir(evaluated)) if os.path.isdir(evaluated) else []
    return [b for b in dict.fromkeys(order) if any(eval_results(run, m, b) for run in runs for m in METHODS)]


# ---------------------------------------------------------------- summary table

def summary_table(runs: list[str], benchmarks: list[str], methods: list[str] | None = None) -> str:
    """Markdown table of pass@1, model × benchmark, with each benchmark's number of tasks ("" if none)."""
    cells: dict[str, dict[str, str]] = {}
    tasks: dict[str, int] = {}
    for method in methods or list(METHODS):
        for bench in benchmarks:
            results = [r for run in runs if (r := eval_results(run, method, bench))]
            if not results:
                continue
            n = results[0].get("n_tasks")
            tasks.setdefault(bench, n)
            note = f" (n={n})" if n != tasks[bench] else ""  # evaluated with another eval.limit
            cells.setdefault(method, {})[bench] = Row(method, [r["pass@1"] for r in results]).score(n) + note
    if not cells:
        return ""
    seeds = len(runs)
    what = f"mean ± 95% CI over {seeds} seeds" if seeds > 1 else "± 95% CI over tasks, one seed"
    shown = [b for b in benchmarks if b in tasks]
    return f"Greedy pass@1 in % ({what}):\n\n" + markdown_table(
        ["model", *(f"{b} ({tasks[b]} tasks)" for b in shown)],
        [[label(m), *(c.get(b, "-") for b in shown)] for m, c in cells.items()])


# ---------------------------------------------------------------- what the report says around the numbers

ONE_SEED = (
    "**One seed cannot order these models.** Every number here comes from one fine-tuning seed. Another "
    "seed changes the data order, the router initialisation and the router noise, and that alone can move a "
    "model's pass@1 by as much as the gaps between methods ([results](RESULTS) measures it on MiniCode); the "
    "± intervals count only the sampling of tasks. Read the table as \"which models learned\", not as "
    "\"method A beats method B\". To compare methods, run several seeds (`xft demo --seeds 3`, or one "
    "`xft run ... --set seed=N --out DIR/seed-N` per seed, then `xft report DIR`) and read the paired "
    "differences. On MiniCode, the study with every method tuned alike and 8 paired seeds (`xft demo --study`, "
    "[results](RESULTS)) found XFT's merge equal to its MoE and neither ahead of dense SFT.")
SEVERAL_SEEDS = (
    "**{n} seeds.** The tables give the mean and its 95% interval over seeds. A difference between two "
    "methods is resolved only when the interval of its paired difference (below) excludes 0; overlapping "
    "intervals in the first table do not settle it either way.")

CAPTIONS = {
    "pass_at_1": (
        "**Figure {i}. pass@1 by model on {bench}.** One bar per model: the share of {bench}'s tasks whose "
        "single greedy answer passes all of the task's tests in the sandbox. Error bars: the 95% interval "
        "(over seeds with several seeds, dots marking each seed; over tasks with one seed). Grey: the base "
        "model; red: the XFT learned merge."),
    "expert_load": (
        "**Figure {i}. Expert load during MoE SFT** (the first run's `moe` stage). For each layer, the share "
        "of the routed tokens that each routed expert received, over the training steps; the shared expert "
        "sees every token and is not shown. The dashed line is an even split. Lines that stay near it mean "
        "the balance loss kept every expert in use; a line falling to 0 is an expert the router abandoned."),
    "merge_coefficients": (
        "**Figure {i}. Learned merge coefficients** (the first run's `xft` stage). Left: the shared "
        "expert's weight λ in each layer (fixed unless merge.learn_shared_weight). Right: each routed "
        "expert's coefficient in the merged FFN (the numbers); the colour is log2 of its ratio to the init "
        "merge's (1 − λ)/(N − 1). All white means the learning step left the init merge as it was."),
}

TERMS = [
    "**λ (shared expert weight)**: the weight of the shared expert's FFN in a merge (merge.shared_weight, "
    "{lam} here; the paper's 0.75); the routed experts share the remaining 1 − λ.",
    "**pass@1**: the share of a benchmark's tasks whose single greedy answer passes all of the task's tests, "
    "run in a sandbox.",
    "**seed**: the fine-tuning seed (data order, router initialisation, router noise); with several seeds, "
    "the 95% interval of the mean is Student's t over seeds.",
    "**training tokens / FLOPs**: tokens the Trainer saw (padding included) and ≈ 6 · active parameters · "
    "tokens; a merged model carries the compute of the MoE it came from.",
]
MINICODE_TERMS = [
    "**composition** (MiniCode): held-out *compositions* — combinations of primitives that never occur in "
    "training, although each primitive does ([MiniCode](MINICODE)).",
    "**phrasing** (MiniCode): held-out *phrasings* — problems worded with sentence frames that never occur in "
    "training.",
]
PAIRED_TERM = ("**paired difference**: within each seed, the first method's pass@1 minus the second's; the "
               "mean over seeds and its 95% t interval decide whether a claim holds.")

# Documentation the report links, relative to the repository (linked when this is a checkout that has them).
DOCS = {"README": "README.md", "RESULTS": "docs/results.md", "MINICODE": "docs/minicode.md",
        "PIPELINE": "docs/pipeline.md", "EVALUATION": "docs/evaluation.md",
        "TRAINING": "docs/training.md"}


def _doc_links(out: str) -> dict[str, str]:
    """DOCS key -> link target relative to `out`, for the docs this checkout has (none in a plain install)."""
    import xft

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(xft.__file__))))  # above src/xft/
    return {key: os.path.relpath(os.path.join(repo, rel), os.path.abspath(out)) for key, rel in DOCS.items()
            if os.path.isfile(os.path.join(repo, rel))}


def _link(text: str, links: dict[str, str]) -> str:
    """Point "[text](KEY)" at the doc's file, or name the doc in the repository when it is not here."""
    for key, rel in DOCS.items():
        target = links.get(key)
        text = re.sub(rf"\[([^\]]+)\]\({key}\)", (lambda m, t=target: f"[{m.group(1)}]({t})") if target
                      else (lambda m, r=rel: f"{m.group(1)} ({r} in the xft repository)"), text)
    return text


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _header(runs: list[str]) -> str:
    """Command, machine and wall time, from what the runs recorded (unchanged by a re-run that skips all)."""
    from xft.pipeline.scheduler import read_sessions, read_timings

    sessions = [s for run in runs for s in read_sessions(run)]
    stage = sum(sum(read_timings(run).values()) for run in runs)
    lines = []
    if sessions:
        last = sessions[-1]
        if last.get("command"):
            lines.append(f"Command: `{last['command']}`" + (f", {len(runs)} runs (seeds)" if len(runs) > 1 else "")
                         + ".")
        kernels = f", CPU kernels {last['cpu_capability']}" if last.get("cpu_capability") else ""
        lines.append(f"Machine: {last.get('machine')}{kernels}, device {last.get('device')}.")
        wall = sum(s.get("seconds", 0.0) for s in sessions)
        lines.append(f"Wall time: **{_duration(wall)}** (every invocation that ran stages, summed over the runs; "
                     f"sessions.json); the stages themselves add up to {_duration(stage)} (timings.json; with "
                     "--jobs they run side by side).")
    elif stage:
        lines.append(f"The stages add up to {_duration(stage)} (timings.json in each run).")
    return " ".join(lines)


def _glossary(methods: list[str], runs: list[str], breakdown: bool, claims: bool) -> list[str]:
    lam = (_saved_recipe(runs[0]).get("merge") or {}).get("shared_weight", 0.75)
    items = [m.glossary for m in METHODS.values() if m.name in methods]
    items += [t.format(lam=lam) for t in TERMS] + (MINICODE_TERMS if breakdown else []) + (
        [PAIRED_TERM] if claims else [])
    return [f"* {item}" for item in items]


# ---------------------------------------------------------------- report.md

def write_report(out: str, runs: list[str], title: str, preamble: str = "", methods: list[str] | None = None,
                 benchmarks: list[str] | None = None) -> tuple[str, str]:
    """Write `out/report.md` and `out/plots/*.png` for the runs; returns (report path, the pass@1 summary)."""
    benchmarks = benchmarks or benchmarks_of(runs)
    summary = summary_table(runs, benchmarks, methods)
    bench = benchmarks[0] if benchmarks else "minicode"  # the benchmark of the detailed tables and plot
    rows = collect(runs, bench, methods)
    first = eval_results(runs[0], rows[0].method, bench) if rows else None
    n_tasks = first["n_tasks"] if first else None
    links = _doc_links(out)
    plots_dir = os.path.join(out, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    plots = [("pass_at_1", f"pass@1 by model on {bench}",
              plot_pass_at_1(rows, os.path.join(plots_dir, "pass_at_1.png"), n_tasks, bench) if rows else None),
             ("expert_load", "expert load per layer during MoE SFT",
              plot_expert_load(read_routing_log(os.path.join(runs[0], "moe")),
                               os.path.join(plots_dir, "expert_load.png"))),
             ("merge_coefficients", "learned merge coefficients per layer",
              plot_merge_coefficients(read_json(os.path.join(model_dir(runs[0], "xft"), "merge_coefficients.json")),
                                      os.path.join(plots_dir, "merge_coefficients.png")))]
    seeds = max((len(r.scores) for r in rows), default=len(runs))
    lines = [f"# {title}", "", preamble.strip(), "", _header(runs), "",
             ONE_SEED if seeds <= 1 else SEVERAL_SEEDS.format(n=seeds), "", "## pass@1", "",
             summary or "No evaluation has finished yet: re-run the run's command to continue it.", ""]
    if rows:
        lines += [f"## Size and compute (pass@1 on {bench})", "", table(rows, n_tasks), ""]
    claims = claims_table(paired_differences(runs, bench))
    if claims:
        lines += ["## The paper's claims", "", f"As paired differences on {bench} (same seed, first method minus "
                  "second; \"holds\" when the 95% interval of the mean difference is above 0):", "", claims, ""]
    breakdown = _breakdown_table(runs, [r.method for r in rows], bench)
    if breakdown:
        lines += ["## By generalization kind", "", "Pass@1 on held-out compositions and held-out phrasings "
                  "(mean over seeds; see the glossary):", "", breakdown, ""]
    gaps = _merge_gap_table(runs, [r.method for r in rows], bench)
    if gaps:
        lines += ["## Merge gap", "", "What each merge lost and how far its MoE's experts had drifted apart before "
                  "it (mean over runs; merge_gap.json of each merge, docs/method.md \"Beyond the paper: the merge "
                  f"gap\"; pass@1 on {bench}):", "", gaps, ""]
    drawn = [(key, alt, path) for key, alt, path in plots if path]
    if drawn:
        lines += ["## Plots", ""]
    for i, (key, alt, path) in enumerate(drawn, 1):
        lines += [f"![{alt}](plots/{os.path.basename(path)})", "", CAPTIONS[key].format(i=i, bench=bench), ""]
    timing = _timings_table(runs)
    if timing:
        lines += ["## Stage times", "", "Wall time per stage (seconds, summed over the runs; timings.json):", "",
                  timing, ""]
    lines += ["## Glossary", "", *_glossary([r.method for r in rows], runs, bool(breakdown), bool(claims)), ""]
    docs = [f"[{rel}]({links[key]})" for key, rel in DOCS.items() if key in links]
    lines += ["## Further reading", "", ("In this checkout: " + ", ".join(docs) + ".") if docs else
              "In the xft repository: README.md, docs/results.md (measured results and how to read them), "
              "docs/minicode.md (the benchmark).", ""]
    report = os.path.join(out, "report.md")
    atomic_write_text(report, re.sub(r"\n{3,}", "\n\n", _link("\n".join(lines), links)))
    # what `build_report` needs to write this same report again (xft report DIR)
    atomic_write_json(os.path.join(out, REPORT_SETTINGS), {"title": title, "preamble": preamble})
    return report, summary


def build_report(path: str) -> tuple[str, str]:
    """(Re)build `path/report.md` and plots for the run(s) in `path`; returns (report path, pass@1 summary).

    The title and preamble are the ones the report was first written with (xft demo's), if any.
    """
    runs = find_runs(path)
    saved = read_json(os.path.join(path, REPORT_SETTINGS)) or {}
    title = saved.get("title") or f"XFT report: {os.path.basename(os.path.abspath(path))}"
    return write_report(path, runs, title, preamble=saved.get("preamble", ""))


def _breakdown_table(runs: list[str], methods: list[str], benchmark: str) -> str:
    cols: list[str] = []
    data: dict[str, dict[str, list[float]]] = {}
    for method in methods:
        for run in runs:
            res = eval_results(run, method, benchmark) or {}
            for k, v in res.get("by_generalization", {}).items():
                if k not in cols:
                    cols.append(k)
                data.setdefault(method, {}).setdefault(k, []).append(v)
    if not cols:
        return ""
    cells = []
    for method in methods:
        vals = [data.get(method, {}).get(c, []) for c in cols]
        cells.append([label(method), *(f"{100 * sum(v) / len(v):.1f}" if v else "-" for v in vals)])
    return markdown_table(["model", *cols], cells)


def _merge_gap_table(runs: list[str], methods: list[str], benchmark: str) -> str:
    """Per merge of `methods`: its MoE's expert drift, the held-out loss gap where measured, and the pass@1 the
    merge lost (MoE minus merged), each averaged over the runs that have it."""
    cells = []
    for method in methods:
        m = METHODS.get(method)
        if m is None or m.kind != "merge":
            continue
        drift, loss, lost = [], [], []
        for run in runs:
            gap = read_json(os.path.join(run, method, "merge_gap.json")) or {}
            if gap.get("mean_expert_drift") is not None:
                drift.append(gap["mean_expert_drift"])
            if gap.get("loss_gap") is not None:
                loss.append(gap["loss_gap"])
            merged, moe = eval_results(run, method, benchmark), eval_results(run, m.merge_of, benchmark)
            if merged and moe:
                lost.append(moe["pass@1"] - merged["pass@1"])
        if drift or lost:
            mean = (lambda v, f: f.format(sum(v) / len(v)) if v else "-")
            cells.append([label(method), label(m.merge_of), mean(drift, "{:.4f}"), mean(loss, "{:+.4f}"),
                          mean([100 * x for x in lost], "{:+.1f}")])
    if not cells:
        return ""
    return markdown_table(["merge", "of", "expert drift (before)", "held-out loss gap", "pass@1 lost (points)"],
                          cells)


def _timings_table(runs: list[str]) -> str:
    from xft.pipeline.scheduler import read_timings

    total: dict[str, float] = {}
    for run in runs:
        for stage, seconds in read_timings(run).items():
            total[stage] = total.get(stage, 0.0) + seconds
    if not total:
        return ""
    return markdown_table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in total.items()]
                          + [["**all stages**", f"**{sum(total.values()):.0f}**"]])


# ---------------------------------------------------------------- outputs of single commands (made by hand)

_RESULTS = "results.json"  # what `xft eval --out DIR` writes (xft.eval.report)
_TRAINING = "xft_training.json"  # what a finished `xft train` / `xft merge` writes beside the weights


def _read_dict(path: str) -> dict:
    value = read_json(path)
    return value if isinstance(value, dict) else {}


def find_outputs(path: str, depth: int = 2) -> list[str]:
    """`path` and the directories under it (`depth` levels) that an xft command wrote: a model directory
    of upcycle/train/merge (its run file, finished or not) or an evaluation (results.json)."""
    from xft.artifacts import RUN_FILE

    if not os.path.isdir(path):
        return []
    found = [path] if any(os.path.isfile(os.path.join(path, f)) for f in (RUN_FILE, _RESULTS)) else []
    if depth > 0:
        for name in sorted(os.listdir(path)):
            sub = os.path.join(path, name)
            if os.path.isdir(sub) and not os.path.islink(sub) and not name.startswith((".", "checkpoint-")):
                found += find_outputs(sub, depth - 1)
    return found


def model_row(directory: str) -> list[str] | None:
    """| output | command | state | made from | steps | final training loss | final validation loss |"""
    from xft.training.rundir import COMMANDS, RunDir

    run = RunDir(directory)
    record = _read_dict(run.run_file)
    if not record:
        return None
    history = _read_dict(os.path.join(directory, _TRAINING)).get("log_history", [])
    last = lambda key: next((f"{h[key]:.4f}" for h in reversed(history) if key in h), "-")  # noqa: E731
    steps = max((h.get("step", 0) for h in history), default=0)
    if run.is_finished():
        state = "finished"
    else:
        done = run.last_checkpoint()
        state = f"interrupted (checkpoint {os.path.basename(done)})" if done else "started, no checkpoint"
    stage = record.get("stage", "?")
    method = f" ({record['method']})" if stage == "merge" and record.get("method") else ""
    source = record.get("model") or record.get("moe") or "-"
    return [directory, f"xft {COMMANDS.get(stage, stage)}{method}", state, f"`{source}`",
            str(steps) if steps else "-", last("loss"), last("eval_loss")]


def eval_row(directory: str) -> list[str] | None:
    """| output | benchmark | model | pass@1 | tasks |"""
    results = _read_dict(os.path.join(directory, _RESULTS))
    if "benchmark" not in results:
        return None
    model = results.get("model") or (f"samples {results['samples_file']}" if results.get("samples_file") else "-")
    score = results.get("pass@1")
    return [directory, results["benchmark"], f"`{model}`", f"{100 * score:.1f}" if score is not None else "-",
            str(results.get("n_tasks", "-"))]


def outputs_report(path: str, outputs: list[str]) -> tuple[str, str]:
    """Write `path`/report.md: a table of the models and one of the evaluations in `outputs`; return (its path,
    the evaluations' table, or the models' when there is none)."""
    shown = lambda d: os.path.relpath(d, path) if d != path else "."  # noqa: E731
    models = [[shown(r[0]), *r[1:]] for r in map(model_row, outputs) if r]
    evals = [[shown(r[0]), *r[1:]] for r in map(eval_row, outputs) if r]
    parts = [f"# xft outputs in {os.path.abspath(path)}", ""]
    model_table = markdown_table(["output", "command", "state", "made from", "steps", "final training loss",
                          "final validation loss"], models)
    eval_table = markdown_table(["output", "benchmark", "model", "pass@1 (%)", "tasks"], evals)
    if models:
        parts += ["## Models", "", model_table, ""]
    if evals:
        parts += ["## Evaluations", "", eval_table, ""]
    report = os.path.join(path, "report.md")
    atomic_write_text(report, "\n".join(parts))
    return report, eval_table if evals else model_table
