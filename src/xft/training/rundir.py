"""The run directory of a training stage: the finished model itself, with its checkpoints beside it.

Layout of `--out OUT` (the ecosystem's convention: the output directory *is* the model):

    OUT/config.json, *.safetensors, tokenizer files, README.md, xft_training.json
                               the finished model (+ merge_coefficients.json for a merge):
                               `AutoModelForCausalLM.from_pretrained(OUT)` for dense models,
                               `xft.load(OUT)` (or the Auto classes after `import xft`) for MoEs
    OUT/checkpoint-N/          resumable Trainer checkpoints, where Trainer writes them
    OUT/xft_run.json           the stage's config, written when training starts
    OUT/logs/                  TensorBoard (and other file-based) logs, kept after the run
    OUT/routing.jsonl          per-layer expert loads of an MoE run, one line per logging step
    OUT/distill/               a merge's distillation (`xft merge --distill-steps`), itself laid out
                               as a run directory: its checkpoints while it trains, its logs after

Guarantees:
* An interrupted run never leaves a top-level `config.json`: the model is
  written to a temporary sibling, its files are moved in, and `config.json`
  moves last, so anything that loads `OUT` sees a whole model or none.
* Re-running the command of a finished run is a no-op that says so
  (`prepare` returns `done`); a run with *other* settings on a finished or
  interrupted `OUT` is a UserError unless `overwrite` is set.
* Re-running the same stage on an interrupted run resumes from its newest
  complete checkpoint.
* `overwrite` deletes only what this module wrote (the run file, checkpoints,
  logs and the model files it recorded); a directory that is not a run
  directory is never deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass

from xft.artifacts import LEGACY_FINAL, RUN_FILE, atomic_write_json, follow_umask, settings_diff  # noqa: F401
from xft.errors import UserError

LOGS = "logs"
ROUTING_LOG = "routing.jsonl"
DISTILL = "distill"  # the run directory of a merge's distillation, inside the merge's
MODEL_CONFIG = "config.json"  # moved into OUT last: its presence means "finished"
STAGING = ".final.tmp"  # where the finished model is written before `publish` moves it into OUT
# Fields that do not change what a run computes; they may differ when resuming or re-running.
NON_SEMANTIC = {"overwrite", "progress", "report_to", "logging_steps", "save_total_limit", "num_workers",
                "save_steps", "keep_checkpoints", "eval_steps", "gap_examples",  # gap_examples: a diagnostic
                "expert_impl"}  # the MoE kernel: speed, not results
# Entries of the run file that record what happened, not settings.
RECORD_ONLY = {"outputs"}
_CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class RunDir:
    """Paths of a run directory and what it holds now."""

    root: str

    @property
    def run_file(self) -> str:
        return os.path.join(self.root, RUN_FILE)

    @property
    def checkpoints(self) -> str:
        """Where Trainer writes `checkpoint-N/` (its `output_dir`): the run directory itself."""
        return self.root

    @property
    def final(self) -> str:
        """Where the finished model is: the run directory itself."""
        return self.root

    @property
    def logs(self) -> str:
        return os.path.join(self.root, LOGS)

    def is_finished(self) -> bool:
        return os.path.isfile(self.run_file) and os.path.isfile(os.path.join(self.root, MODEL_CONFIG))

    def read_record(self) -> dict:
        """The run file's content (UserError if unreadable)."""
        try:
            with open(self.run_file) as f:
                return json.load(f)
        except (OSError, ValueError):
            raise UserError(f"{self.run_file} is unreadable; pass --overwrite to start over") from None

    def checkpoint_dirs(self) -> list[tuple[int, str]]:
        """(step, path) of every `checkpoint-N` folder, oldest first."""
        if not os.path.isdir(self.root):
            return []
        return sorted((int(m.group(1)), os.path.join(self.root, name)) for name in os.listdir(self.root)
                      if (m := _CKPT.match(name)))

    def last_checkpoint(self) -> str | None:
        """The newest checkpoint whose save completed (trainer_state.json is written last)."""
        for _, path in reversed(self.checkpoint_dirs()):
            try:
                with open(os.path.join(path, "trainer_state.json")) as f:
                    json.load(f)
                return path
            except (OSError, ValueError):
                continue  # killed while saving: skip it
        return None

    def has_progress(self) -> bool:
        """Whether the run did any work worth keeping: a checkpoint, a model, a distillation. A run file
        alone (a start that failed, e.g. on a missing package) records nothing another command could lose."""
        return bool(self.checkpoint_dirs()) or os.path.isfile(os.path.join(self.root, MODEL_CONFIG)) \
            or os.path.isdir(os.path.join(self.root, DISTILL))

    def incomplete_checkpoints(self) -> list[str]:
        """Checkpoint folders newer than the last complete one (a save that was cut off)."""
        last = self.last_checkpoint()
        last_step = int(_CKPT.match(os.path.basename(last)).group(1)) if last else -1
        return [path for step, path in self.checkpoint_dirs() if step > last_step]

    def remove_checkpoints(self) -> None:
        for _, path in self.checkpoint_dirs():
            shutil.rmtree(path, ignore_errors=True)


def record_of(config, stage: str) -> dict:
    """What the run file records of `config`: JSON-plain, as it will read back."""
    from xft.config import to_flat

    return json.loads(json.dumps({"stage": stage, **to_flat(config)}, default=str))


@dataclass
class Plan:
    """What `prepare` decided: start fresh, resume from `resume`, or nothing to do (`done`)."""

    run: RunDir
    resume: str | None = None
    done: bool = False


def setting_defaults(cls) -> dict:
    """Flat setting name -> default of config class `cls` (settings without a default left out)."""
    from dataclasses import MISSING

    from xft.config import flat_settings

    return {name: slot.field.default for name, slot in flat_settings(cls).items()
            if slot.field.default is not MISSING}


def prepare(root: str, config, stage: str) -> Plan:
    """Decide what to do with run directory `root` for training `config` of `stage`, touching nothing."""
    return claim(root, record_of(config, stage), config.overwrite, setting_defaults(type(config)))


def claim(root: str, record: dict, overwrite: bool = False, defaults: dict | None = None) -> Plan:
    """Decide what to do with output directory `root` for the command `record` describes, touching nothing.

    A finished run of the same settings is `done`; an interrupted one resumes
    from its last complete checkpoint. UserError for a run of other settings
    unless `overwrite`, and for a non-empty directory xft did not write. A
    setting the recorded run lacks (one added to xft since) counts as its
    `defaults` value.
    """
    run = RunDir(root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f"output path {root} exists and is not a directory")
    if not os.path.isdir(root) or not os.listdir(root):
        return Plan(run)
    if not os.path.isfile(run.run_file):
        if os.path.isfile(os.path.join(root, "results.json")):  # what `xft eval --out` writes
            raise UserError(f"{root} holds the results of `xft eval`; choose a new or empty --out")
        legacy = " (a run of xft 0.1: its model is in final/)" if os.path.isdir(
            os.path.join(root, LEGACY_FINAL)) else ""
        raise UserError(f"output directory {root} is not empty and is not an xft output directory{legacy}; "
                        "choose a new or empty --out")
    if overwrite:
        return Plan(run)
    recorded = run.read_record()
    diff = list(settings_diff({**(defaults or {}), **recorded}, record, NON_SEMANTIC | RECORD_ONLY).values())
    if diff and not run.is_finished() and not run.has_progress():
        return Plan(run)  # `begin` records the new command over the failed start's
    if diff:
        raise UserError(refusal(root, recorded, record, diff, run.is_finished()))
    return Plan(run, done=True) if run.is_finished() else Plan(run, run.last_checkpoint())


# The command that writes each stage's run directory (its record's "stage").
COMMANDS = {"sft": "train", "merge": "merge", "upcycle": "upcycle"}
SHOWN_DIFFERENCES = 8  # a refusal lists this many differing settings, then says how many more


