"""`xft demo --study`: tuning on validation only, paired seeds, study.json, re-running one (method, seed)."""

from __future__ import annotations

import json
import math
import os
import shlex

import pytest

from xft.errors import UserError
from xft.pipeline.recipe import load_recipe
from xft.stats import t_quantile
from xft.study.design import STUDY_RECIPE, Study, choose, extend_grid, run_study
from xft.study.report import BEGIN, END, claims, load_study, replace_block, scores, study_report, task_noise
from conftest import tiny_minicode_base

from test_pipeline import tiny_overrides


def test_choose_takes_the_best_and_breaks_ties_low():
    assert choose({1e-3: 0.2, 3e-3: 0.5, 6e-3: 0.4}) == 3e-3
    assert choose({1e-3: 0.5, 3e-3: 0.5, 6e-3: 0.4}) == 1e-3
    assert choose({6e-3: 0.5, 1e-3: 0.5}) == 1e-3


def test_the_grid_grows_where_a_choice_sits_on_its_end():
    grid = [1.5e-3, 3e-3, 6e-3]
    middle, low, high = {1.5e-3: 0.1, 3e-3: 0.3, 6e-3: 0.2}, {1.5e-3: 0.3, 3e-3: 0.2, 6e-3: 0.0}, {6e-3: 0.5}
    assert extend_grid(grid, [middle, middle]) == grid
    assert extend_grid(grid, [low, middle]) == [7.5e-4, *grid]
    assert extend_grid(grid, [{**low, **high}, low]) == [7.5e-4, *grid, 1.2e-2]
    flat = {lr: 0.31 for lr in grid}  # a tie everywhere chooses the lowest rate but is no reason to look further
    assert choose(flat) == 1.5e-3 and extend_grid(grid, [flat]) == grid


def test_a_grid_never_grows_past_its_settings_largest_value():
    grid, best_high = [0.1, 0.2, 0.4], {0.1: 0.1, 0.2: 0.2, 0.4: 0.3}
    assert extend_grid(grid, [best_high]) == [0.1, 0.2, 0.4, 0.8]
    assert extend_grid(grid, [best_high], upper=1.0) == [0.1, 0.2, 0.4, 0.8]
    assert extend_grid([0.2, 0.4, 0.8], [{0.2: 0.1, 0.4: 0.2, 0.8: 0.3}], upper=1.0) == [0.2, 0.4, 0.8]


def test_merges_with_an_option_are_tuned_through_their_own_section():
    """TIES's density and task arithmetic's scale are chosen on validation like a learning rate; the choice lands
    in the method's own section, which the merge stage reads."""
    from xft.pipeline.methods import METHODS
    from xft.pipeline.stages import Context, merge_config

    methods = "methods=[moe, xft, xft_ties, xft_task_arithmetic, xft_init]"
    recipe = load_recipe(STUDY_RECIPE, [methods])
    study = Study(STUDY_RECIPE, recipe, "/s", [methods])
    assert study.tuned_merges == ["xft", "xft_task_arithmetic", "xft_ties"]  # table order; init has nothing to tune
    assert study.grid("xft_ties") == sorted(recipe.study.ties_density)
    assert study.grid("xft_task_arithmetic") == sorted(recipe.study.task_arithmetic_scale)
    run = study.merge_tune_run("xft_ties", 7.5e-4, 0.4, {"xft": 5e-3})
    assert run.out == "/s/tune/xft_ties/moe-lr-0.00075/merge_density-0.4"
    tuned = load_recipe(STUDY_RECIPE, run.overrides)
    assert tuned.methods == ["xft_ties"] and tuned.moe["lr"] == 7.5e-4 and tuned.ties["merge_density"] == 0.4
    seed = load_recipe(STUDY_RECIPE, study.seed_run(1, {"xft_ties": 0.4, "xft_task_arithmetic": 0.2}).overrides)
    ctx = Context(recipe=seed, root="/s/seed-1")
    ties = merge_config(ctx, "/s/seed-1/xft_ties", METHODS["xft_ties"])
    arithmetic = merge_config(ctx, "/s/seed-1/xft_task_arithmetic", METHODS["xft_task_arithmetic"])
    assert (ties.method, ties.merge_density, ties.merge_scale) == ("ties", 0.4, None)
    assert (arithmetic.method, arithmetic.merge_scale, arithmetic.merge_density) == ("task_arithmetic", 0.2, None)
    with pytest.raises(UserError, match="study.ties_density"):
        load_recipe(STUDY_RECIPE, ["study.ties_density=[0, 0.5]"])


