"""Instruction (and plain-text) training data: read, validate, format, tokenize.

XFT_METHOD.md §2: supervised fine-tuning with the loss on response tokens only,
prompts in the Magicoder template. This module turns a user's file into a
`datasets.Dataset` of `input_ids` / `labels` (labels are -100 on prompt and
padding tokens) and a collator that pads batches.

Guarantees:
* Everything is read and validated before anything is trained or written: a
  malformed line, a missing or non-string field, an empty file are reported as
  one `xft.errors.UserError` naming the file, the line (JSONL/JSON) or record
  (Parquet, `datasets` directory) and the field.
* Prompt and response are tokenized as separate segments and concatenated, so the
  label mask is exact and the training prompt tokenizes the same way as the
  prompt a user sends at inference (`format_prompt`).
* Shuffling and subsetting are deterministic in the seed.

Record kinds (`kind`):
* "instruction": `{"instruction": str, "response": str}` (field names configurable);
* "chat": `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`,
  loss on every assistant turn;
* "text": `{"text": str}`, loss on every token (pretraining).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from xft.errors import UserError

IGNORE_INDEX = -100  # label value the causal-LM loss skips


# ---------------------------------------------------------------- templates

@dataclass(frozen=True)
class Template:
    """A prompt template: `system` once, then per turn `turn.format(instruction=...)`, then the response.

    Turns after the first are joined with `separator` (multi-turn chat data).
    """

    system: str
    turn: str
    separator: str = "\n\n"


MAGICODER_SYSTEM = ("You are an exceptionally intelligent coding assistant that consistently "
                    "delivers accurate and reliable responses to user instructions.")

# Registry of prompt templates, chosen by name (`--template`).
TEMPLATES: dict[str, Template] = {
    # The paper's template (XFT_METHOD.md §2), used for training and evaluation.
    "magicoder": Template(system=MAGICODER_SYSTEM + "\n\n",
                          turn="@@ Instruction\n{instruction}\n\n@@ Response\n"),
    "alpaca": Template(system="Below is an instruction that describes a task. "
                              "Write a response that appropriately completes the request.\n\n",
                       turn="### Instruction:\n{instruction}\n\n### Response:\n"),
    # No template: the instruction text is the prompt, verbatim.
    "none": Template(system="", turn="{instruction}", separator=""),
}


def get_template(name: str) -> Template:
    """The registered template `name`; UserError listing the choices otherwise."""
    if name not in TEMPLATES:
        raise UserError(f"unknown template {name!r}; choose one of {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def format_prompt(instruction: str, template: str = "magicoder", system: str | None = None) -> str:
    """The prompt a model trained with `template` expects for `instruction` (generation starts after it)."""
    t = get_template(template)
    return (t.system if system is None else system + "\n\n") + t.turn.format(instruction=instruction)


# ---------------------------------------------------------------- config

KINDS = ("auto", "instruction", "chat", "text")


@dataclass
class DataConfig:
    """Where the data is and how to turn it into training examples."""

    path: str = field(metadata={"help": "JSONL, JSON or Parquet file, or a directory saved with "
                                        "datasets.save_to_disk"})
    kind: str = field(default="auto", metadata={
        "help": "record kind: instruction (prompt/response fields), chat (a messages list), text "
                "(pretraining, loss on all tokens), or auto (detected from the first record)"})
    instruction_field: str = field(default="instruction", metadata={"help": "field holding the instruction"})
    response_field: str = field(default="response", metadata={"help": "field holding the response"})
    messages_field: str = field(default="messages", metadata={"help": "field holding chat messages"})
    text_field: str = field(default="text", metadata={"help": "field holding plain text (kind=text)"})
    template: str = field(default="magicoder", metadata={
        "help": f"prompt template: {', '.join(TEMPLATES)}"})
    max_length: int = field(default=1024, metadata={"help": "truncate examples to this many tokens"})
    seed: int = field(default=42, metadata={"help": "seed of the shuffle (and of the subset)"})
    subset: float | None = field(default=None, metadata={
        "help": "use only part of the data: a fraction in (0, 1] or a number of records (> 1)"})


# ---------------------------------------------------------------- reading

@dataclass
class Records:
    """Raw records and, for each, where it came from (for error messages)."""

    rows: list[dict]
    where: list[str]  # e.g. "data.jsonl line 3", "data.parquet record 7"


def read_records(path: str) -> Records:
    """Read every record of a JSONL / JSON / Parquet file or a `datasets` directory.

    Raises UserError naming the file and line on anything unreadable.
    """
    if not os.path.exists(path):
        raise UserError(f"data file {path} does not exist")
    if os.path.isdir(path):
        return _read_datasets_dir(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        return _read_parquet(path)
    if ext == ".json":
        return _read_json(path)
    return _read_jsonl(path)  # .jsonl, .ndjson, anything else: one JSON object per line


def _read_jsonl(path: str) -> Records:
    rows, where = [], []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
                _check_is_record(row, f"{path} line {lineno}")
                rows.append(row)
                where.append(f"{path} line {lineno}")
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text (expected JSON lines)") from None
    return Records(rows, where)


def _read_json(path: str) -> Records:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"train": [...]} or {"data": [...]}
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
    where = [f"{path} record {i + 1}" for i in range(len(data))]
    for row, w in zip(data, where):
        _check_is_record(row, w)
    return Records(data, where)


def _read_parquet(path: str) -> Records:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    return Records(rows, [f"{path} record {i + 1}" for i in range(len(rows))])


def _read_datasets_dir(path: str) -> Records:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise UserError(f"{path} is a directory but not a dataset saved with datasets.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"{path}: dataset has no 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    rows = ds.to_list()
    return Records(rows, [f"{path} record {i + 1}" for i in range(len(rows))])


def _check_is_record(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object (a record), got a {type(row).__name__}")


# ---------------------------------------------------------------- validation

def detect_kind(first: dict, cfg: DataConfig) -> str:
    """The record kind of `first` under `cfg`'s field names (cfg.kind unless it is "auto")."""
    if cfg.kind != "auto":
        if cfg.kind not in KINDS:
            raise UserError(f"unknown data kind {cfg.kind!r}; choose one of {', '.join(KINDS)}")
        return cfg.kind
    if cfg.instruction_field in first or cfg.response_field in first:
        return "instruction"
    if cfg.messages_field in first:
        return "chat"
    if cfg.text_field in first:
        return "text"
    raise UserError(
        f"cannot tell the record kind: the first record has fields {sorted(first)} but none of "
        f"'{cfg.instruction_field}'/'{cfg.response_field}', '{cfg.messages_field}' or '{cfg.text_field}' "
        f"(set the field names with --instruction-field/--response-field, --messages-field or --text-field)")


def _require_str(row: dict, name: str, where: str, flag: str) -> None:
    if name not in row:
        raise UserError(f"{where}: record has no '{name}' field (fields: {sorted(row)}; set {flag})")
    if not isinstance(row[name], str):
        raise UserError(f"{where}: field '{name}' must be a string, got {type(row[name]).__name__}")


def validate_records(records: Records, kind: str, cfg: DataConfig) -> None:
    """Check every record has the fields `kind` needs, with the right types."""
    for row, where in zip(records.rows, records.where):
        if kind == "instruction":
            _require_str(row, cfg.instruction_field, where, "--instruction-field")
            _require_str(row, cfg.response_field, where, "--response-field")
        elif kind == "text":
            _require_str(row, cfg.text_field, where, "--text-field")
        else:
            _validate_messages(row, cfg.messages_field, where)


def _validate_messages(row: dict, name: str, where: str) -> None:
    msgs = row.get(name)
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: field '{name}' must be a non-empty list of messages (set --messages-field)")
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise UserError(f"{where}: '{name}'[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise UserError(f"{where}: '{name}'[{i}] has role {m['role']!r}; expected system, user or assistant")
    if not any(m["role"] == "assistant" for m in msgs):
        raise UserError(f"{where}: '{name}' has no assistant message to learn from")


# ---------------------------------------------------------------- formatting

def to_segments(row: dict, kind: str, cfg: DataConfig) -> list[tuple[str, bool]]:
    """A record as (text, trained_on) segments, in order; EOS is added at tokenization."""
    if kind == "text":
        return [(row[cfg.text_field], True)]
    t = get_template(cfg.template)
    if kind == "instruction":
        return [(t.system + t.turn.format(instruction=row[cfg.instruction_field]), False),
                (row[cfg.response_field], True)]
    # chat: a system message replaces the template's system text; user turns become
    # template turns; assistant turns are trained on.
    msgs = row[cfg.messages_field]
    system = t.system
    if msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"] + "\n\n", msgs[1:]
    segments, prompt = [], system
    for m in msgs:
        if m["role"] == "user":
            if segments:  # a later turn: separate it from the previous response
                prompt += t.separator
            prompt += t.turn.format(instruction=m["content"])
        elif m["role"] == "assistant":
            segments += [(prompt, False), (m["content"], True)]
            prompt = ""
    return [s for s in segments if s[0]]


class Tokenizer:
    """Turns segments into `input_ids` / `labels` with a Hugging Face tokenizer.

    BOS is prepended when the tokenizer adds one by itself; EOS ends every
    example and is trained on (so the model learns to stop). No truncation here.
    """

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no EOS token; it cannot mark the end of a response")
        self.tok = tokenizer
        probe = tokenizer("x").input_ids
        self.bos = [tokenizer.bos_token_id] if (
            tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id) else []

    def __call__(self, batch: list[list[tuple[str, bool]]]) -> list[dict[str, list[int]]]:
        # Tokenize all segments of all examples in one fast batched call.
        flat = [text for segs in batch for text, _ in segs]
        ids = self.tok(flat, add_special_tokens=False).input_ids if flat else []
        out, k = [], 0
        for segs in batch:
            input_ids, labels = list(self.bos), [IGNORE_INDEX] * len(self.bos)
            for _, trained in segs:
                piece = ids[k]
                k += 1
                input_ids += piece
                labels += piece if trained else [IGNORE_INDEX] * len(piece)
            input_ids.append(self.tok.eos_token_id)
            labels.append(self.tok.eos_token_id)
            out.append({"input_ids": input_ids, "labels": labels})
        return out


# ---------------------------------------------------------------- the dataset

@dataclass
class DataStats:
    """What `load_dataset` did, for the run summary."""

    path: str
    kind: str
    records: int
    examples: int
    dropped_no_target: int  # examples whose trained tokens were all truncated away
    truncated: int
    tokens: int
    target_tokens: int


def load_dataset(cfg: DataConfig, tokenizer, batch_size: int = 1000):
    """Read, validate, shuffle, subset and tokenize `cfg.path`.

    Returns `(dataset, stats)`: a `datasets.Dataset` with `input_ids` and `labels`
    columns (lists of ints, at most `cfg.max_length` long) and a `DataStats`.
    """
    import datasets

    if cfg.max_length < 2:
        raise UserError(f"max length must be at least 2 tokens, got {cfg.max_length}")
    records = read_records(cfg.path)
    if not records.rows:
        raise UserError(f"data file {cfg.path} is empty (no records)")
    kind = detect_kind(records.rows[0], cfg)
    validate_records(records, kind, cfg)

    order = _shuffled_subset(len(records.rows), cfg.subset, cfg.seed)
    tok = Tokenizer(tokenizer)
    columns = {"input_ids": [], "labels": []}
    dropped = truncated = n_tokens = n_target = 0
    for start in range(0, len(order), batch_size):
        chunk = [to_segments(records.rows[i], kind, cfg) for i in order[start:start + batch_size]]
        for ex in tok(chunk):
            was_truncated = len(ex["input_ids"]) > cfg.max_length
            ex = {k: v[: cfg.max_length] for k, v in ex.items()}
            n_target_ex = sum(lab != IGNORE_INDEX for lab in ex["labels"][1:])  # positions 1.. are predicted
            if n_target_ex == 0:
                dropped += 1
                continue
            truncated += was_truncated
            n_tokens += len(ex["input_ids"])
            n_target += n_target_ex
            columns["input_ids"].append(ex["input_ids"])
            columns["labels"].append(ex["labels"])
    if not columns["input_ids"]:
        raise UserError(f"{cfg.path}: no example keeps any response token within max length {cfg.max_length}")
    stats = DataStats(cfg.path, kind, len(records.rows), len(columns["input_ids"]), dropped, truncated,
                      n_tokens, n_target)
    return datasets.Dataset.from_dict(columns), stats


def _shuffled_subset(n: int, subset: float | None, seed: int) -> list[int]:
    """A seeded permutation of range(n), cut to `subset` (fraction or count)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    if subset is None:
        return order
    if subset <= 0:
        raise UserError(f"subset must be a positive fraction or count, got {subset}")
    count = max(1, round(subset * n)) if subset <= 1 else int(subset)
    if subset > 1 and subset != int(subset):
        raise UserError(f"subset above 1 is a number of records and must be whole, got {subset}")
    return order[: min(count, n)]


class Collator:
    """Pads a list of examples into a batch (right padding).

    Returns `input_ids` [B, T], `attention_mask` [B, T] and `labels` [B, T]
    (-100 on padding), T the longest example of the batch.
    """

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        import torch

        T = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), T), self.pad, dtype=torch.long)
        labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), T), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.as_tensor(e["input_ids"])
            labels[i, :n] = torch.as_tensor(e["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else EOS (padding is masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
