"""`xft.pipeline`: recipe validation and overrides, the stage plan, skipping, atomic stages, resume; the report."""

import json
import os

import pytest

from xft.errors import UserError
from xft.pipeline import load_recipe, plan, run_pipeline
from xft.pipeline import stages as stages_mod
from xft.pipeline.methods import METHODS
from xft.pipeline.recipe import apply_overrides, parse_override
from conftest import tiny_minicode_base


# ---------------------------------------------------------------- recipes and overrides

@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=2", "unknown recipe key train.max_stepz (did you mean 'max_steps'?)"),
    ("bogus=1", "unknown recipe key bogus"),
    ("eval.limt=3", "unknown recipe key eval.limt"),
    ("train.lr=abc", "train.lr: expected float, got 'abc'"),
    ("seed=1.5", "seed: expected int"),
    ("upcycle.routing=sparse", "upcycle.routing cannot be set"),
    ("train.model=/x", "train.model cannot be set"),
    ("upcycle.num_expert=4", "did you mean 'num_experts'"),
    ("methods=[moe, bogus]", "unknown method 'bogus'"),
    ("ewa.share_rate=0", "ewa.share_rate"),
    ("data.path=/does/not/exist.jsonl", "data.path: /does/not/exist.jsonl does not exist"),
    ("base.budget=huge", "base.budget: unknown budget 'huge'"),
    ("train=3", "train: expected dict"),
    ("max_steps", "expected KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError, match=None) as err:
        load_recipe("minicode", [override])
    assert message in str(err.value), str(err.value)


def test_overrides_are_yaml_typed_and_nested():
    recipe = load_recipe("minicode", ["train.max_steps=2", "train.lr=3e-4", "methods=[sft, xft]",
                                      "eval.limit=5", "model=/some/model", "eval.data.mbpp+=/x.jsonl"])
    assert recipe.train["max_steps"] == 2 and recipe.train["lr"] == 3e-4
    assert recipe.methods == ["sft", "xft"] and recipe.eval.limit == 5 and recipe.model == "/some/model"
    assert recipe.eval.data == {"mbpp+": "/x.jsonl"}
    assert parse_override("a.b-c=x=y") == (["a", "b_c"], "x=y")
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}


def test_paper_recipe_needs_data_and_has_the_papers_settings(tmp_path):
    with pytest.raises(UserError, match="data.path"):
        load_recipe("deepseek-coder-1.3b")
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n')
    r = load_recipe("deepseek-coder-1.3b", [f"data={data}"])  # short for data.path=
    assert r.data.path == str(data)
    assert r.upcycle["num_experts"] == 8 and r.upcycle["top_k"] == 6 and r.merge["shared_weight"] == 0.75
    assert (r.train["lr"], r.train["epochs"], r.train["warmup_steps"], r.train["batch_size"]) == (5e-5, 4, 500, 64)
    assert (r.train["optimizer"], r.train["max_length"], r.train["lr_scheduler"]) == ("adafactor", 1024, "linear")
    assert (r.dense["epochs"], r.dense["warmup_steps"]) == (5, 625)
    assert (r.merge["lr"], r.merge["epochs"], r.merge["warmup_steps"]) == (1e-5, 1, 125)
    assert set(r.eval.benchmarks) == {"humaneval", "humaneval+", "mbpp", "mbpp+"}


def test_recipe_headers_show_the_command():
    for name in ("minicode", "deepseek-coder-1.3b"):
        text = (stages_mod.__file__.rsplit("/pipeline/", 1)[0] + f"/recipes/{name}.yaml")
        head = open(text).read().split("\n\n")[0]
        assert head.startswith("#") and f"run {name}" in head


def test_plan_orders_dependencies_and_runs_only_what_methods_need():
    names = [s.name for s in plan(load_recipe("minicode", ["methods=[xft]"]))]
    assert names == ["base", "upcycle", "data", "moe", "xft", "eval/xft"]
    names = [s.name for s in plan(load_recipe("minicode", ["methods=[sparse, sft]", "model=/m"]))]
    assert names == ["upcycle-sparse", "data", "sparse", "sft", "eval/sparse", "eval/sft"]
    upcycled = [m.name for m in METHODS.values() if m.upcycle_stage]
    full = [s.name for s in plan(load_recipe("minicode", ["methods=[" + ",".join(upcycled) + "]"]))]
    assert {"upcycle", "upcycle-sparse", "upcycle-unnormalized"} <= set(full)