def test_a_method_added_to_a_run_brings_its_own_settings():
    """A setting read only by methods without work in the run is no reason to refuse it; one a finished stage
    read is (and so is any setting every stage reads)."""
    from xft.pipeline.recipe import to_dict
    from xft.pipeline.runner import recipe_differences

    saved = to_dict(load_recipe(STUDY_RECIPE, ["methods=[moe, xft]"]))
    added = load_recipe(STUDY_RECIPE, ["methods=[moe, xft, xft_ties]", "ties.merge_density=0.4"])
    assert recipe_differences(saved, added, work=["base", "data", "upcycle", "moe", "xft"]) == ([], [])
    assert recipe_differences(saved, added)[0] == ["ties.merge_density: None -> 0.4"]  # no run to look at
    # merge.lr is read by xft (finished) and inherited by ties: a difference
    changed = load_recipe(STUDY_RECIPE, ["methods=[moe, xft, xft_ties]", "merge.lr=0.1"])
    assert recipe_differences(saved, changed, work=["moe", "xft"])[0] == ["merge.lr: 0.02 -> 0.1"]
    assert recipe_differences(saved, changed, work=["moe"])[0] == []  # ... unless nothing that reads it ran
    upcycled = load_recipe(STUDY_RECIPE, ["methods=[moe, xft]", "upcycle.top_k=3"])
    assert recipe_differences(saved, upcycled, work=["base"])[0] == ["upcycle.top_k: 6 -> 3"]


def test_every_run_of_the_study_is_the_recipe_with_overrides():
    recipe = load_recipe(STUDY_RECIPE)
    study = Study(STUDY_RECIPE, recipe, "/s")
    assert study.tuned_methods == ["sft", "moe", "ewa", "sparse", "unnormalized"]
    # each method is tuned through its own section, at the tuning seed, on validation only
    for method, section in [("sft", "dense"), ("moe", "moe"), ("ewa", "ewa"), ("sparse", "sparse")]:
        run = study.tune_run(method, 3e-3)
        tuned = load_recipe(STUDY_RECIPE, run.overrides)
        assert tuned.seed == recipe.study.tune_seed not in range(recipe.study.seeds)
        assert tuned.eval.benchmarks == [recipe.study.select] and tuned.methods == [method]
        assert getattr(tuned, section)["lr"] == 3e-3
    seed = load_recipe(STUDY_RECIPE, study.seed_run(3, {"sft": 1e-3, "moe": 6e-3, "xft": 0.08}).overrides)
    assert (seed.seed, seed.dense["lr"], seed.moe["lr"], seed.merge["lr"]) == (3, 1e-3, 6e-3, 0.08)
    assert seed.train["lr"] == recipe.train["lr"] and seed.eval.benchmarks == recipe.eval.benchmarks
    assert "base" not in seed.methods and "base" in load_recipe(STUDY_RECIPE, study.seed_run(0, {}).overrides).methods


def test_the_study_never_chooses_on_eval(tmp_path):
    with pytest.raises(UserError, match="study.select"):
        run_study(STUDY_RECIPE, str(tmp_path / "s"), ["study.select=minicode"])
    with pytest.raises(UserError, match="study.lr"):
        load_recipe(STUDY_RECIPE, ["study.lr=[]"])


