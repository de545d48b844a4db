"""Tables and plots of a seed-paired study, computed from its `study.json` alone (`xft report --study`).

    path, text = study_report("docs/results/study.json")                       # study.md + PNGs beside it
    study_report("docs/results/study.json", markdown="docs/results.md")       # also refresh that file's block

Every number is recomputed from the per-seed pass@1 in the file: the
means and their 95% t intervals over seeds, the paper's claims as paired
differences (same seed, first method minus second) with their t interval,
two-sided p-value and the smallest difference the design detects at 80%
power (`xft.stats.paired`), the tuning grid and choices, and the MoE
family's per-seed training diagnostics beside its pass@1. With
`markdown=FILE`, the text between FILE's `<!-- study:begin -->` and
`<!-- study:end -->` lines is replaced by the tables (nothing else changes).
"""

from __future__ import annotations

import json
import os
import re

from xft.artifacts import atomic_write_text
from xft.errors import UserError
from xft.pipeline.report import CLAIMS, COMPARISONS, label, markdown_table, points
from xft.stats import correlation_ci, mean_ci, paired, pearson

BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"
VERDICTS = {"holds": "**holds**", "reversed": "**reversed**", "unresolved": "unresolved"}
READINGS = {"holds": "**higher**", "reversed": "**lower**", "unresolved": "unresolved"}  # a comparison's


def load_study(path: str) -> dict:
    """The contents of a study.json (UserError naming the file if it is not one)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise UserError(f"{path}: cannot read the study file ({e.strerror})") from None
    except ValueError as e:
        raise UserError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or "seeds" not in data or "tuning" not in data:
        raise UserError(f"{path}: not a study.json of xft demo --study (no 'seeds' / 'tuning')")
    return data


def scores(data: dict) -> dict[str, dict[int, float]]:
    """Method -> seed -> pass@1, from the study's per-seed results."""
    out: dict[str, dict[int, float]] = {}
    for entry in data["seeds"]:
        for method, res in entry["results"].items():
            out.setdefault(method, {})[entry["seed"]] = res["pass@1"]
    return out


def claims(data: dict, level: float = 0.95, power: float = 0.8,
           pairs: tuple = CLAIMS) -> list[tuple[str, str, str, object]]:
    """Per claim of `pairs` (the paper's, `xft.pipeline.report.CLAIMS`; or `COMPARISONS`) whose two methods are in the
    study: (a, b, claim, xft.stats.Paired)."""
    s = scores(data)
    out = []
    for a, b, claim in pairs:
        common = sorted(set(s.get(a, {})) & set(s.get(b, {})))
        if len(common) >= 2:
            out.append((a, b, claim, paired([s[a][i] for i in common], [s[b][i] for i in common],
                                            level=level, power=power)))
    return out


def task_noise(data: dict, a: str, b: str) -> float | None:
    """Half-width (95%, Student's t over the tasks) of the task-sampling error of the seed-mean paired difference a − b.

    Per task, the difference of the verdicts averaged over the seeds; its
    standard error over the tasks is what drawing another eval set of the same
    size would move the mean difference by (None without per-task verdicts).
    """
    rows = [(e["results"][a].get("verdicts"), e["results"][b].get("verdicts")) for e in data["seeds"]
            if a in e["results"] and b in e["results"]]
    if not rows or any(va is None or vb is None or len(va) != len(vb) for va, vb in rows):
        return None
    n_tasks = len(rows[0][0])
    per_task = [sum(int(va[t]) - int(vb[t]) for va, vb in rows) / len(rows) for t in range(n_tasks)]
    return mean_ci(per_task).half_width


def _setting(t: dict) -> str:
    """The name of a tuning entry's setting in a table header: lr, merge_density, ..."""
    return t.get("setting", "lr").rsplit(".", 1)[-1].removeprefix("distill_")


def _tuning_table(data: dict) -> str:
    """One table per grid (the training methods' learning rates, the learned merge's, TIES's densities, ...)."""
    groups: dict[tuple, dict] = {}
    for method, t in data["tuning"].items():
        groups.setdefault((_setting(t), tuple(sorted(t["grid"], key=float))), {})[method] = t
    return "\n\n".join(_grid_table(grids, name) for (name, _), grids in groups.items())


