"""What a new user hit (issue 23), each through the command they ran: threads, config.json types, Trainer
names, the reporting backend, "another command", run summaries, model cards, MoEs in plain transformers."""

import json
import os
import subprocess
import sys

import pytest
import torch

from test_train import FAST, make_workspace
from xft.cli import main as cli


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


@pytest.fixture
def threads():
    """Restore torch's thread count after a test that sets it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def one_line_error(capsys, command: str) -> str:
    """The one error line a failed `xft COMMAND` printed (asserted to be one line, no traceback)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"xft {command}: error: "), err
    return lines[0]


# ---------------------------------------------------------------- --threads

@pytest.mark.parametrize("command", ["upcycle", "train", "merge", "eval"])
def test_every_command_that_runs_a_model_takes_threads(command, capsys):
    from xft.cli import build_parser

    args = build_parser(command).parse_args([command, "m", "--out", "o", "--threads", "1"]
                                            + {"eval": ["--benchmark", "humaneval"], "train": ["--data", "d"]}.get(command, []))
    assert args.threads == 1


def test_threads_are_set_before_the_model_runs(ws, tmp_path, threads):
    torch.set_num_threads(2)
    assert cli(["upcycle", str(ws / "llama"), "--out", str(tmp_path / "moe"), "--num-experts", "4",
                "--top-k", "2", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1


def test_threads_below_one_is_refused_before_anything_is_written(ws, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(["train", str(ws / "llama"), "--data", str(ws / "data.jsonl"), "--out", str(out),
                "--threads", "0"]) == 2
    assert "--threads must be at least 1" in one_line_error(capsys, "train") and not out.exists()


# ---------------------------------------------------------------- other tools' names

@pytest.mark.parametrize("command", ["train", "merge"])
def test_trainer_names_at_the_command_say_which_flag_is_meant(command, capsys):
    from xft.config import ALIASES

    for name in ("learning_rate", "num_train_epochs", "per_device_train_batch_size",
                 "gradient_accumulation_steps"):
        flag = "--" + name.replace("_", "-")
        with pytest.raises(SystemExit) as e:  # as argparse exits on its usage errors
            cli([command, "m", "--data", "d", "--out", "o", flag, "2"])
        assert e.value.code == 2
        meant = "--" + ALIASES[name].replace("_", "-")
        assert f"unknown option {flag} (did you mean {meant}?)" in one_line_error(capsys, command)


def test_every_alias_names_a_setting_or_flag_that_exists():
    from xft.config import ALIASES, DecodingConfig, MergeConfig, SFTConfig, UpcycleConfig, flat_settings

    known = set().union(*(flat_settings(c) for c in (SFTConfig, MergeConfig, DecodingConfig, UpcycleConfig)))
    assert set(ALIASES.values()) <= known | {"model", "eval_data"}, set(ALIASES.values()) - known


def test_trainer_names_in_set_say_which_key_is_meant():
    from xft.errors import UserError
    from xft.pipeline import load_recipe

    with pytest.raises(UserError, match=r"unknown recipe key train\.learning_rate \(did you mean 'lr'\?\)"):
        load_recipe("minicode", ["train.learning_rate=1e-5"])
    with pytest.raises(UserError, match=r"merge\.gradient_accumulation_steps \(did you mean 'grad_accum'\?\)"):
        load_recipe("minicode", ["merge.gradient_accumulation_steps=4"])


# ---------------------------------------------------------------- config.json

@pytest.fixture(scope="module")
def bad_config_model(ws):
    """The tiny Llama with `"hidden_size": "sixty-four"` in its config.json."""
    import shutil

    bad = ws / "bad_config"
    if not bad.exists():
        shutil.copytree(ws / "llama", bad)
        config = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**config, "hidden_size": "sixty-four"}))
    return bad


@pytest.mark.parametrize("argv", [["upcycle"], ["train", "--data", "DATA"], ["merge", "--method", "uniform"],
                                  ["eval", "--benchmark", "minicode", "--limit", "1"]])
def test_a_config_value_of_the_wrong_type_is_one_line_naming_file_and_field(ws, bad_config_model, tmp_path,
                                                                             argv, capsys):
    argv = [a.replace("DATA", str(ws / "data.jsonl")) for a in argv]
    out = tmp_path / "out"
    assert cli([argv[0], str(bad_config_model), *argv[1:], "--out", str(out)]) == 2
    line = one_line_error(capsys, argv[0])
    assert f"{bad_config_model / 'config.json'}: field 'hidden_size'" in line and "'sixty-four'" in line
    assert not out.exists()


# ---------------------------------------------------------------- --report-to

BROKEN_PROTOBUF = "from google.protobuf import runtime_version_of_a_newer_protobuf  # as tensorboard's generated code\n"