def _fake_study(diffs: dict[str, list[float]]) -> dict:
    """A study.json of 3 methods whose per-seed pass@1 differ by `diffs` (xft - moe, moe - sft)."""
    n = len(diffs["xft"])
    seeds = []
    for i in range(n):
        sft = 0.3 + 0.01 * i
        moe = sft + diffs["moe"][i]
        seeds.append({"seed": i, "run": f"seed-{i}", "command": "xft run ...", "results": {
            "sft": {"pass@1": sft}, "moe": {"pass@1": moe}, "xft": {"pass@1": moe + diffs["xft"][i]}}})
    return {"schema": 1, "benchmark": "minicode", "methods": {m: {} for m in ("sft", "moe", "xft")},
            "tuning": {"sft": {"grid": {"0.001": {"valid_pass@1": 0.1}, "0.003": {"valid_pass@1": 0.2}},
                               "chosen": 0.003}},
            "seeds": seeds, "provenance": {"wall_seconds": 60, "jobs": 2}, "protocol": {"tune_seed": 100}}


def test_the_report_recomputes_every_claim_from_the_per_seed_numbers(tmp_path):
    data = _fake_study({"xft": [0.02, 0.03, 0.01, 0.02], "moe": [-0.1, 0.2, -0.05, 0.0]})
    path = tmp_path / "study.json"
    path.write_text(json.dumps(data))
    s = scores(load_study(str(path)))
    found = {(a, b): p for a, b, _, p in claims(data)}
    for (a, b), p in found.items():
        per_seed = [s[a][i] - s[b][i] for i in range(4)]
        assert p.mean == pytest.approx(sum(per_seed) / 4)
    assert found[("xft", "moe")].verdict == "holds"  # +1 to +3 points in every seed
    assert found[("moe", "sft")].verdict == "unresolved"
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\n\nprose before\n\n{BEGIN}\nold tables\n{END}\n\nprose after\n")
    report, text = study_report(str(path), markdown=str(doc))
    body = doc.read_text()
    assert "old tables" not in body and "prose before" in body and "prose after" in body
    assert text.strip() in body and os.path.isfile(report) and (tmp_path / "study_claims.png").is_file()
    with pytest.raises(UserError, match="no '<!-- study:begin -->'"):
        replace_block("no markers here", "x", "README.md")


def _study_with_merge_gaps(n: int = 6) -> dict:
    """A study.json of XFT and the Drop-Upcycling variant, each merge with gap diagnostics that grow with drift."""
    import random

    rng = random.Random(0)
    seeds = []
    for i in range(n):
        results = {}
        for moe, merged in (("moe", "xft"), ("moe_drop", "xft_drop")):
            drift = 0.01 * (i + 1) * (3 if moe == "moe_drop" else 1)
            p_moe = 0.25 + rng.uniform(-0.02, 0.02)
            results[moe] = {"pass@1": p_moe, "train_seconds": 120.0 + i}
            results[merged] = {"pass@1": p_moe - drift + rng.uniform(-0.005, 0.005), "train_seconds": 10.0,
                               "merge_gap": {"mean_expert_drift": drift, "mean_routing_spread": 0.1 + rng.random(),
                                             "loss_gap": 2 * drift + rng.uniform(-0.001, 0.001)}}
        seeds.append({"seed": i, "run": f"seed-{i}", "command": "xft run ...", "results": results})
    methods = {"moe": {"section": "moe", "compute_chain": ["moe"], "merge_of": None},
               "xft": {"section": "merge", "compute_chain": ["moe", "xft"], "merge_of": "moe"},
               "moe_drop": {"section": "moe_drop", "compute_chain": ["moe_drop"], "merge_of": None},
               "xft_drop": {"section": "merge", "compute_chain": ["moe_drop", "xft_drop"], "merge_of": "moe_drop"}}
    return {"schema": 1, "benchmark": "minicode", "methods": methods,
            "tuning": {"xft_ties": {"setting": "ties.merge_density", "grid": {"0.1": {"valid_pass@1": 0.2},
                                                                           "0.2": {"valid_pass@1": 0.3}},
                                    "chosen": 0.2}},
            "seeds": seeds, "provenance": {"wall_seconds": 60, "jobs": 2}, "protocol": {"tune_seed": 100}}