def test_every_method_has_one_stage_and_the_report_names_it():
    """The method table decides the stages and the report's names; CLAIMS compare methods of the table."""
    from xft.pipeline import report
    from xft.pipeline.methods import check_pairs

    every = stages_mod.all_stages(load_recipe("minicode", ["methods=[" + ",".join(METHODS) + "]"]))
    for m in METHODS.values():
        assert (m.name in every and every[m.name].training) == (m.kind != "base"), m.name
        assert f"eval/{m.name}" in every and report.label(m.name) == m.label
        assert all(stage in every for stage in m.compute_chain if stage != "base")
    assert every["ewa"].deps == ("upcycle", "data") and every["xft_init"].deps == ("moe",)
    assert every["sft"].description == "dense SFT baseline"
    assert [m.name for m in METHODS.values() if m.is_moe][:3] == ["moe", "sparse", "unnormalized"]
    # a variant MoE has its own upcycle stage; its merge merges it, not XFT's MoE
    assert every["moe_drop"].deps == ("upcycle-moe_drop", "data") and every["xft_drop"].deps == ("moe_drop", "data")
    assert every["xft_ties"].deps == ("moe",) and METHODS["xft_distill"].compute_chain == ("moe", "xft_distill")
    with pytest.raises(ValueError, match="'bogus'"):
        check_pairs([("xft", "bogus", "a claim")], "CLAIMS")


# ---------------------------------------------------------------- running: skip, atomic, resume

@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny Llama + tokenizer that knows MiniCode's template, and a small MiniCode training file."""
    return tiny_minicode_base(tmp_path_factory.mktemp("base"), 32)


def tiny_overrides(base, *extra):
    return [f"model={base / 'model'}", f"data.path={base / 'train.jsonl'}", "train.max_steps=2",
            "train.batch_size=4", "train.micro_batch_size=4", "train.logging_steps=1", "train.save_steps=1",
            "train.max_length=128", "merge.max_steps=1", "upcycle.num_experts=4", "upcycle.top_k=3",
            "eval.limit=3", "eval.max_new_tokens=8", "eval.workers=2", *extra]