def _grid_table(grids: dict, name: str = "lr") -> str:
    lrs = sorted({lr for t in grids.values() for lr in t["grid"]}, key=float)
    rows = []
    for method, t in grids.items():
        cells = [points((t["grid"].get(lr) or {}).get("valid_pass@1")) for lr in lrs]
        cells = [f"**{c}**" if float(lr) == t["chosen"] else c for lr, c in zip(lrs, cells)]
        rows.append([label(method), *cells, f"{t['chosen']:g}"])
    return markdown_table(["method", *(f"{name} {lr}" for lr in lrs), "chosen"], rows)


def _methods_table(data: dict) -> str:
    s = scores(data)
    compute = data.get("compute", {})
    rows = []
    for method in data["methods"]:
        if method not in s:
            continue
        vals = [s[method][i] for i in sorted(s[method])]
        flops = compute.get(method, {}).get("flops")
        flops_text = f"{flops / 1e12:.2f}T" if flops else "-"
        ci = mean_ci(vals)
        wall = wall_minutes(data, method)
        rows.append([label(method), points(ci.mean, ci.half_width), points(ci.sd),
                     f"{points(min(vals))} – {points(max(vals))}", str(len(vals)), flops_text,
                     "-" if wall is None else f"{wall:.1f}"])
    return markdown_table(["model", "pass@1, mean ± 95% CI", "sd over seeds", "min – max", "seeds",
                           "training FLOPs (≈6·N·D)", "training wall time (min, 1 thread)"], rows)


def wall_minutes(data: dict, method: str) -> float | None:
    """Mean over seeds of the wall time (minutes, one thread) of the training stages `method`'s model carries:
    its own, and for a merge the MoE's (`compute_chain`); None without timings."""
    chain = (data["methods"].get(method) or {}).get("compute_chain") or [method]
    per_seed = []
    for e in data["seeds"]:
        times = [(e["results"].get(m) or {}).get("train_seconds") for m in chain]
        if all(t is not None for t in times):
            per_seed.append(sum(times) / 60)
    return sum(per_seed) / len(per_seed) if per_seed else None


def _claims_table(data: dict, pairs: tuple = CLAIMS) -> str:
    first = "the paper's claim" if pairs is CLAIMS else "comparison (first minus second)"
    words = VERDICTS if pairs is CLAIMS else READINGS
    rows = [[claim, points(p.mean, p.half_width, sign=True), f"{sum(d > 0 for d in p.diffs)} of {p.n}",
             f"{p.p_value:.3f}", f"≥ {100 * p.mde:.1f}", points(task_noise(data, a, b)), words[p.verdict]]
            for a, b, claim, p in claims(data, pairs=pairs)]
    return markdown_table([first, "paired difference (points), mean ± 95% CI over seeds", "seeds where it holds",
                           "p (two-sided)", "detectable at 80% power", "task sampling ±", "verdict"], rows)


def merge_gap_points(data: dict) -> list[dict]:
    """One point per (merge method, seed) with merge-gap diagnostics: the MoE's mean expert drift and routing
    spread (before merging), the held-out loss gap and the pass@1 gap, MoE minus merged (after)."""
    out = []
    for e in data["seeds"]:
        for method, res in e["results"].items():
            gap = res.get("merge_gap")
            source = (data["methods"].get(method) or {}).get("merge_of")
            if not gap or source not in e["results"]:
                continue
            out.append({"method": method, "seed": e["seed"], "drift": gap["mean_expert_drift"],
                           "spread": gap.get("mean_routing_spread"), "loss_gap": gap.get("loss_gap"),
                           "pass_gap": e["results"][source]["pass@1"] - res["pass@1"]})
    return out