def test_the_merge_gap_and_the_variants_are_reported_from_the_file(tmp_path):
    import statistics

    from xft.stats import correlation_ci
    from xft.study.report import merge_gap_points, render, wall_minutes

    data = _study_with_merge_gaps()
    points = merge_gap_points(data)
    assert len(points) == 12
    for p in points:
        res = next(e["results"] for e in data["seeds"] if e["seed"] == p["seed"])
        source = "moe" if p["method"] == "xft" else "moe_drop"
        assert p["pass_gap"] == res[source]["pass@1"] - res[p["method"]]["pass@1"]
    x, y = [p["drift"] for p in points], [p["loss_gap"] for p in points]
    r, lo, hi = correlation_ci(x, y)
    assert r == pytest.approx(statistics.correlation(x, y))
    half = statistics.NormalDist().inv_cdf(0.975) / (len(x) - 3) ** 0.5
    assert (lo, hi) == pytest.approx((math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)))
    assert lo < r < hi
    # within groups: the correlation of the residuals from each group's means, 1 degree of freedom fewer per mean
    groups = [p["method"] for p in points]
    resid = {k: [v - statistics.mean(w for w, g in zip(vals, groups) if g == h) for v, h in zip(vals, groups)]
             for k, vals in (("x", x), ("y", y))}
    rw, lw, hw = correlation_ci(x, y, groups=groups)
    assert rw == pytest.approx(statistics.correlation(resid["x"], resid["y"]))
    half_w = statistics.NormalDist().inv_cdf(0.975) / (len(x) - 4) ** 0.5
    assert (lw, hw) == pytest.approx((math.tanh(math.atanh(rw) - half_w), math.tanh(math.atanh(rw) + half_w)))
    # the merge's wall time carries its MoE's: seeds' (120 + i + 10) s
    assert wall_minutes(data, "xft") == pytest.approx(sum(130 + i for i in range(6)) / 6 / 60)
    text = render(data)
    assert "XFT of the Drop-Upcycling MoE (r = 0.5) − XFT learned merge" in text  # the variant beside XFT
    assert "merge_density 0.1" in text  # the tuned option is named in its grid
    gap_rows = [line for line in text.splitlines() if line.startswith("| expert drift | held-out loss gap")]
    assert len(gap_rows) == 1 and f"{r:+.2f}" in gap_rows[0] and f"{rw:+.2f}" in gap_rows[0]
    path = tmp_path / "study.json"
    path.write_text(json.dumps(data))
    study_report(str(path))
    assert (tmp_path / "study_merge_gap.png").is_file()


def test_task_sampling_error_is_the_standard_error_over_tasks_of_the_seed_mean_difference():
    data = _fake_study({"xft": [0.0, 0.0], "moe": [0.0, 0.0]})
    for entry, (a, b) in zip(data["seeds"], [("1100", "0100"), ("1010", "0000")]):
        entry["results"]["xft"]["verdicts"], entry["results"]["moe"]["verdicts"] = a, b
    # per task, mean over the 2 seeds of (xft - moe): [1, 0, 0.5, 0]
    per_task = [1.0, 0.0, 0.5, 0.0]
    mean = sum(per_task) / 4
    sd = (sum((d - mean) ** 2 for d in per_task) / 3) ** 0.5
    # Student's t over the 4 tasks (3 df), the one rule of every interval xft prints
    assert task_noise(data, "xft", "moe") == pytest.approx(t_quantile(0.975, 3) * sd / 2)
    assert task_noise(data, "xft", "sft") is None  # sft has no verdicts in this study