def test_rerun_skips_finished_stages_and_refuses_another_recipe(tiny_base, tmp_path):
    recipe = load_recipe("minicode", tiny_overrides(tiny_base, "methods=[sft]"))
    lines = []
    run_pipeline(recipe, str(tmp_path / "run"), progress=False, log=lines.append)
    assert (tmp_path / "run" / "sft" / "config.json").is_file()
    results = json.loads((tmp_path / "run" / "eval" / "sft" / "minicode" / "results.json").read_text())
    assert results["n_tasks"] == 3 and 0.0 <= results["pass@1"] <= 1.0
    assert len((tmp_path / "run" / "eval" / "sft" / "minicode" / "samples.jsonl").read_text().splitlines()) == 3

    again = []
    run_pipeline(recipe, str(tmp_path / "run"), progress=False, log=again.append)
    assert again and all("skipped" in line for line in again), again

    other = load_recipe("minicode", tiny_overrides(tiny_base, "methods=[sft]", "train.lr=0.5"))
    with pytest.raises(UserError, match=r"another recipe \(train.lr"):
        run_pipeline(other, str(tmp_path / "run"), progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        run_pipeline(recipe, str(tmp_path / "junk"), progress=False)


def test_failed_stage_leaves_nothing_and_rerun_completes(tiny_base, tmp_path, monkeypatch):
    recipe = load_recipe("minicode", tiny_overrides(tiny_base, "methods=[xft_init]"))
    real = stages_mod._upcycler

    def failing(routing):
        run = real(routing)

        def body(ctx, out):
            run(ctx, out)  # writes a complete-looking model into the temporary directory ...
            raise RuntimeError("killed")  # ... then dies before the stage finishes
        return body

    monkeypatch.setattr(stages_mod, "_upcycler", failing)
    with pytest.raises(RuntimeError, match="killed"):
        run_pipeline(load_recipe("minicode", tiny_overrides(tiny_base, "methods=[xft_init]")),
                     str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "upcycle").exists()
    assert not [p for p in os.listdir(tmp_path / "run") if p.startswith(".")]  # no temporary left behind
    monkeypatch.setattr(stages_mod, "_upcycler", real)
    run_pipeline(recipe, str(tmp_path / "run"), progress=False)
    assert (tmp_path / "run" / "xft_init" / "merge_coefficients.json").is_file()


def test_interrupted_training_stage_resumes_from_its_checkpoint(tiny_base, tmp_path, monkeypatch):
    """Stop MoE SFT after step 1 (checkpoint saved), re-run: the pipeline resumes it instead of starting over."""
    from transformers import TrainerCallback

    from xft.training import stage as stage_mod

    class Stop(Exception):
        pass

    class StopAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise Stop

    real = stage_mod.make_trainer

    def interrupted(*args, **kwargs):
        trainer = real(*args, **kwargs)
        trainer.add_callback(StopAfterCheckpoint())
        return trainer

    overrides = tiny_overrides(tiny_base, "methods=[moe]", "train.max_steps=3")
    monkeypatch.setattr(stage_mod, "make_trainer", interrupted)
    with pytest.raises(Stop):
        run_pipeline(load_recipe("minicode", overrides), str(tmp_path / "run"), progress=False)
    moe = tmp_path / "run" / "moe"
    assert (moe / "checkpoint-1").is_dir() and not (moe / "config.json").exists()

    monkeypatch.setattr(stage_mod, "make_trainer", real)
    lines = []
    run_pipeline(load_recipe("minicode", overrides), str(tmp_path / "run"), progress=False, log=lines.append)
    record = json.loads((moe / "xft_training.json").read_text())
    steps = [h["step"] for h in record["log_history"] if "loss" in h]
    assert steps == [1, 2, 3]  # one history, continued: step 1 from before the interruption
    assert any(line.startswith("[") and "moe" in line and "done" in line for line in lines)
    assert any("upcycle" in line and "skipped" in line for line in lines)


def _outputs(run) -> dict[str, str]:
    """Every evaluation's samples and every trained model's weights, by path (what a run computed)."""
    import hashlib

    out = {}
    for path in sorted(run.rglob("*")):
        if path.name == "samples.jsonl" or (path.name == "model.safetensors"
                                            and (path.parent / "xft_run.json").is_file()):
            out[str(path.relative_to(run))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.mark.slow  # two whole runs
def test_parallel_stages_compute_what_sequential_stages_compute(tiny_base, tmp_path):
    overrides = tiny_overrides(tiny_base, "methods=[sft, xft_init, xft]")
    run_pipeline(load_recipe("minicode", overrides), str(tmp_path / "seq"), progress=False, threads=1)
    lines = []
    run_pipeline(load_recipe("minicode", overrides), str(tmp_path / "par"), progress=False, log=lines.append,
                 jobs=2, threads=1)
    seq, par = _outputs(tmp_path / "seq"), _outputs(tmp_path / "par")
    assert len(seq) == 7 and seq == par  # 3 samples files; final models of sft, moe, xft_init, xft
    assert sum("done in" in line for line in lines) == len(plan(load_recipe("minicode", overrides)))
    assert (tmp_path / "par" / "logs" / "moe.log").is_file()
    timings = json.loads((tmp_path / "par" / "timings.json").read_text())
    assert set(timings) == {s.name for s in plan(load_recipe("minicode", overrides))}
    again = []
    run_pipeline(load_recipe("minicode", overrides), str(tmp_path / "par"), progress=False, log=again.append, jobs=2)
    assert again and all("skipped" in line for line in again), again


def test_parallel_stage_failure_names_the_stage_and_its_log(tiny_base, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    recipe = load_recipe("minicode", tiny_overrides(tiny_base, "methods=[xft_init]", f"model={broken}"))
    with pytest.raises(UserError) as err:
        run_pipeline(recipe, str(tmp_path / "run"), progress=False, jobs=2, threads=1)
    message = str(err.value)
    assert "stage upcycle failed" in message and str(tmp_path / "run" / "logs" / "upcycle.log") in message
    assert not (tmp_path / "run" / "upcycle").exists()
    assert not (tmp_path / "run" / "moe").exists()  # nothing after the failure was started
    with pytest.raises(UserError, match="jobs must be at least 1"):
        run_pipeline(recipe, str(tmp_path / "run"), progress=False, jobs=0)


# ---------------------------------------------------------------- report

def test_report_table_and_plots(tmp_path):
    from xft.pipeline import report

    rows = [report.Row("base", [0.1]), report.Row("xft", [0.5, 0.6, 0.55], params=10, tokens=2_000_000,
                                                  flops=3e12)]
    tab = report.table(rows, n_tasks=400)
    assert "| XFT learned merge | 55.0 ± 12.4 |" in tab and "3.00T" in tab and "2.00M" in tab
    assert "| base model | 10.0 ± 2.9 |" in tab
    log = [{"step": s, "layers": {str(layer): {"load_share": [0.5, 0.3, 0.2], "balance_loss": 0.01}
                                  for layer in range(4)}} for s in (1, 10, 20)]
    coef = {"method": "learned", "shared_weight": 0.75,
            "coefficients": {str(layer): [0.75, 0.1, 0.1, 0.05] for layer in range(4)}}
    for path in (report.plot_pass_at_1(rows, str(tmp_path / "a.png"), 400),
                 report.plot_expert_load(log, str(tmp_path / "b.png")),
                 report.plot_merge_coefficients(coef, str(tmp_path / "c.png"))):
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_claims_are_paired_by_seed(tmp_path):
    """Differences are taken within each seed; the verdict follows the interval of their mean."""
    from xft.pipeline import report

    scores = {"moe": [0.30, 0.50, 0.40], "xft": [0.32, 0.52, 0.43], "sft": [0.35, 0.40, 0.30]}
    runs = []
    for seed in range(3):
        run = tmp_path / f"seed-{seed}"
        for method, s in scores.items():
            (run / "eval" / method / "minicode").mkdir(parents=True)
            (run / "eval" / method / "minicode" / "results.json").write_text(json.dumps({"pass@1": s[seed]}))
        runs.append(str(run))
    diffs = dict(report.paired_differences(runs))
    xft_moe = diffs["XFT ≥ MoE (merging keeps the MoE's gains)"]
    assert xft_moe == pytest.approx([0.02, 0.02, 0.03])
    assert "learned merge ≥ init merge" not in diffs  # xft_init was not evaluated
    tab = report.claims_table(list(diffs.items()))
    # XFT - MoE is small but the same sign in every seed: paired, it holds; unpaired intervals would overlap.
    assert "| XFT ≥ MoE (merging keeps the MoE's gains) | +2.3 ± 1.4 | +2.0, +2.0, +3.0 | holds |" in tab
    assert "| MoE > dense SFT |" in tab and "not resolved" in tab.split("MoE > dense SFT")[1].split("\n")[0]
    one = report.claims_table([("c", [0.1])])
    assert "one seed" in one


def test_running_job_progress_is_read_from_its_log(tmp_path):
    from xft.pipeline import scheduler

    log = tmp_path / "eval-moe.log"
    assert scheduler._log_progress(str(log)) == ""  # no log yet
    log.write_text("Loading...\n" + "".join(f"\r generate moe:  {i}%|#| {i * 4}/400 [00:0{i % 9}<00:10]"
                                             for i in range(1, 60)))
    assert scheduler._log_progress(str(log)) == "236/400"


# ---------------------------------------------------------------- run directories: upfront checks, changes, overwrite

@pytest.fixture(scope="module")
def finished_sft_run(tiny_base, tmp_path_factory):
    """A finished run of dense SFT + its evaluation (copy it before changing it)."""
    root = tmp_path_factory.mktemp("finished") / "run"
    run_pipeline(load_recipe("minicode", tiny_overrides(tiny_base, "methods=[sft]")), str(root), progress=False)
    return root


def _copy(run, tmp_path):
    import shutil

    return shutil.copytree(run, tmp_path / "run")


def test_eval_only_changes_keep_training_and_rerun_only_changed_evaluations(tiny_base, finished_sft_run, tmp_path):
    run = _copy(finished_sft_run, tmp_path)
    weights = (run / "sft" / "model.safetensors").stat().st_mtime_ns
    minicode = (run / "eval" / "sft" / "minicode" / "samples.jsonl").read_text()
    lines = []
    # a new benchmark: only it is evaluated, MiniCode's results are kept as they are
    run_pipeline(load_recipe("minicode", tiny_overrides(tiny_base, "methods=[sft]", "eval.benchmarks=[minicode, "
                                                        "humaneval]", "eval.workers=1")),
                 str(run), progress=False, log=lines.append)
    assert any("sft: dense SFT baseline -- finished earlier, skipped" in line for line in lines), lines
    assert any("eval/sft" in line and "done" in line for line in lines), lines
    assert "eval.benchmarks" in lines[0] and "finished training stages are kept" in lines[0]
    assert (run / "eval" / "sft" / "minicode" / "samples.jsonl").read_text() == minicode
    assert json.loads((run / "eval" / "sft" / "humaneval" / "results.json").read_text())["n_tasks"] == 3
    # another limit: both evaluations re-run with it; the trained model is never touched
    run_pipeline(load_recipe("minicode", tiny_overrides(tiny_base, "methods=[sft]", "eval.benchmarks=[minicode, "
                                                        "humaneval]", "eval.limit=2")), str(run), progress=False)
    for bench in ("minicode", "humaneval"):
        assert json.loads((run / "eval" / "sft" / bench / "results.json").read_text())["n_tasks"] == 2
    assert (run / "sft" / "model.safetensors").stat().st_mtime_ns == weights


def test_none_empty_and_missing_sections_are_the_same_recipe(tiny_base, finished_sft_run):
    import yaml

    from xft.pipeline.runner import recipe_differences

    recipe = load_recipe("minicode", tiny_overrides(tiny_base, "methods=[sft]"))
    saved = yaml.safe_load((finished_sft_run / "recipe.yaml").read_text())
    assert recipe_differences(saved, recipe) == ([], [])
    saved["eval"]["data"], saved["dense"] = None, None
    del saved["upcycle"]["noisy_gating"], saved["data"]["size"]  # a default left out, None -> missing
    saved["upcycle"]["noisy_gating"] = True
    assert recipe_differences(saved, recipe) == ([], [])
    changed = load_recipe("minicode", tiny_overrides(tiny_base, "methods=[sft]", "eval.data.humaneval=/x.jsonl"))
    assert recipe_differences(saved, changed) == ([], ["eval.data.humaneval: None -> '/x.jsonl'"])


def test_training_change_is_refused_with_the_diff_and_overwrite_replaces_the_run(tiny_base, finished_sft_run,
                                                                                 tmp_path):
    run = _copy(finished_sft_run, tmp_path)
    (run / "notes.txt").write_text("mine")
    other = load_recipe("minicode", tiny_overrides(tiny_base, "methods=[sft]", "train.lr=0.01"))
    with pytest.raises(UserError, match=r"another recipe \(train.lr: 0.003 -> 0.01\).*--overwrite"):
        run_pipeline(other, str(run), progress=False)
    run_pipeline(other, str(run), progress=False, overwrite=True)
    config = json.loads((run / "sft" / "xft_training.json").read_text())["config"]
    assert config["lr"] == 0.01
    assert (run / "notes.txt").read_text() == "mine"  # only what xft wrote is deleted


def test_a_run_that_failed_before_any_stage_finished_does_not_block_the_fix(tiny_base, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(UserError):
        run_pipeline(load_recipe("minicode", tiny_overrides(tiny_base, "methods=[sft]", f"model={broken}")),
                     str(tmp_path / "run"), progress=False)
    assert (tmp_path / "run" / "recipe.yaml").is_file()
    run_pipeline(load_recipe("minicode", tiny_overrides(tiny_base, "methods=[sft]")), str(tmp_path / "run"),
                 progress=False)  # another model: accepted, nothing had finished
    assert (tmp_path / "run" / "eval" / "sft" / "minicode" / "results.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["model=/no/such/model"], "model path /no/such/model does not exist"),
    (["train.lr=-1"], "lr must be positive"),
    (["upcycle.top_k=9"], "invalid upcycle config"),
    (["train.response_field=output"], "--set train.response_field=NAME"),
    (["eval.benchmarks=[minicode, humaneval_plus]"], "unknown benchmark 'humaneval_plus'"),
    (["eval.data.humaneval=/no/such.jsonl"], "eval.data.humaneval: /no/such.jsonl: no such file"),
])
def test_inputs_are_checked_before_the_run_directory_exists(tiny_base, tmp_path, extra, message):
    recipe = load_recipe("minicode", tiny_overrides(tiny_base, "methods=[xft, sft]", *extra))
    with pytest.raises(UserError) as err:
        run_pipeline(recipe, str(tmp_path / "run"), progress=False)
    assert message in str(err.value), str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_warm_up_that_swallows_a_later_stage_fails_before_any_stage(tiny_base, tmp_path):
    # 32 records, batch 4, one epoch: the merge stage (after hours of SFT at scale) would have 8 steps.
    recipe = load_recipe("minicode", tiny_overrides(tiny_base, "methods=[xft]", "merge.max_steps=-1",
                                                    "merge.epochs=1", "merge.warmup_steps=500"))
    with pytest.raises(UserError, match=r"stage xft: .*--set merge\.warmup_steps=0.*no stage was started"):
        run_pipeline(recipe, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()