def _gap_tables(data: dict) -> tuple[str, str]:
    """(per merge method: mean drift, spread, loss gap and pass@1 gap with its t interval; how well each
    before-merge diagnostic predicts each gap over the learned merges' (method, seed) points)."""
    gaps = merge_gap_points(data)
    if not gaps:
        return "", ""
    lines = []
    for method in data["methods"]:
        rows = [p for p in gaps if p["method"] == method]
        if not rows:
            continue
        mean = (lambda k: sum(p[k] for p in rows) / len(rows) if all(p[k] is not None for p in rows) else None)
        ci = mean_ci([p["pass_gap"] for p in rows])
        fmt = (lambda v, f: "-" if v is None else f.format(v))
        lines.append([label(method), label(data["methods"][method]["merge_of"]), fmt(mean("drift"), "{:.4f}"),
                      fmt(mean("spread"), "{:.3f}"), fmt(mean("loss_gap"), "{:+.4f}"),
                      points(ci.mean, ci.half_width, sign=True)])
    learned = [p for p in gaps if (data["methods"][p["method"]].get("section") == "merge")]
    corr = []
    for x in ("drift", "spread"):
        for y, name in (("loss_gap", "held-out loss gap"), ("pass_gap", "pass@1 gap")):
            pts = [p for p in learned if p[x] is not None and p[y] is not None]
            if len(pts) >= 4:
                xs, ys = [p[x] for p in pts], [p[y] for p in pts]
                cells = [correlation_ci(xs, ys), correlation_ci(xs, ys, groups=[p["method"] for p in pts])]
                corr.append(["expert drift" if x == "drift" else "routing spread", name,
                             *(f"{r:+.2f} [{lo:+.2f}, {hi:+.2f}]" for r, lo, hi in cells), str(len(pts))])
    return (markdown_table(["merge", "of", "expert drift (before)", "routing spread (before)",
                            "held-out loss gap (after)", "pass@1 gap, MoE − merged (points, ± 95% CI)"], lines),
            markdown_table(["predictor (before merging)", "gap (after)", "Pearson r [95% CI], all points",
                            "within each MoE kind", "points"], corr) if corr else "")


def _seed_table(data: dict) -> str:
    s = scores(data)
    seeds = sorted({e["seed"] for e in data["seeds"]})
    return markdown_table(["model", *(f"seed {i}" for i in seeds)],
                          [[label(m), *(points(s[m].get(i)) for i in seeds)] for m in data["methods"] if m in s])


def _diagnostics_table(data: dict) -> tuple[str, list[str]]:
    """Per training method: per seed final loss, gradient-norm peak, router entropy, load ratio beside pass@1;
    and one sentence per method on how final loss and pass@1 co-vary over seeds."""
    lines, notes = [], []
    for method in data["methods"]:
        rows = [(e["seed"], e["results"][method]) for e in data["seeds"] if method in e["results"]
                and e["results"][method].get("diagnostics")]
        if not rows:
            continue
        for seed, res in rows:
            d = res["diagnostics"]
            fmt = (lambda k, f="{:.3f}": f.format(d[k]) if d.get(k) is not None else "-")
            lines.append([label(method), str(seed), points(res["pass@1"]), fmt("final_loss", "{:.4f}"),
                          fmt("grad_norm_max", "{:.2f}"), fmt("router_entropy"), fmt("max_layer_load_ratio", "{:.2f}")])
        if len(rows) >= 3:
            r = pearson([res["diagnostics"]["final_loss"] for _, res in rows], [res["pass@1"] for _, res in rows])
            notes.append(f"{label(method)}: correlation of final training loss with pass@1 over "
                         f"{len(rows)} seeds r = {r:+.2f}")
    return markdown_table(["model", "seed", "pass@1", "final training loss", "max grad norm",
                           "router entropy (nats, trained)", "worst layer max/mean load"], lines), notes


def render(data: dict, plots: dict[str, str] | None = None) -> str:
    """The study's tables as markdown (plots: name -> relative path of a PNG to show)."""
    prov = data.get("provenance", {})
    proto = data.get("protocol", {})
    n = len(data["seeds"])
    diag, notes = _diagnostics_table(data)
    out = [
        f"Generated by `xft report --study` from `study.json` ({n} seeds; benchmark {data.get('benchmark')}; "
        f"commit {prov.get('commit')}; {prov.get('machine')}"
        f"{', CPU kernels ' + prov['cpu_capability'] if prov.get('cpu_capability') else ''}; wall time "
        f"{prov.get('wall_seconds', 0) / 60:.0f} min with {prov.get('jobs')} runs at a time; command "
        f"`{prov.get('command')}`).",
        "",
        f"**Tuning** (validation pass@1, %, tuning seed {proto.get('tune_seed')}; {proto.get('selection')}):",
        "", _tuning_table(data), "",
        f"**pass@1 on the held-out eval set** (%, over {n} seeds, Student's t interval):", "",
        _methods_table(data), "",
        "**The paper's claims**, paired by seed (first method minus second; \"detectable\": the smallest true "
        "difference this design finds with 80% probability at the observed seed-to-seed spread of the "
        "difference, noncentral t; \"task sampling\": how far another eval set of the same size would move the "
        "mean difference, 95%, from the per-task verdicts; the verdict is the seed interval's: above 0 holds, "
        "below 0 reversed):", "",
        _claims_table(data), "",
    ]
    if plots and plots.get("claims"):
        out += [f"![paired differences]({plots['claims']})", ""]
    if claims(data, pairs=COMPARISONS):
        out += ["**Beyond the paper**, each variant against the paper's method it replaces, paired by seed (same "
                "columns; \"higher\" / \"lower\": the seed interval excludes 0):", "",
                _claims_table(data, COMPARISONS), ""]
    gaps, corr = _gap_tables(data)
    if gaps:
        out += ["**Merge gap**, per merge (mean over seeds). Before merging, from the MoE: expert drift (RMS "
                "distance of the experts from their mean over all FFN weights, relative to the mean's norm, "
                "averaged over layers) and routing spread (mean over tokens of the total-variation distance of a "
                "token's routing weights from the average token's). After: the held-out loss of the merged model "
                "minus the MoE's and the pass@1 the merge lost, on the first 128 validation problems with their "
                "reference answers (`xft.merge_diagnostics`):", "", gaps, ""]
        if corr:
            out += ["How well the before-merge diagnostics predict the gap, over the learned merges' (MoE, seed) "
                    "points (Pearson r, Fisher-z interval; \"within each MoE kind\": both centred on each merge's "
                    "own means, so differences between the kinds of MoE do not count):", "", corr, ""]
        if plots and plots.get("merge_gap"):
            out += [f"![merge gap against expert drift]({plots['merge_gap']})", ""]
    out += ["**Per seed** (pass@1, %):", "", _seed_table(data), ""]
    if plots and plots.get("seeds"):
        out += [f"![pass@1 per seed]({plots['seeds']})", ""]
    out += ["**Training diagnostics per seed** (from each run's xft_training.json and routing.jsonl; router "
            "entropy of the trained MoE on 64 validation problems: log R is uniform over its R routed experts, "
            "e.g. log 7 = 1.95):", "", diag, ""]
    if plots and plots.get("loss"):
        out += [f"![training loss per seed]({plots['loss']})", ""]
    if notes:
        out += ["; ".join(notes) + ".", ""]
    return "\n".join(out)


def _plot(data: dict, out_dir: str) -> dict[str, str]:
    """study_claims.png (paired differences with intervals), study_seeds.png (pass@1 per method, one dot per
    seed), study_loss.png (each training method's loss curve per seed), study_merge_gap.png (gaps vs drift)."""
    from xft.pipeline.report import pyplot, save_figure

    plt = pyplot()
    paths = {}
    for name, draw in (("claims", _plot_claims), ("seeds", _plot_seeds), ("loss", _plot_loss),
                       ("merge_gap", _plot_gap)):
        fig = draw(plt, data)
        if fig is not None:
            paths[name] = save_figure(fig, os.path.join(out_dir, f"study_{name}.png"), dpi=120)
    return paths


def _plot_claims(plt, data: dict):
    cl = claims(data)
    if not cl:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(cl) + 1.2))
    for i, (_, _, claim, p) in enumerate(cl):
        y = len(cl) - 1 - i
        ax.errorbar(100 * p.mean, y, xerr=100 * p.half_width, fmt="o", color="C0", capsize=3)
        ax.scatter([100 * d for d in p.diffs], [y] * p.n, s=8, color="0.5", zorder=0)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(cl)))
    ax.set_yticklabels([c[2] for c in reversed(cl)], fontsize=8)
    ax.set_xlabel("paired difference in pass@1 (points): mean ± 95% CI; grey: seeds")
    return fig


def _plot_seeds(plt, data: dict):
    s = scores(data)
    methods = [m for m in data["methods"] if m in s]
    if not methods:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, m in enumerate(methods):
        vals = [100 * v for v in s[m].values()]
        ax.scatter([i] * len(vals), vals, s=12, color="C0")
        ax.hlines(sum(vals) / len(vals), i - 0.3, i + 0.3, color="C1")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([label(m) for m in methods], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"pass@1 on {data.get('benchmark')} (%)")
    return fig


def _plot_loss(plt, data: dict):
    curves = [(m, [(e["seed"], e["results"][m]) for e in data["seeds"] if m in e["results"]
                   and (e["results"][m].get("diagnostics") or {}).get("loss_curve")]) for m in data["methods"]]
    curves = [(m, rows) for m, rows in curves if rows]
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3), sharey=True, squeeze=False)
    for ax, (m, rows) in zip(axes[0], curves):
        worst = min(res["pass@1"] for _, res in rows)
        for seed, res in rows:
            steps, losses = zip(*res["diagnostics"]["loss_curve"])
            ax.plot(steps, losses, lw=0.8, color="C3" if res["pass@1"] == worst else "0.6")
        ax.set_yscale("log")
        ax.set_title(label(m), fontsize=8)
        ax.set_xlabel("step", fontsize=8)
    axes[0][0].set_ylabel("training loss (red: the seed with the lowest pass@1)", fontsize=7)
    return fig


def _plot_gap(plt, data: dict):
    gaps = [p for p in merge_gap_points(data) if p["loss_gap"] is not None]
    if not gaps:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, m in enumerate(dict.fromkeys(p["method"] for p in gaps)):
        rows = [p for p in gaps if p["method"] == m]
        for ax, key in zip(axes, ("loss_gap", "pass_gap")):
            ax.scatter([p["drift"] for p in rows], [p[key] * (100 if key == "pass_gap" else 1) for p in rows],
                       s=14, color=f"C{i % 10}", label=label(m))
    axes[0].set_ylabel("held-out loss, merged − MoE (nats)")
    axes[1].set_ylabel("pass@1, MoE − merged (points)")
    for ax in axes:
        ax.set_xlabel("expert drift before merging (mean over layers)")
        ax.axhline(0, color="k", lw=0.6)
    axes[1].legend(fontsize=6, loc="best")
    return fig


def replace_block(text: str, block: str, where: str) -> str:
    """`text` with the lines between its study markers replaced by `block` (UserError without markers)."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise UserError(f"{where} has no '{BEGIN}' ... '{END}' block to fill")
    return pattern.sub(lambda _: f"{BEGIN}\n{block.strip()}\n{END}", text, count=1)


def study_report(path: str, markdown: str | None = None) -> tuple[str, str]:
    """Write study.md and its PNGs beside `path` (a study.json); returns (study.md path, its text).

    `markdown`: also replace the study block of that file with the same tables
    (plots linked relative to it).
    """
    data = load_study(path)
    out_dir = os.path.dirname(os.path.abspath(path))
    plots = _plot(data, out_dir)
    text = render(data, {k: os.path.basename(v) for k, v in plots.items()})
    report = os.path.join(out_dir, "study.md")
    atomic_write_text(report, "# The study, as measured\n\n" + text)
    if markdown:
        try:
            with open(markdown) as f:
                doc = f.read()
        except OSError as e:
            raise UserError(f"{markdown}: cannot read ({e.strerror})") from None
        rel = {k: os.path.relpath(v, os.path.dirname(os.path.abspath(markdown))) for k, v in plots.items()}
        atomic_write_text(markdown, replace_block(doc, render(data, rel), markdown))
    return report, text