def test_xft_report_study_cli(tmp_path, capsys):
    from xft.cli import main

    path = tmp_path / "study.json"
    path.write_text(json.dumps(_fake_study({"xft": [0.02, 0.03, 0.01], "moe": [0.1, 0.2, 0.0]})))
    assert main(["report", "--study", str(path)]) == 0
    assert "XFT ≥ MoE" in capsys.readouterr().out and (tmp_path / "study.md").is_file()
    assert main(["report", str(tmp_path), "--study", str(path)]) == 2
    assert "not both" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main(["report", "--study", str(tmp_path / "bad.json")]) == 2
    assert "bad.json: not a study.json" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tiny_study_end_to_end_and_one_run_reproduced(tmp_path):
    """Tune two methods and the merge on validation, run 2 seeds, then re-run one (method, seed) alone by the
    command study.json records: the same pass@1, task by task."""
    from xft.cli import main

    (tmp_path / "base").mkdir()
    base = tiny_minicode_base(tmp_path / "base", 32)
    user = tiny_overrides(base, "methods=[sft, moe, xft_init, xft]", "study.seeds=2", "study.lr=[0.001, 0.01]",
                          "study.merge_lr=[0.01, 0.1]")
    out = tmp_path / "study"
    lines: list[str] = []
    data = run_study(STUDY_RECIPE, str(out), user, jobs=2, log=lines.append)
    assert set(data["tuning"]) == {"sft", "moe", "xft"}
    for method, t in data["tuning"].items():
        grid = {float(lr): v["valid_pass@1"] for lr, v in t["grid"].items()}
        assert t["chosen"] == choose(grid)
        for lr in grid:  # tuning runs were scored on validation and never on the eval split
            where = out / "tune" / method
            if method == "xft":  # merge-tuning runs merge the MoE trained at its chosen rate
                where = where / f"moe-lr-{data['tuning']['moe']['chosen']:g}"
            evaluated = os.listdir(where / f"lr-{lr:g}" / "eval" / method)
            assert evaluated == ["minicode-valid"]
    assert [e["seed"] for e in data["seeds"]] == [0, 1]
    assert set(data["seeds"][1]["results"]) == {"sft", "moe", "xft_init", "xft"}
    assert data["seeds"][0]["results"]["moe"]["diagnostics"]["final_loss"] > 0
    assert json.loads((out / "study.json").read_text()) == data

    entry = data["seeds"][1]
    words = shlex.split(entry["command"])
    words[words.index("--out") + 1] = str(tmp_path / "again")
    assert main(words[1:] + ["--set", "methods=[xft]", "--no-progress", "--no-report"]) == 0  # the last --set wins
    assert sorted(os.listdir(tmp_path / "again" / "eval")) == ["xft"]
    again = json.loads((tmp_path / "again" / "eval" / "xft" / "minicode" / "results.json").read_text())
    assert again["pass@1"] == entry["results"]["xft"]["pass@1"]
    samples = [(out / "seed-1" / "eval" / "xft" / "minicode" / "samples.jsonl").read_text(),
               (tmp_path / "again" / "eval" / "xft" / "minicode" / "samples.jsonl").read_text()]
    assert samples[0] == samples[1]  # the same model: the same greedy completions, token for token

    # a re-run of the whole study computes nothing and writes the same results
    again_data = run_study(STUDY_RECIPE, str(out), user, jobs=2, log=lines.append)
    assert again_data["seeds"] == data["seeds"] and again_data["tuning"] == data["tuning"]
    gap = data["seeds"][0]["results"]["xft"]["merge_gap"]  # measured on validation for every merge
    assert gap["loss_gap"] is not None and gap["mean_expert_drift"] > 0 and gap["held_out_examples"] > 0

    # A merge with a tuned option, added to the finished study: its tuning and its stage in each seed run;
    # everything else is kept as it was.
    more = [*user, "methods=[sft, moe, xft_init, xft, xft_ties]", "study.ties_density=[0.2, 0.5]"]
    added = run_study(STUDY_RECIPE, str(out), more, jobs=2, log=lines.append)
    assert added["tuning"]["xft_ties"]["chosen"] in (0.2, 0.5)
    assert added["tuning"]["xft_ties"]["setting"] == "ties.merge_density"
    for old, new in zip(data["seeds"], added["seeds"]):
        assert "xft_ties" in new["results"] and "merge_gap" in new["results"]["xft_ties"]
        for method, res in old["results"].items():
            assert new["results"][method]["verdicts"] == res["verdicts"], method
