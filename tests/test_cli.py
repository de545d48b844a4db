"""The `xft` command itself: fast help (no heavy imports), --version, Ctrl-C, and `xft eval`'s --out rules.

Startup time is not asserted (flaky on a busy machine); the mechanism is: what a
fresh interpreter has imported after `xft ... --help`. The measured times are in
docs/CORE_API.md.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

import xft
from xft import cli
from xft.cli import main

HEAVY = ("torch", "transformers", "datasets", "accelerate")


def _heavy_modules_after(argv: list[str]) -> set[str]:
    """The heavy packages a fresh interpreter has imported after running `xft ARGV` (which exits)."""
    code = (f"import sys\nfrom xft.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return set(run.stdout.splitlines()[-1].split()) if run.stdout.strip() else set()


@pytest.mark.parametrize("argv", [["--help"], ["--version"]] + [[c, "--help"] for c in cli.COMMANDS])
def test_help_imports_no_torch(argv):
    """Every `--help`, those whose flags name registry entries (routing, kernels, merges) included."""
    if argv[0] in cli.COMMANDS and not cli._available(cli.COMMANDS[argv[0]][0]):
        pytest.skip(f"xft {argv[0]} is not written yet")
    assert _heavy_modules_after(argv) == set()


def test_a_registry_flag_is_still_checked_against_its_registry(capsys):
    from xft.routing import ROUTINGS

    with pytest.raises(SystemExit) as e:
        main(["upcycle", "m", "--out", "o", "--routing", "bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--routing" in err and "'bogus'" in err
    assert all(name in err for name in ROUTINGS)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"xft {xft.__version__}\n"


def test_help_lists_every_available_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name, (module, help, _) in cli.COMMANDS.items():
        assert (help in out) == cli._available(module), name


def test_the_command_table_says_what_each_module_says():
    """`xft --help` shows COMMANDS' help lines without importing the modules: they must not drift apart."""
    import argparse
    import importlib

    for name, (module, help, _) in cli.COMMANDS.items():
        if not cli._available(module):
            continue
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub)
        own = {a.dest: a.help for a in sub._choices_actions}
        assert own[name] == help, name


def test_command_of_a_missing_module_is_a_clean_error(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "future", ("xft.commands.no_such_module", "not written yet", False))
    with pytest.raises(SystemExit) as e:
        main(["future"])
    assert e.value.code == 2 and "invalid choice: 'future'" in capsys.readouterr().err


def test_merge_help_is_its_own(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "merge_coefficients.json" in out and "--method learned" in out
    assert "-m xft.cli merge" in out and "-m xft.cli train" not in out


def _interrupt(args):
    raise KeyboardInterrupt


@pytest.mark.parametrize("argv,resumes", [
    (["train", "m", "--data", "d.jsonl", "--out", "o"], True),
    (["merge", "m", "--method", "init", "--out", "o"], True),
    (["eval", "m", "--benchmark", "humaneval", "--out", "o"], False),
])
def test_ctrl_c_says_whether_to_rerun(monkeypatch, capsys, argv, resumes):
    module = {"train": "xft.commands.train._train", "merge": "xft.commands.train._merge",
              "eval": "xft.eval.cli.run"}[argv[0]]
    monkeypatch.setattr(module, _interrupt)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"xft {argv[0]}: interrupted")
    assert ("re-run the same command to resume" in err) == resumes


# ---------------------------------------------------------------- xft eval --out

def _eval(tmp_path, out, n_tasks: int, *extra: str) -> int:
    """Score the first `n_tasks` HumanEval canonical solutions into `out` (a few seconds, no model)."""
    from xft.eval import load_benchmark

    tasks = list(load_benchmark("humaneval").tasks.values())[:n_tasks]
    samples = tmp_path / f"samples{n_tasks}.jsonl"
    samples.write_text("".join(json.dumps({"task_id": t.task_id, "completion": t.canonical_solution}) + "\n"
                               for t in tasks))
    return main(["eval", "--samples", str(samples), "--benchmark", "humaneval", "--partial", "--workers", "2",
                 "--out", str(out), *extra])


def test_eval_refuses_a_non_empty_out_and_overwrite_replaces_it(tmp_path, capsys):
    out = tmp_path / "out"
    assert _eval(tmp_path, out, 2) == 0
    before = (out / "results.json").read_text()
    capsys.readouterr()

    assert _eval(tmp_path, out, 1) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "--overwrite" in err[0]
    assert (out / "results.json").read_text() == before

    assert _eval(tmp_path, out, 1, "--overwrite") == 0
    assert json.loads((out / "results.json").read_text())["n_tasks"] == 1
    assert sorted(os.listdir(tmp_path)) == ["out", "samples1.jsonl", "samples2.jsonl"]  # no temporary left


def test_eval_interrupted_while_writing_leaves_the_old_results(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert _eval(tmp_path, out, 2) == 0
    before = (out / "results.json").read_text()

    def half_write(out_dir, samples, results):
        (tmp_path / "seen").write_text(str(out_dir))
        open(os.path.join(out_dir, "samples.jsonl"), "w").write("half")
        raise KeyboardInterrupt

    monkeypatch.setattr("xft.eval.report.write_outputs", half_write)
    assert _eval(tmp_path, out, 1, "--overwrite") == 130
    assert (out / "results.json").read_text() == before
    assert (out / "samples.jsonl").read_text() != "half"
    assert not os.path.exists((tmp_path / "seen").read_text())  # the temporary directory is gone


def test_eval_overwrite_never_deletes_other_files(tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert _eval(tmp_path, out, 1, "--overwrite") == 2
    assert "config.json" in capsys.readouterr().err and os.listdir(out) == ["config.json"]


def test_eval_results_have_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        assert _eval(tmp_path, tmp_path / "out", 1) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o755
    for name in ("results.json", "samples.jsonl"):
        assert stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) == 0o644


def test_eval_cuda_on_a_cpu_build_is_one_line_before_loading(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    out = tmp_path / "out"
    # The model does not exist either: the device is checked first, before anything slow.
    code = main(["eval", str(tmp_path / "no-model"), "--benchmark", "humaneval", "--out", str(out),
                 "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("xft eval: error: --device cuda")
    assert not out.exists()


def test_eval_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("(default: 512)", "(default: auto)", "(default: instruction)", "(default: 0.0)"):
        assert text in out


def test_upcycle_offers_every_upcycle_config_field(tmp_path, capsys):
    import dataclasses
    import json

    from xft.config import UpcycleConfig
    from xft.testing import tiny_model, tiny_tokenizer

    with pytest.raises(SystemExit):
        main(["upcycle", "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(UpcycleConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name
    tiny_model("llama").save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    assert main(["upcycle", str(tmp_path / "base"), "--out", str(tmp_path / "moe"), "--num-experts", "4",
                 "--top-k", "2", "--balance-loss-weight", "0.02", "--load-estimate", "faithful",
                 "--expert-impl", "generic", "--no-noise"]) == 0  # --no-noise: the flag's earlier name
    saved = json.loads((tmp_path / "moe" / "config.json").read_text())["xft"]
    assert saved == dataclasses.asdict(UpcycleConfig(num_experts=4, top_k=2, balance_loss_weight=0.02,
                                                     load_estimate="faithful", expert_impl="generic",
                                                     noisy_gating=False))
    capsys.readouterr()
    # --out is the model: the same command again does nothing; another one needs --overwrite.
    again = ["upcycle", str(tmp_path / "base"), "--out", str(tmp_path / "moe"), "--num-experts", "4", "--top-k",
             "2", "--balance-loss-weight", "0.02", "--load-estimate", "faithful", "--expert-impl", "generic",
             "--no-noisy-gating"]
    before = (tmp_path / "moe" / "model.safetensors").stat().st_mtime_ns
    assert main(again) == 0 and "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "moe" / "model.safetensors").stat().st_mtime_ns == before
    assert main(again[:4] + ["--num-experts", "3", "--top-k", "2"]) == 2
    assert "another command (balance_loss_weight: 0.02 -> 0.01" in capsys.readouterr().err
    assert main(again[:4] + ["--num-experts", "3", "--top-k", "2", "--overwrite"]) == 0
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["xft"]["num_experts"] == 3
    assert sorted(p.name for p in (tmp_path / "moe").iterdir() if p.name.startswith(".")) == []
