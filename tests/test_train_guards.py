"""What a training run checks and reports beyond the loss: a warm-up that swallows the run, a learned merge
that did not move, logging integrations (package present, logs kept), the validation loss, model cards, the
routing log after a resume, and the progress line's number formats.

Tiny models from test_train's workspace; each run is a few optimizer steps.
"""

import importlib.util
import inspect
import json
import math
import os
import shutil
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

import xft
from xft.cli import main as cli
from xft.data import Collator
from xft.testing import tiny_model
from xft.config import DataConfig, MergeConfig, SFTConfig
from xft.training import learn_merge, train_sft
from xft.training.stage import check_schedule
from xft.training.trainer import CompactProgress, batch_plan, make_trainer, planned_steps, training_arguments

from test_train import FAST, make_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("guards"))
    assert cli(["upcycle", str(ws / "llama"), "--out", str(ws / "upcycled"), "--num-experts", "4", "--top-k", "3"]) == 0
    # Distinct experts (as after MoE training), so that the mixing coefficients matter.
    moe = xft.load(str(ws / "upcycled"))
    torch.manual_seed(0)
    with torch.no_grad():
        for stacks in xft.expert_weights(moe).values():
            for w in stacks.values():
                w[1:] += 0.1 * torch.randn_like(w[1:])
    moe.save_pretrained(ws / "moe")
    AutoTokenizer.from_pretrained(ws / "upcycled").save_pretrained(ws / "moe")
    rows = [json.loads(line) for line in (ws / "data.jsonl").read_text().splitlines()]
    (ws / "data200.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (rows * 4)[:200]))
    return ws


# ---------------------------------------------------------------- the schedule

@pytest.mark.parametrize("examples, settings", [
    (200, dict(batch_size=64, epochs=4)),              # the case: 16 steps
    (13, dict(batch_size=4, micro_batch_size=2, epochs=1.5)),
    (5, dict(batch_size=8, epochs=1)),                 # less than one batch
    (30, dict(batch_size=8, max_steps=7)),
])
def test_planned_steps_are_the_trainers(tmp_path, examples, settings):
    cfg = SFTConfig(model="m", data="d", out="o", **settings)
    micro, accum = batch_plan(cfg.batch_size, cfg.micro_batch_size, cfg.grad_accum, 1)
    args = training_arguments(cfg, str(tmp_path), micro, accum, None)
    data = Dataset.from_dict({"input_ids": [[1, 2]] * examples, "labels": [[1, 2]] * examples})
    trainer = make_trainer(tiny_model(), args, data, Collator(0), None, progress=False)
    count = trainer.set_initial_training_values  # the Trainer's own step count; its last value is max_steps
    # transformers 5.0 still takes the total batch size as an argument (later releases compute it)
    total = (args.train_batch_size * args.gradient_accumulation_steps * args.world_size,) if \
        "total_train_batch_size" in inspect.signature(count).parameters else ()
    assert count(args, trainer.get_train_dataloader(), *total)[-1] == planned_steps(examples, cfg, 1)


def test_warmup_longer_than_the_run_is_refused_before_loading(ws, tmp_path, capsys):
    """The issue's case: 200 examples at the paper's defaults -> 16 steps under a 500-step warm-up."""
    train = ["train", str(ws / "llama"), "--data", str(ws / "data200.jsonl"), "--out", str(tmp_path / "t")]
    assert cli(train) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warm-up (500 steps) is as long as the whole run (16 optimizer steps: " \
        "200 examples, batch 64, 4 epochs)" in err and "--warmup-steps 1 (about 10% of the run)" in err, err
    merge = ["merge", str(ws / "moe"), "--data", str(ws / "data200.jsonl"), "--out", str(tmp_path / "m")]
    assert cli(merge) == 2
    err = capsys.readouterr().err
    assert "warm-up (125 steps) is as long as the whole run (4 optimizer steps" in err, err
    assert not (tmp_path / "t").exists() and not (tmp_path / "m").exists()


def test_long_warmup_is_a_warning_when_steps_are_explicit_or_most_of_the_run():
    smoke = SFTConfig(model="m", data="d", out="o", max_steps=2)  # a smoke test asks for 2 steps on purpose
    with pytest.warns(UserWarning, match=r"warm-up \(500 steps\) takes 100% of the run \(2 optimizer steps"):
        assert "never reaches" in check_schedule(smoke, 1000, processes=1)
    most = SFTConfig(model="m", data="d", out="o", batch_size=8, epochs=1, warmup_steps=6)
    with pytest.warns(UserWarning, match="takes 75% of the run"):
        check_schedule(most, 64, processes=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_schedule(SFTConfig(model="m", data="d", out="o", batch_size=8, warmup_steps=3), 64, 1) is None


# ---------------------------------------------------------------- the learned merge moved (or not)

def test_merge_summary_says_when_coefficients_did_not_move(ws, capsys):
    base = dict(moe=str(ws / "moe"), data=str(ws / "data.jsonl"), **{**FAST, "progress": True})
    with pytest.warns(UserWarning, match="did not move from their init"):
        still = learn_merge(MergeConfig(out=str(ws / "m_still"), max_steps=2, lr=1e-5, **{**base, "warmup_steps": 100}))
    out = capsys.readouterr().out
    assert "did not move from their init" in out and "the warm-up (100 steps) covered all of the 2 steps" in out
    assert json.loads(open(f"{still}/merge_coefficients.json").read())["max_change_from_init"] < 1e-6

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moved = learn_merge(MergeConfig(out=str(ws / "m_moved"), max_steps=2, lr=0.1, **base))
    out = capsys.readouterr().out
    assert "did not move" not in out and "max change of a coefficient from its init" in out
    assert json.loads(open(f"{moved}/merge_coefficients.json").read())["max_change_from_init"] > 1e-3

    # Merging the upcycled model instead of the trained one: identical experts, nothing to learn.
    with pytest.warns(UserWarning, match="the MoE's experts are identical"):
        learn_merge(MergeConfig(out=str(ws / "m_same"), max_steps=2, lr=0.1, **{**base, "moe": str(ws / "upcycled")}))


def test_grad_norms_print_small_values():
    """A learned merge's gradients are ~1e-5: the progress line must not show them as 0.000."""
    class Bar:
        lines = []

        def write(self, line):
            self.lines.append(line)

    class State:
        is_world_process_zero, global_step, max_steps = True, 3, 10

    progress = CompactProgress()
    progress.training_bar = Bar()
    progress.on_log(None, State(), None, logs={"loss": 1.5, "grad_norm": 1.234e-5, "learning_rate": 1e-5})
    progress.on_log(None, State(), None, logs={"eval_loss": 1.25})
    assert "grad 1.23e-05" in Bar.lines[0] and "validation loss 1.2500" in Bar.lines[1]


# ---------------------------------------------------------------- logging integrations

def test_report_to_a_missing_package_is_one_line_before_anything_loads(ws, tmp_path, capsys):
    base = ["train", str(ws / "llama"), "--data", str(tmp_path / "not_read_yet.jsonl"), "--out", str(tmp_path / "o")]
    for name, package in (("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow")):
        if importlib.util.find_spec(name):
            continue
        assert cli(base + ["--report-to", name]) == 2
        err = capsys.readouterr().err
        assert err == f"xft train: error: --report-to {name} needs the {package} package: pip install {package}\n"
    assert cli(base + ["--report-to", "tensorbord"]) == 2
    assert "unknown --report-to 'tensorbord'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


FAKE_TENSORBOARDX = '''
import os
class SummaryWriter:
    """Records what TensorBoard would: one line per call, in log_dir."""
    def __init__(self, log_dir=None, **kwargs):
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, "events.fake")
    def __getattr__(self, name):
        def record(*args, **kwargs):
            with open(self.path, "a") as f:
                f.write(name + " " + repr(args[:1]) + "\\n")
        return record
'''


@pytest.fixture(scope="module")
def dense_run(ws, tmp_path_factory):
    """Dense SFT with a held-out validation split, logging to a stand-in TensorBoard; checkpoints deleted."""
    fake = tmp_path_factory.mktemp("fake_tb")
    (fake / "tensorboardX").mkdir()
    (fake / "tensorboardX" / "__init__.py").write_text(FAKE_TENSORBOARDX)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(fake))
        final = train_sft(SFTConfig(model=str(ws / "llama"), out=str(ws / "dense"), eval_steps=2,
                                    data=DataConfig(path=str(ws / "data.jsonl"), eval_fraction=0.25), max_steps=3, lr=1e-2, report_to="tensorboard",
                                    **FAST))
    return final


def test_tensorboard_logs_outlive_the_checkpoints(ws, dense_run):
    assert not list(ws.glob("dense/checkpoint-*"))
    events = (ws / "dense" / "logs" / "events.fake").read_text()
    assert "add_scalar ('train/loss',)" in events and "add_scalar ('eval/loss',)" in events


def test_validation_loss_is_computed_and_recorded(ws, dense_run):
    record = json.loads(open(f"{dense_run}/xft_training.json").read())
    assert record["data"]["examples"] == 48 and record["validation"]["data"]["examples"] == 16
    steps = [step for step, _ in record["validation"]["curve"]]
    assert steps == [2, 3]  # every --eval-steps, and once more at the end
    assert record["validation"]["loss"] == record["validation"]["curve"][-1][1] and \
        math.isfinite(record["validation"]["loss"])


def test_learned_merge_reports_validation_loss_from_a_file(ws, capsys):
    final = learn_merge(MergeConfig(moe=str(ws / "moe"), out=str(ws / "m_val"),
                                    data=DataConfig(path=str(ws / "data.jsonl"), eval_path=str(ws / "data200.jsonl")), max_steps=2, lr=0.1,
                                    **{**FAST, "progress": True}))
    record = json.loads(open(f"{final}/xft_training.json").read())
    assert record["validation"]["data"]["path"] == str(ws / "data200.jsonl")
    assert [s for s, _ in record["validation"]["curve"]] == [2]
    assert "validation loss" in capsys.readouterr().out


# ---------------------------------------------------------------- model cards

def front_matter(model_dir):
    import yaml

    text = open(f"{model_dir}/README.md").read()
    return yaml.safe_load(text.split("---")[1]), text


def test_dense_model_card_names_plain_transformers(ws, dense_run):
    meta, text = front_matter(dense_run)
    assert meta["library_name"] == "transformers" and "xft" in meta["tags"]
    assert "base_model" not in meta  # a local path is no Hub id
    assert f'AutoModelForCausalLM.from_pretrained("{dense_run}")' in text and "xft.load" not in text
    assert "instruction-tuned" in text and "optimizer steps: 3" in text


def test_merged_model_card_says_how_it_was_merged(ws):
    learned = learn_merge(MergeConfig(moe=str(ws / "moe"), data=str(ws / "data.jsonl"), out=str(ws / "m_card"),
                                      max_steps=1, lr=0.1, **FAST))
    meta, text = front_matter(learned)
    assert meta["library_name"] == "transformers" and "merge" in meta["tags"]
    assert "Merge method `learned`" in text and "AutoModelForCausalLM.from_pretrained" in text


# ---------------------------------------------------------------- an MoE run, resumed

@pytest.mark.slow  # resume itself is in the default suite (test_train_resume.py)
def test_resumed_moe_run_logs_each_step_once_and_its_card_names_xft(ws):
    cfg = dict(model=str(ws / "moe"), data=str(ws / "data.jsonl"), out=str(ws / "moe_run"), max_steps=4, lr=1e-2,
               keep_checkpoints=True, **{**FAST, "save_steps": 2})
    train_sft(SFTConfig(**cfg))
    # Interrupted after the checkpoint at step 2: steps 3-4 are logged again by the resumed run.
    os.remove(ws / "moe_run" / "config.json")  # killed while the model was moved in
    shutil.rmtree(ws / "moe_run" / "checkpoint-4")
    with open(ws / "moe_run" / "routing.jsonl", "a") as f:
        f.write('{"step": 5, "layers": {"0": {"load_sh')  # and a line cut off by the kill
    final = train_sft(SFTConfig(**cfg))
    routing = [json.loads(line) for line in (ws / "moe_run" / "routing.jsonl").read_text().splitlines()]
    assert [r["step"] for r in routing] == [1, 2, 3, 4]

    # Starting over (--overwrite) starts the routing log over too.
    train_sft(SFTConfig(**{**cfg, "max_steps": 2, "overwrite": True}))
    assert [json.loads(line)["step"] for line in (ws / "moe_run" / "routing.jsonl").read_text().splitlines()] == [1, 2]

    meta, text = front_matter(final)
    assert meta["library_name"] == "xft" and "moe" in meta["tags"]
    assert f'xft.load("{final}")' in text and "Plain `transformers` does not load it" in text
    assert 'AutoModelForCausalLM.from_pretrained("' not in text


def test_moe_card_never_offers_plain_transformers(tmp_path):
    from xft.modelcard import KINDS, write_model_card

    for kind, (is_moe, _) in KINDS.items():
        (tmp_path / kind).mkdir()
        text = open(write_model_card(str(tmp_path / kind), kind=kind, base_model="org/base")).read()
        assert ("xft.load(" in text) == is_moe and ('AutoModelForCausalLM.from_pretrained("' in text) != is_moe
        assert "base_model: \"org/base\"" in text
    with pytest.raises(ValueError, match="unknown model card kind"):
        write_model_card(str(tmp_path), kind="dense-ish")


def test_base_model_is_carried_through_cards(tmp_path):
    from xft.modelcard import base_model_of, write_model_card

    write_model_card(str(tmp_path), kind="moe", base_model="deepseek-ai/deepseek-coder-1.3b-base")
    assert base_model_of(str(tmp_path)) == "deepseek-ai/deepseek-coder-1.3b-base"
    assert base_model_of(str(tmp_path / "no_card")) == str(tmp_path / "no_card")