def test_a_reporting_backend_that_does_not_import_is_one_line_before_anything_loads(ws, tmp_path):
    """tensorboard installed over a protobuf too old for it (what installing evalplus did): its generated
    protobuf modules fail to import, which `import tensorboard` alone does not show."""
    proto = tmp_path / "site" / "tensorboard" / "compat" / "proto"
    proto.mkdir(parents=True)
    for d in (proto, proto.parent, proto.parent.parent):
        (d / "__init__.py").write_text("")
    (proto / "event_pb2.py").write_text(BROKEN_PROTOBUF)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run([sys.executable, "-m", "xft.cli", "train", str(ws / "llama"), "--data",
                           str(ws / "data.jsonl"), "--out", str(out), "--report-to", "tensorboard"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--report-to tensorboard: tensorboard is installed but does not import" in proc.stderr
    assert "pip install -U tensorboard protobuf" in proc.stderr and not out.exists()


def test_a_start_that_did_no_work_does_not_make_the_corrected_command_another_command(tmp_path):
    from xft.config import SFTConfig
    from xft.errors import UserError
    from xft.training import rundir

    failed = SFTConfig(model="m", data="d.jsonl", out=str(tmp_path / "run"), report_to="none", lr=1e-3)
    rundir.start(rundir.prepare(failed.out, failed, "sft").run, failed, "sft")  # then it died: no checkpoint
    fixed = SFTConfig(model="m", data="d.jsonl", out=failed.out, lr=2e-3)
    plan = rundir.prepare(fixed.out, fixed, "sft")
    assert not plan.done and plan.resume is None
    rundir.start(plan.run, fixed, "sft")
    assert plan.run.read_record()["lr"] == 2e-3  # the corrected command is the run's command now
    os.makedirs(os.path.join(fixed.out, "checkpoint-1"))  # once it has done work, other settings are refused
    with pytest.raises(UserError, match="interrupted run with other settings"):
        rundir.prepare(failed.out, failed, "sft")


# ---------------------------------------------------------------- "another command"

def _started(cfg, stage: str, finished: bool = False):
    """`cfg`'s run directory as a run that did work: a checkpoint, and with `finished` its model."""
    from xft.training import rundir

    rundir.start(rundir.RunDir(cfg.out), cfg, stage)
    os.makedirs(os.path.join(cfg.out, "checkpoint-1"))
    if finished:
        open(os.path.join(cfg.out, "config.json"), "w").write("{}")


def test_the_refusal_counts_every_differing_setting(tmp_path):
    from xft.config import SFTConfig
    from xft.errors import UserError
    from xft.training import rundir

    base = dict(model="m", data="d.jsonl", out=str(tmp_path / "run"))
    _started(SFTConfig(**base), "sft")
    few = dict(lr=1e-3, epochs=2.0, warmup_steps=3)
    with pytest.raises(UserError) as e:
        rundir.prepare(base["out"], SFTConfig(**base, **few), "sft")
    assert all(f"{k}: " in str(e.value) for k in few) and "more" not in str(e.value)
    many = dict(few, weight_decay=0.1, max_grad_norm=1.0, batch_size=32, seed=1, optimizer="adamw_torch",
                lr_scheduler="cosine", max_steps=5, ewa_share_rate=0.5)
    with pytest.raises(UserError) as e:
        rundir.prepare(base["out"], SFTConfig(**base, **many), "sft")
    shown = [k for k in many if f"{k}: " in str(e.value)]
    assert len(shown) == rundir.SHOWN_DIFFERENCES
    assert f"and {len(many) - rundir.SHOWN_DIFFERENCES} more" in str(e.value)


def test_another_subcommands_output_is_named_as_such(tmp_path):
    from xft.config import MergeConfig, SFTConfig
    from xft.errors import UserError
    from xft.training import rundir

    out = str(tmp_path / "merged")
    _started(MergeConfig(moe="moe", out=out, method="uniform"), "merge", finished=True)
    with pytest.raises(UserError) as e:
        rundir.prepare(out, SFTConfig(model="m", data="d.jsonl", out=out), "sft")
    assert "holds the finished model of `xft merge`, not of `xft train`" in str(e.value)
    assert "method" not in str(e.value) and "->" not in str(e.value)  # no irrelevant settings
    evaluated = tmp_path / "eval"
    evaluated.mkdir()
    (evaluated / "results.json").write_text("{}")
    with pytest.raises(UserError, match="holds the results of `xft eval`"):
        rundir.prepare(str(evaluated), SFTConfig(model="m", data="d.jsonl", out=str(evaluated)), "sft")


def test_eval_into_a_model_directory_never_suggests_an_overwrite_it_would_refuse(tmp_path):
    from xft.errors import UserError
    from xft.eval.evaluate import check_out

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for overwrite in (False, True):
        with pytest.raises(UserError) as e:
            check_out(str(model), overwrite=overwrite)
        assert "is a model directory" in str(e.value) and "--overwrite" not in str(e.value)


# ---------------------------------------------------------------- what the saved models say

@pytest.fixture(scope="module")
def upcycled(ws):
    assert cli(["upcycle", str(ws / "llama"), "--out", str(ws / "moe"), "--num-experts", "4", "--top-k", "2"]) == 0
    return ws / "moe"


def _config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


def test_trained_and_merged_models_keep_the_base_models_use_cache(ws, upcycled, tmp_path):
    """Trainer turns `use_cache` off while it trains; the saved models must generate with the cache as the base."""
    from xft.config import MergeConfig, SFTConfig
    from xft.training import learn_merge, train_sft

    base = _config(ws / "llama").get("use_cache", True)
    data = str(ws / "data.jsonl")
    dense = train_sft(SFTConfig(model=str(ws / "llama"), data=data, out=str(tmp_path / "sft"), max_steps=1,
                                gradient_checkpointing=True, **FAST))
    merged = learn_merge(MergeConfig(moe=str(upcycled), data=data, out=str(tmp_path / "merged"), max_steps=1,
                                     **FAST))
    for out in (dense, merged):
        assert _config(tmp_path / os.path.basename(out))["use_cache"] == base, out


def _card_lines(directory, prefix: str) -> list[str]:
    return [line for line in (directory / "README.md").read_text().splitlines() if line.startswith(prefix)]


def test_cards_name_paths_any_reader_can_follow_and_a_merge_names_the_original_base(ws, tmp_path, monkeypatch):
    """Relative paths given by the caller are absolute in the cards; a merge of an MoE names the dense model the
    MoE was upcycled from as its base, not the MoE."""
    monkeypatch.chdir(ws)  # the user's directory: every path below is relative to it
    rel_out = os.path.relpath(tmp_path, ws)
    assert cli(["upcycle", "llama", "--out", f"{rel_out}/moe", "--num-experts", "4", "--top-k", "2"]) == 0
    assert cli(["merge", f"{rel_out}/moe", "--out", f"{rel_out}/merged", "--method", "uniform"]) == 0
    for out in ("moe", "merged"):
        assert _card_lines(tmp_path / out, "- base model: ") == [f"- base model: `{ws / 'llama'}`"], out
    assert _card_lines(tmp_path / "merged", "- made from: ") == [f"- made from: `{tmp_path / 'moe'}`"]
    assert f'from_pretrained("{tmp_path / "merged"}")' in (tmp_path / "merged" / "README.md").read_text()


def test_what_plain_transformers_says_of_an_moe_is_answered_by_its_card_and_config(upcycled):
    """In a process without xft, transformers refuses the MoE with advice to upgrade it; the directory's card
    (what a user or the Hub shows beside it) names that refusal and the loader, as config.json's note does."""
    from xft.modelcard import MOE_NOTE

    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(upcycled)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert proc.returncode != 0 and "model type `xft_moe`" in proc.stderr
    card = (upcycled / "README.md").read_text()
    assert "does not recognize the model type `xft_moe`" in card and "upgrading transformers" in card
    assert MOE_NOTE in card and _config(upcycled)["xft_note"] == MOE_NOTE
    assert f'xft.load("{upcycled}")' in card


# ---------------------------------------------------------------- eval's per-task errors

def test_an_answer_without_the_function_is_reported_as_such_and_its_own_errors_as_they_are():
    from xft.eval import evaluate, load_benchmark

    task = next(iter(load_benchmark("humaneval").tasks.values()))  # HumanEval/0: has_close_elements
    samples = [{"task_id": task.task_id, "solution": "x = 1\n"}]
    ev = evaluate(None, "humaneval", None, samples=samples, partial=True, workers=1)
    assert ev.tasks[task.task_id]["error"] == f"the answer does not define {task.entry_point}"
    own = [{"task_id": task.task_id, "solution": f"def {task.entry_point}(*a):\n    return {{}}['k']\n"}]
    ev = evaluate(None, "humaneval", None, samples=own, partial=True, workers=1)
    assert ev.tasks[task.task_id]["error"].startswith("KeyError")  # the program's own KeyError stays one


# ---------------------------------------------------------------- --expert-impl and the sandbox level everywhere

@pytest.mark.parametrize("command,config", [("train", "SFTConfig"), ("merge", "MergeConfig"),
                                            ("eval", "DecodingConfig"), ("upcycle", "UpcycleConfig")])
def test_every_command_that_runs_a_model_takes_expert_impl_from_its_config(command, config):
    import xft.config
    from xft.cli import build_parser
    from xft.config import from_args

    extra = {"eval": ["--benchmark", "humaneval"], "train": ["--data", "d"], "merge": ["--method", "uniform"]}
    args = build_parser(command).parse_args([command, "m", "--out", "o", "--expert-impl", "generic",
                                             *extra.get(command, [])])
    assert from_args(getattr(xft.config, config), args).expert_impl == "generic"


def test_expert_impl_of_a_run_that_upcycles_is_the_upcycled_moes():
    from xft.config import SFTConfig, UpcycleConfig

    cfg = SFTConfig(model="m", data="d", out="o", upcycle=UpcycleConfig(), expert_impl="generic")
    assert cfg.upcycle.expert_impl == "generic"


def test_recipes_set_expert_impl_and_the_sandbox_level_and_bad_values_are_caught_before_any_stage():
    from xft.errors import UserError
    from xft.pipeline import load_recipe
    from xft.pipeline.preflight import _check_benchmarks
    from xft.pipeline.recipe import section_settings

    recipe = load_recipe("minicode", ["train.expert_impl=generic", "merge.expert_impl=fast",
                                      "eval.expert_impl=generic", "eval.sandbox=rlimits"])
    assert section_settings(recipe, "moe")["expert_impl"] == "generic"
    assert section_settings(recipe, "merge")["expert_impl"] == "fast"
    assert (recipe.eval.expert_impl, recipe.eval.sandbox) == ("generic", "rlimits")
    with pytest.raises(UserError, match=r"eval: sandbox='bogus'; expected one of auto, .*rlimits"):
        _check_benchmarks(load_recipe("minicode", ["eval.sandbox=bogus"]))


def test_a_trained_moe_runs_with_the_kernel_asked_for_and_keeps_its_results(ws, upcycled, tmp_path):
    """The kernel changes speed, not results: the same MoE trained with the generic kernel (any FFN, through
    torch.func) reaches the weights the fast kernel reaches; the run records the kernel it used."""
    from safetensors.torch import load_file

    from xft.config import SFTConfig
    from xft.training import train_sft

    runs = {impl: train_sft(SFTConfig(model=str(upcycled), data=str(ws / "data.jsonl"), out=str(tmp_path / impl),
                                      max_steps=2, lr=1e-2, expert_impl=impl, **FAST)) for impl in ("fast", "generic")}
    a, b = (load_file(os.path.join(run, "model.safetensors")) for run in runs.values())
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    record = json.loads((tmp_path / "generic" / "xft_training.json").read_text())
    assert record["config"]["expert_impl"] == "generic"


# ---------------------------------------------------------------- xft report of hand-made outputs

def test_report_of_a_folder_of_hand_made_outputs(ws, tmp_path, capsys):
    from xft.eval import load_benchmark

    folder = tmp_path / "runs"
    assert cli(["upcycle", str(ws / "llama"), "--out", str(folder / "moe"), "--num-experts", "4", "--top-k", "2"]) == 0
    assert cli(["train", str(folder / "moe"), "--data", str(ws / "data.jsonl"), "--out", str(folder / "sft"),
                "--max-steps", "2", "--batch-size", "8", "--warmup-steps", "0", "--no-progress"]) == 0
    tasks = list(load_benchmark("humaneval").tasks.values())[:2]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": t.task_id, "completion": c}) + "\n"
                               for t, c in zip(tasks, [tasks[0].canonical_solution, "    pass\n"])))
    assert cli(["eval", "--samples", str(samples), "--benchmark", "humaneval", "--partial", "--workers", "1",
                "--out", str(folder / "eval" / "humaneval")]) == 0
    capsys.readouterr()

    assert cli(["report", str(folder)]) == 0
    assert "| eval/humaneval | humaneval |" in capsys.readouterr().out
    report = (folder / "report.md").read_text()
    training = json.loads((folder / "sft" / "xft_training.json").read_text())["log_history"]
    loss = [h["loss"] for h in training if "loss" in h][-1]
    assert f"| moe | xft upcycle | finished | `{ws / 'llama'}` |" in report
    assert f"| sft | xft train | finished | `{folder / 'moe'}` | 2 | {loss:.4f} | - |" in report
    assert f"| eval/humaneval | humaneval | `samples {samples}` | 50.0 | 2 |" in report


def test_report_of_a_folder_without_xft_outputs_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli(["report", str(tmp_path)]) == 2
    assert "nor any output of xft upcycle/train/merge/eval" in one_line_error(capsys, "report")


def test_a_run_that_leaves_the_kernel_alone_checks_its_settings_without_torch():
    """expert_impl unset reads no kernel registry (xft.moe is torch): settings still fail fast."""
    code = ("import sys\nfrom xft.config import DecodingConfig, ExecutionConfig, MergeConfig, SFTConfig\n"
            "SFTConfig(model='m', data='d', out='o'); MergeConfig(moe='m', out='o', method='uniform')\n"
            "DecodingConfig(); ExecutionConfig()\nprint('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr
