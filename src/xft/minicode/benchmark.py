"""MiniCode as a benchmark and as files: HumanEval-format tasks and JSONL splits.

`load_tasks(split="eval")` is what `xft eval --benchmark minicode` runs, and
`load_tasks(split="valid")` what `--benchmark minicode-valid` runs;
`write_splits(out_dir)` writes the four splits as JSONL
(`python -m xft.minicode --out DIR`).
"""

from __future__ import annotations

import json
from pathlib import Path

from xft.errors import UserError
from xft.minicode.phrasing import format_response
from xft.minicode.splits import (
    DEFAULT_SIZES, Problem, eval_problems, pretrain_texts, train_records, valid_problems,
)
from xft.minicode.unit_tests import check_source

SPLITS = ("pretrain", "train", "eval", "valid")
# The splits with tests: name -> (problems, task id prefix).
_TASK_SPLITS = {"eval": (eval_problems, "MiniCode"), "valid": (valid_problems, "MiniCodeValid")}


def _task(prefix: str, index: int, problem: Problem) -> dict:
    return {
        "task_id": f"{prefix}/{index}",
        "prompt": problem.instruction,
        "entry_point": problem.entry_point,
        "canonical_solution": problem.solution,
        "test": check_source(list(problem.tests)),
        # Extra fields, for per-family / per-generalization breakdowns.
        "family": problem.spec.family,
        "generalization": problem.generalization,
        "response": format_response(problem.solution),
    }


def load_tasks(split: str = "eval", seed: int = 0, size: int | None = None) -> list[dict]:
    """MiniCode evaluation (`split="eval"`) or validation (`split="valid"`) problems in HumanEval format.

    Each dict has `task_id` ("MiniCode/N", or "MiniCodeValid/N"), `prompt` (the
    instruction text), `entry_point`, `canonical_solution` (full function source)
    and `test` (source defining `check(candidate)`), plus `family`,
    `generalization` ("composition" | "phrasing" | "valid") and `response` (the
    ideal answer, fenced). `size` defaults to DEFAULT_SIZES[split] (400 / 200).
    """
    if split not in _TASK_SPLITS:
        raise UserError(f"MiniCode tasks exist for splits 'eval' and 'valid' only (got {split!r}); "
                        "the 'train' and 'pretrain' splits are text data: see write_splits()")
    generate, prefix = _TASK_SPLITS[split]
    return [_task(prefix, i, p) for i, p in enumerate(generate(seed, size or DEFAULT_SIZES[split]))]


def split_records(split: str, seed: int = 0, size: int | None = None) -> list[dict]:
    """The JSON records of one split: pretrain `{"text"}`, train `{"instruction", "response", "family"}`,
    eval and valid the `load_tasks` dicts."""
    if split == "pretrain":
        return [{"text": t} for t in pretrain_texts(seed, size or DEFAULT_SIZES["pretrain"])]
    if split == "train":
        return train_records(seed, size or DEFAULT_SIZES["train"])
    if split in _TASK_SPLITS:
        return load_tasks(split, seed, size)
    raise UserError(f"unknown MiniCode split {split!r}; expected one of {', '.join(SPLITS)}")


def write_splits(out_dir: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write `{split}.jsonl` for every split into `out_dir`; returns split -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    paths = {}
    for split in SPLITS:
        path = out / f"{split}.jsonl"
        with path.open("w") as f:
            for record in split_records(split, seed, sizes[split]):
                f.write(json.dumps(record) + "\n")
        paths[split] = path
    return paths
