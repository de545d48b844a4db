"""The beyond-the-paper methods in `xft run`: each one's stage computes what its registry entry promises."""

from __future__ import annotations

import json

import pytest
import torch

import xft
from xft.pipeline import load_recipe, run_pipeline
from xft.pipeline.stages import merge_config

from conftest import tiny_minicode_base
from test_pipeline import tiny_overrides


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return tiny_minicode_base(tmp_path_factory.mktemp("base"), 32)


def test_variant_sections_and_merges_build_the_configs_they_name(tiny_base, tmp_path):
    from xft.pipeline.methods import METHODS
    from xft.pipeline.stages import Context

    recipe = load_recipe("minicode", tiny_overrides(tiny_base, "merge.lr=0.5", "distill.distill_steps=3",
                                                    "moe_drop.lr=0.25"))
    ctx = Context(recipe=recipe, root=str(tmp_path))
    distill = merge_config(ctx, str(tmp_path / "d"), METHODS["xft_distill"])
    assert (distill.method, distill.lr, distill.distill_steps) == ("learned", 0.5, 3)  # distill inherits merge
    assert distill.moe.endswith("moe")
    drop = merge_config(ctx, str(tmp_path / "x"), METHODS["xft_drop"])
    assert drop.moe.endswith("moe_drop") and drop.lr == 0.5
    ties = merge_config(ctx, str(tmp_path / "t"), METHODS["xft_ties"])
    assert ties.method == "ties" and ties.data is None  # a fixed merge reads no data
    # a section set in part keeps its other defaults: tuning distill.distill_lr still distils 100 steps
    partial = load_recipe("minicode", tiny_overrides(tiny_base, "distill.distill_lr=0.001", "ewa.lr=0.1"))
    assert partial.distill == {"distill_steps": 100, "distill_lr": 0.001}
    assert partial.ewa == {"share_rate": 0.3, "lr": 0.1}
    distill = merge_config(Context(recipe=partial, root=str(tmp_path)), str(tmp_path / "d"), METHODS["xft_distill"])
    assert (distill.distill_steps, distill.distill_lr) == (100, 0.001)


@pytest.mark.slow
def test_variant_moe_and_its_merges_run_end_to_end(tiny_base, tmp_path):
    """moe_drop upcycles with init=drop; xft_drop merges that MoE; ties / task arithmetic merge XFT's MoE
    exactly as xft.merge does; xft_distill distils it: each output is a dense model of the base class."""
    methods = "methods=[moe_drop, xft_drop, xft_ties, xft_task_arithmetic, xft_distill]"
    run = tmp_path / "run"
    run_pipeline(load_recipe("minicode", tiny_overrides(tiny_base, methods, "distill.distill_steps=2")),
                 str(run), progress=False)
    upcycled = json.loads((run / "upcycle-moe_drop" / "config.json").read_text())
    assert json.dumps(upcycled).count('"drop"') >= 1
    base_class = type(xft.load(str(tiny_base / "model")))
    moe = xft.load(str(run / "moe"))
    for method in ("xft_drop", "xft_ties", "xft_task_arithmetic", "xft_distill"):
        model = xft.load(str(run / method))
        assert type(model) is base_class and not xft.is_moe(model), method
        assert (run / "eval" / method / "minicode" / "results.json").is_file()
    # the distilled merge's compute: its MoE's, the learned merge's steps, and the distillation's (student 6·N
    # and teacher forward 2·N_active per token)
    from xft.pipeline import report

    rows = {r.method: r for r in report.collect([str(run)], "minicode")}
    params, active = rows["xft_distill"].params, rows["moe_drop"].active_params
    distilled = report.training_tokens(str(run / "xft_distill"), "distillation")
    merged = report.training_tokens(str(run / "xft_distill"))
    assert distilled > 0 and merged > 0
    moe_flops = 6.0 * report.parameter_counts(str(run / "moe"))[1] * report.training_tokens(str(run / "moe"))
    assert rows["xft_distill"].flops == pytest.approx(moe_flops + 6.0 * params * merged
                                                      + (6.0 * params + 2.0 * active) * distilled)
    expected = xft.merge(moe, "ties").state_dict()
    got = xft.load(str(run / "xft_ties")).state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_new_method_is_one_row_of_the_method_table(tmp_path):
    # A fresh process adds one row (a merge with its own section and an option grid) as if it stood in the table
    # (SECTION_OWNERS is derived from the table at import; the recipe module is re-read after the row is in):
    # the recipe section, its defaults, the study grid, the stages and the report label all follow.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import importlib, json
        from xft.pipeline import methods, recipe
        row = methods.Method("xft_half", "a half-way merge", "half merge", "**half merge**: ...", stage="half merge",
                             merge="task_arithmetic", section="half", defaults=(("merge_scale", 0.5),),
                             tune="merge_scale", grid="half_scale", grid_values=(0.25, 0.5))
        methods.METHODS[row.name] = row
        methods.SECTION_OWNERS[row.section] = row
        importlib.reload(recipe)
        from xft.pipeline.recipe import LAYERS, Recipe, load_recipe
        from xft.pipeline.report import label
        from xft.pipeline.stages import plan
        from xft.study.design import Study
        recipe = load_recipe("minicode", ["methods=[xft_half]", "half.merge_density=0.3"])
        study = Study("minicode", recipe, "out")
        print(json.dumps({"inherits": LAYERS["half"].inherits, "section": recipe.half,
                          "grid": study.grid("xft_half"), "tuned": study.tuned_merges,
                          "stages": [s.name for s in plan(recipe)], "label": label("xft_half")}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["inherits"] == "merge" and got["section"] == {"merge_scale": 0.5, "merge_density": 0.3}
    assert got["grid"] == [0.25, 0.5] and got["tuned"] == ["xft_half"] and got["label"] == "half merge"
    assert got["stages"][-2:] == ["xft_half", "eval/xft_half"] and "moe" in got["stages"]