def refusal(root: str, recorded: dict, record: dict, diff: list[str], finished: bool) -> str:
    """Why `record`'s command may not use `root`, which holds `recorded`'s output: another subcommand's
    output (named, not its settings), or the settings that differ, every one of them counted."""
    what = "the finished model" if finished else "an interrupted run"
    fix = "pass --overwrite to replace it, or choose another --out" if finished else \
        "re-run the same command to resume it, or pass --overwrite to start over"
    old, new = (COMMANDS.get(r.get("stage"), r.get("stage")) for r in (recorded, record))
    if old != new:
        return (f"{root} holds {what} of `xft {old}`, not of `xft {new}`: choose another --out (or pass "
                f"--overwrite to replace it)")
    shown = "; ".join(diff[:SHOWN_DIFFERENCES])
    more = f"; and {len(diff) - SHOWN_DIFFERENCES} more" if len(diff) > SHOWN_DIFFERENCES else ""
    if finished:
        return f"{root} already holds the finished model of another command ({shown}{more}); {fix}"
    return f"{root} holds an interrupted run with other settings ({shown}{more}); {fix}"


def already_done(run: RunDir, command: str) -> str:
    """The line a re-run of a finished command prints."""
    return f"xft {command}: {run.root} already holds the finished model of this command; nothing to do"


def prepare_stage(config, stage: str, command: str) -> Plan:
    """`prepare` for a training stage run by `command`; a finished run says so once (main process)."""
    plan = prepare(config.out, config, stage)
    if plan.done:
        from accelerate import PartialState

        if PartialState().is_main_process:
            print(already_done(plan.run, command), flush=True)
    return plan


def start(run: RunDir, config, stage: str) -> None:
    """Create the run directory for training `config` (main process only); see `begin`."""
    begin(run, record_of(config, stage), config.overwrite)


def begin(run: RunDir, record: dict, overwrite: bool = False) -> None:
    """Create the output directory: clear what xft wrote there if overwriting, record the command."""
    if overwrite and os.path.isfile(run.run_file):
        clear(run)
    else:
        for path in run.incomplete_checkpoints():
            shutil.rmtree(path, ignore_errors=True)
    os.makedirs(run.root, exist_ok=True)
    if not os.path.isfile(run.run_file) or not run.has_progress():
        atomic_write_json(run.run_file, record)


def clear(run: RunDir) -> None:
    """Delete what a run wrote into `run.root` (config.json first, so it stops looking finished)."""
    outputs = run.read_record().get("outputs", []) if os.path.isfile(run.run_file) else []
    for name in [MODEL_CONFIG] + [n for n in outputs if n != MODEL_CONFIG]:
        path = os.path.join(run.root, os.path.basename(name))  # basename: a record never names a path outside
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    run.remove_checkpoints()
    shutil.rmtree(run.logs, ignore_errors=True)
    shutil.rmtree(os.path.join(run.root, DISTILL), ignore_errors=True)
    for name in (ROUTING_LOG, RUN_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run.root, name))


def staging(run: RunDir) -> str:
    """An empty directory inside the run directory to write the finished model into, for `publish`."""
    tmp = os.path.join(run.root, STAGING)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    os.makedirs(tmp)
    return tmp


def publish(run: RunDir, tmp: str) -> None:
    """Move the finished model's files from `tmp` (`staging`) into the run directory, `config.json` last.

    The names are recorded in the run file first, so `--overwrite` can delete
    exactly them later; the files get the modes plain writes would (umask).
    """
    follow_umask(tmp)  # safetensors writes 0600
    names = sorted(os.listdir(tmp), key=lambda n: n == MODEL_CONFIG)
    if MODEL_CONFIG not in names:
        raise RuntimeError(f"the finished model in {tmp} has no {MODEL_CONFIG}")
    atomic_write_json(run.run_file, {**run.read_record(), "outputs": names})
    for name in names:
        target = os.path.join(run.root, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(tmp, name), target)
    os.rmdir(tmp)
