"""The run directory: where a training stage keeps its checkpoints and its finished model.

Layout of `--out OUT`:

    OUT/run.json               the stage's config, written when training starts
    OUT/checkpoints/checkpoint-N/   resumable Trainer checkpoints (model, optimizer, RNG, ...)
    OUT/final/                 the finished model + tokenizer + model card README.md
                               (+ merge_coefficients.json), loadable with xft.load(OUT) and, for
                               dense models, AutoModelForCausalLM.from_pretrained(OUT/final)
    OUT/logs/                  TensorBoard (and other file-based) logs, kept after the run
    OUT/routing.jsonl          per-layer expert loads of an MoE run, one line per logging step

Guarantees:
* `OUT/final` appears only complete: it is written to a temporary sibling and
  renamed in one step, so an interrupted run never looks finished.
* A finished run is never silently replaced: starting again on it is a
  UserError unless `overwrite` is set.
* Re-running the same stage on an interrupted run resumes from its newest
  complete checkpoint; running a *different* config there is a UserError
  (resuming under other settings would silently change the schedule).
* `overwrite` deletes only what this module writes (run.json, checkpoints,
  final); a directory that is not a run directory is never deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass

from xft.artifacts import atomic_write_text, follow_umask  # noqa: F401  (follow_umask: for stage.finalize)
from xft.errors import UserError

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"
LOGS = "logs"
# Fields that do not change what a run computes; they may differ when resuming.
NON_SEMANTIC = {"overwrite", "progress", "report_to", "logging_steps", "save_total_limit", "num_workers",
                "save_steps", "keep_checkpoints", "eval_steps"}
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
        return os.path.join(self.root, CHECKPOINTS)

    @property
    def final(self) -> str:
        return os.path.join(self.root, FINAL)

    @property
    def logs(self) -> str:
        return os.path.join(self.root, LOGS)

    def is_finished(self) -> bool:
        return os.path.isfile(os.path.join(self.final, "config.json"))

    def last_checkpoint(self) -> str | None:
        """The newest checkpoint whose save completed (trainer_state.json is written last)."""
        if not os.path.isdir(self.checkpoints):
            return None
        steps = sorted((int(m.group(1)), name) for name in os.listdir(self.checkpoints)
                       if (m := _CKPT.match(name)))
        for _, name in reversed(steps):
            path = os.path.join(self.checkpoints, name)
            try:
                with open(os.path.join(path, "trainer_state.json")) as f:
                    json.load(f)
                return path
            except (OSError, ValueError):
                continue  # killed while saving: skip it
        return None

    def incomplete_checkpoints(self) -> list[str]:
        """Checkpoint folders newer than the last complete one (a save that was cut off)."""
        last = self.last_checkpoint()
        last_step = int(_CKPT.match(os.path.basename(last)).group(1)) if last else -1
        if not os.path.isdir(self.checkpoints):
            return []
        return [os.path.join(self.checkpoints, n) for n in os.listdir(self.checkpoints)
                if (m := _CKPT.match(n)) and int(m.group(1)) > last_step]


def _semantic(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NON_SEMANTIC}


def prepare(root: str, config, stage: str) -> tuple[RunDir, str | None]:
    """Decide what to do with run directory `root` for `config`, touching nothing.

    Returns the RunDir and the checkpoint to resume from (None: start fresh).
    Raises UserError for a finished run, a run of another config, or a
    directory that is not a run directory, unless `config.overwrite` allows it.
    """
    run = RunDir(root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f"output path {root} exists and is not a directory")
    if not os.path.isdir(root) or not os.listdir(root):
        return run, None
    if not os.path.isfile(run.run_file):
        raise UserError(f"output directory {root} is not empty and is not an xft run directory; "
                        "choose a new or empty --out")
    if config.overwrite:
        return run, None
    if run.is_finished():
        raise UserError(f"{root} already holds a finished model ({run.final}); "
                        "pass --overwrite to replace it, or choose another --out")
    try:
        with open(run.run_file) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise UserError(f"{run.run_file} is unreadable; pass --overwrite to start over") from None
    mine = {"stage": stage, **asdict(config)}
    old, new = _semantic(saved), _semantic(json.loads(json.dumps(mine)))
    diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        raise UserError(f"{root} holds an interrupted run with other settings ({'; '.join(diff[:4])}); "
                        "re-run the same command to resume it, or pass --overwrite to start over")
    return run, run.last_checkpoint()


def start(run: RunDir, config, stage: str) -> None:
    """Create the run directory (main process only): clear it if overwriting, record the config."""
    if config.overwrite:
        for path in (run.final, run.checkpoints):
            shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(run.run_file)
    else:
        for path in run.incomplete_checkpoints():
            shutil.rmtree(path, ignore_errors=True)
    os.makedirs(run.checkpoints, exist_ok=True)
    if not os.path.isfile(run.run_file):
        _write_json(run.run_file, {"stage": stage, **asdict(config)})


@contextlib.contextmanager
def atomic_dir(target: str):
    """Yield a temporary directory next to `target`; on success rename it to `target` in one step.

    On an exception the temporary directory is removed and `target` is untouched.
    An existing `target` is replaced only after the new one is complete.
    """
    parent = os.path.dirname(os.path.abspath(target)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        yield tmp
        follow_umask(tmp)  # mkdtemp made it 0700, safetensors writes 0600: the result follows the umask
        if os.path.exists(target):
            trash = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
            os.rename(target, os.path.join(trash, "x"))
            os.rename(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def write_json(path: str, obj) -> None:
    """Write `obj` as indented JSON atomically (temp file + rename)."""
    _write_json(path, obj)
