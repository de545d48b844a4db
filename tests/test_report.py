"""`xft report DIR` and the report of `xft run` / `xft demo`: what it must say, on tiny runs and fake results."""

import json
import os
import re

import pytest

from xft.pipeline import report
from xft.cli import main as cli
from xft.pipeline import load_recipe, run_pipeline
from conftest import tiny_minicode_base


def tiny_overrides(base, *extra):
    return [f"model={base / 'model'}", f"data.path={base / 'train.jsonl'}", "train.max_steps=2",
            "train.batch_size=4", "train.micro_batch_size=4", "train.logging_steps=1", "train.save_steps=1",
            "train.max_length=128", "merge.max_steps=2", "merge.warmup_steps=0", "upcycle.num_experts=4",
            "upcycle.top_k=3", "eval.limit=3", "eval.max_new_tokens=8", "eval.workers=2", *extra]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished one-seed run of the MoE and its learned merge (so every plot has data)."""
    root = tmp_path_factory.mktemp("report")
    base = tiny_minicode_base(root, 32)
    recipe = load_recipe("minicode", tiny_overrides(base, "methods=[moe, xft]"))
    run_pipeline(recipe, str(root / "run"), progress=False, command="xft run minicode --out run")
    return root, recipe


def test_report_of_a_finished_run_explains_itself(tiny_run, capsys):
    root, _ = tiny_run
    run = root / "run"
    assert cli(["report", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "| model | minicode (3 tasks) |" in printed and "| XFT learned merge |" in printed
    text = (run / "report.md").read_text()
    assert "**One seed cannot order these models.**" in text
    assert "Command: `xft run minicode --out run`" in text
    for term in ("**MoE (unmerged)**", "**XFT learned merge**", "**λ (shared expert weight)**", "**pass@1**"):
        assert term in text.split("## Glossary")[1], term
    for i, caption in enumerate(("pass@1 by model on minicode", "Expert load during MoE SFT",
                                 "Learned merge coefficients"), 1):
        assert f"**Figure {i}. {caption}" in text  # a caption paragraph, not only alt text
    for png in ("pass_at_1.png", "expert_load.png", "merge_coefficients.png"):
        assert f"](plots/{png})" in text and (run / "plots" / png).stat().st_size > 1000
    links = re.findall(r"\]\(([^)]+\.md)\)", text)
    assert any(link.endswith("docs/results.md") for link in links) and any(link.endswith("README.md")
                                                                           for link in links)
    assert all(os.path.isfile(run / link) for link in links), links  # relative to the report, and there
    # the merge gap: the merged model's drift as its merge_gap.json says, the pass@1 it lost as evaluated
    gap = json.loads((run / "xft" / "merge_gap.json").read_text())
    lost = 100 * (report.eval_results(str(run), "moe", "minicode")["pass@1"]
                  - report.eval_results(str(run), "xft", "minicode")["pass@1"])
    row = next(line for line in text.splitlines() if line.startswith("| XFT learned merge | MoE (unmerged) |"))
    assert f"| {gap['mean_expert_drift']:.4f} |" in row and row.endswith(f"| {lost:+.1f} |")


def test_rerun_that_skips_everything_keeps_the_reported_wall_time(tiny_run):
    root, recipe = tiny_run
    run = root / "run"

    def header():
        report.build_report(str(run))
        return next(line for line in (run / "report.md").read_text().splitlines() if "Wall time" in line)

    before = header()
    lines = []
    run_pipeline(recipe, str(run), progress=False, log=lines.append, command="xft run again")
    assert lines and all("skipped" in line for line in lines)
    assert header() == before and "Command: `xft run minicode --out run`" in (run / "report.md").read_text()
    assert len(json.loads((run / "sessions.json").read_text())) == 1  # the skipping re-run is not a session
    # the kernels' instruction set is part of the record: bit-identical results hold only between equal ones
    import torch

    kernels = torch.backends.cpu.get_cpu_capability()
    assert f"CPU kernels {kernels}, device cpu." in (run / "report.md").read_text()


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "seed-0").mkdir()
    assert cli(["report", str(tmp_path)]) == 2
    assert f"{tmp_path} is not a run directory of xft run or xft demo" in capsys.readouterr().err
    assert cli(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _fake_seeds(root, scores: dict[str, list[float]], tasks: dict[str, int]):
    """Run directories seed-N with a recipe and results.json files only (no models)."""
    for seed in range(len(next(iter(scores.values())))):
        run = root / f"seed-{seed}"
        run.mkdir(parents=True)
        (run / "recipe.yaml").write_text(f"eval:\n  benchmarks: [{', '.join(tasks)}]\nmerge:\n  shared_weight: 0.7\n")
        for method, s in scores.items():
            for bench, n in tasks.items():
                (run / "eval" / method / bench).mkdir(parents=True)
                (run / "eval" / method / bench / "results.json").write_text(
                    json.dumps({"pass@1": s[seed], "n_tasks": n}))


def test_several_seeds_table_per_benchmark_claims_and_glossary(tmp_path, capsys):
    scores = {"sft": [0.3, 0.4], "moe": [0.35, 0.45], "ewa": [0.3, 0.3], "xft_init": [0.3, 0.4],
              "xft_uniform": [0.2, 0.3], "xft": [0.36, 0.44]}
    _fake_seeds(tmp_path, scores, {"minicode": 4, "humaneval": 3})
    assert cli(["report", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "mean ± 95% CI over 2 seeds" in printed
    assert "| model | minicode (4 tasks) | humaneval (3 tasks) |" in printed
    text = (tmp_path / "report.md").read_text()
    assert "**2 seeds.**" in text and "One seed cannot" not in text
    assert "| XFT ≥ MoE (merging keeps the MoE's gains) |" in text
    glossary = text.split("## Glossary")[1]
    for term in ("**EWA**", "**XFT init merge**", "**uniform merge**", "**XFT learned merge**",
                 "merge.shared_weight, 0.7 here", "**paired difference**"):
        assert term in glossary, term
