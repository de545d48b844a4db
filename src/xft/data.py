"""Instruction (and plain-text) training data: read, validate, format, tokenize.

docs/method.md §2: supervised fine-tuning with the loss on response tokens only,
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
* "prompt-completion" (TRL's format): `{"prompt": str, "completion": str}`, the
  prompt verbatim and loss on the completion; or both lists of messages
  (conversational), loss on the completion's assistant turns;
* "text": `{"text": str}`, loss on every token (pretraining).

Template "chat" renders conversations with the tokenizer's own chat template
(`tokenizer.apply_chat_template`); instruction records become a user and an
assistant message. The rendered text is cut at each assistant turn, so the
label mask stays exact.

An optional validation split (`eval_path`, or `eval_fraction` of the records
held out, seeded) is tokenized the same way (`load_splits`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from xft.artifacts import json_error, read_jsonl
from xft.config import KINDS, DataConfig  # noqa: F401  (DataConfig: the config of this module)
from xft.errors import UserError

IGNORE_INDEX = -100  # label value the causal-LM loss skips


# ---------------------------------------------------------------- templates

@dataclass(frozen=True)
class Template:
    """A prompt template: `system` once, then per turn `turn.format(instruction=...)`, then the response.

    Turns after the first are joined with `separator` (multi-turn chat data).
    `from_tokenizer`: the conversation is rendered by the tokenizer's own chat
    template instead (`system` and `turn` unused).
    """

    system: str
    turn: str
    separator: str = "\n\n"
    from_tokenizer: bool = False


MAGICODER_SYSTEM = ("You are an exceptionally intelligent coding assistant that consistently "
                    "delivers accurate and reliable responses to user instructions.")

# Registry of prompt templates, chosen by name (`--template`).
TEMPLATES: dict[str, Template] = {
    # The paper's template (docs/method.md §2), used for training and evaluation.
    "magicoder": Template(system=MAGICODER_SYSTEM + "\n\n",
                          turn="@@ Instruction\n{instruction}\n\n@@ Response\n"),
    "alpaca": Template(system="Below is an instruction that describes a task. "
                              "Write a response that appropriately completes the request.\n\n",
                       turn="### Instruction:\n{instruction}\n\n### Response:\n"),
    # No template: the instruction text is the prompt, verbatim.
    "none": Template(system="", turn="{instruction}", separator=""),
    # The model's own chat template (tokenizer.apply_chat_template), as HF / TRL chat fine-tuning does.
    "chat": Template(system="", turn="", separator="", from_tokenizer=True),
}


def get_template(name: str) -> Template:
    """The registered template `name`; UserError listing the choices otherwise."""
    if name not in TEMPLATES:
        raise UserError(f"unknown template {name!r}; choose one of {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def format_prompt(instruction: str, template: str = "magicoder", system: str | None = None,
                  tokenizer=None) -> str:
    """The prompt a model trained with `template` expects for `instruction` (generation starts after it).

    Template "chat" needs the model's `tokenizer` (its chat template renders the prompt).
    """
    t = get_template(template)
    if t.from_tokenizer:
        if tokenizer is None:
            raise UserError("template 'chat' uses the model's own chat template: pass the tokenizer")
        msgs = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": instruction}]
        return render_chat(tokenizer, msgs, generation_prompt=True)
    return (t.system if system is None else system + "\n\n") + t.turn.format(instruction=instruction)


def check_chat_template(tokenizer, template: str) -> None:
    """UserError if `template` is "chat" and `tokenizer` has no chat template."""
    if get_template(template).from_tokenizer and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise UserError(f"--template chat uses the tokenizer's chat template, but {name} has none "
                        f"(a base model?); use --template {' / '.join(t for t in TEMPLATES if t != 'chat')}")


def render_chat(tokenizer, messages: list[dict], generation_prompt: bool, where: str = "") -> str:
    """`messages` as text, rendered by the tokenizer's chat template."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # a template may reject a conversation (jinja2 TemplateError, e.g. role order)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{where + ': ' if where else ''}the tokenizer's chat template rejects this "
                        f"conversation ({first})") from None


# ---------------------------------------------------------------- reading

PROMPT, COMPLETION = "prompt", "completion"  # TRL's field names (prompt-completion records)


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
        records = _read_datasets_dir(path)
    else:
        ext = os.path.splitext(path)[1].lower()
        reader = {".parquet": _read_parquet, ".json": _read_json}.get(ext, _read_jsonl)  # else: JSON lines
        records = reader(path)
    for row in records.rows:
        _from_sharegpt(row)
    return records


# ShareGPT's speaker names -> chat roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "model": "assistant"}


def _from_sharegpt(row: dict) -> None:
    """A ShareGPT record (`conversations`: [{"from": "human"|"gpt"|..., "value": ...}]) gains `messages`.

    The usual role/content form, so chat records of either format train alike; unknown speakers are kept
    as they are and reported by the messages check.
    """
    turns = row.get("conversations")
    if "messages" in row or not isinstance(turns, list) or not all(
            isinstance(t, dict) and "from" in t and "value" in t for t in turns):
        return
    row["messages"] = [{"role": SHAREGPT_ROLES.get(str(t["from"]).lower(), t["from"]), "content": t["value"]}
                       for t in turns]


def _read_jsonl(path: str) -> Records:
    rows, where = [], []
    for lineno, row in read_jsonl(path):
        _check_is_record(row, f"{path} line {lineno}")
        rows.append(row)
        where.append(f"{path} line {lineno}")
    return Records(rows, where)


def _read_json(path: str) -> Records:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(json_error(path, e.lineno, e)) from None
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
    if cfg.kind != "auto":  # DataConfig checked it is one of KINDS
        return cfg.kind
    if cfg.instruction_field in first or cfg.response_field in first:
        return "instruction"
    if cfg.messages_field in first:
        return "chat"
    if PROMPT in first and COMPLETION in first:
        return "prompt-completion"
    if cfg.text_field in first:
        return "text"
    raise UserError(
        f"cannot tell the record kind: the first record has fields {sorted(first)} but none of "
        f"'{cfg.instruction_field}'/'{cfg.response_field}', '{cfg.messages_field}', '{PROMPT}'/'{COMPLETION}' "
        f"or '{cfg.text_field}' (set the field names with --instruction-field/--response-field, "
        f"--messages-field or --text-field)")


# Field names other data sets use for an instruction-tuning record's two parts (for hints, never guessed).
_LIKELY = {"--instruction-field": ("instruction", "prompt", "question", "query", "problem"),
           "--response-field": ("response", "output", "completion", "answer", "solution")}


def _require_str(row: dict, name: str, where: str, flag: str) -> None:
    if name not in row:
        likely = next((f for f in _LIKELY.get(flag, ()) if f in row and f != name), None)
        hint = f"; '{likely}' looks like it" if likely else ""
        raise UserError(f"{where}: record has no '{name}' field (fields: {sorted(row)}; set {flag}{hint})")
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
        elif kind == "prompt-completion":
            _validate_prompt_completion(row, where)
        else:
            _validate_messages(row, cfg.messages_field, where)


def _validate_messages(row: dict, name: str, where: str, flag: str = " (set --messages-field)") -> None:
    msgs = row.get(name)
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: field '{name}' must be a non-empty list of messages{flag}")
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise UserError(f"{where}: '{name}'[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise UserError(f"{where}: '{name}'[{i}] has role {m['role']!r}; expected system, user or assistant")
    if not any(m["role"] == "assistant" for m in msgs):
        raise UserError(f"{where}: '{name}' has no assistant message to learn from")


def _validate_prompt_completion(row: dict, where: str) -> None:
    for name in (PROMPT, COMPLETION):
        if name not in row:
            raise UserError(f"{where}: record has no '{name}' field (fields: {sorted(row)})")
    prompt, completion = row[PROMPT], row[COMPLETION]
    if isinstance(prompt, str) and isinstance(completion, str):
        return
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise UserError(f"{where}: '{PROMPT}' and '{COMPLETION}' must both be strings or both lists of "
                        f"messages, got {type(prompt).__name__} and {type(completion).__name__}")
    if prompt:
        _validate_messages({PROMPT: prompt + [{"role": "assistant", "content": ""}]}, PROMPT, where, "")
    _validate_messages(row, COMPLETION, where, "")


# ---------------------------------------------------------------- formatting

# Alpaca-style records put the instruction's data in a separate field, appended to the instruction when set.
ALPACA_INPUT = "input"


def _instruction(row: dict, cfg: DataConfig) -> str:
    """The instruction of an instruction record, with an Alpaca-style non-empty `input` appended."""
    extra = row.get(ALPACA_INPUT) if cfg.instruction_field != ALPACA_INPUT else None
    return row[cfg.instruction_field] + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")


def to_segments(row: dict, kind: str, cfg: DataConfig, tokenizer=None,
                where: str = "") -> list[tuple[str, bool]]:
    """A record as (text, trained_on) segments, in order; EOS is added at tokenization.

    Template "chat" needs the HF `tokenizer` (its chat template renders the text).
    """
    if kind == "text":
        return [(row[cfg.text_field], True)]
    if kind == "prompt-completion" and isinstance(row[PROMPT], str):
        return [s for s in [(row[PROMPT], False), (row[COMPLETION], True)] if s[0]]  # TRL: prompt verbatim
    if kind == "instruction":
        msgs = [{"role": "user", "content": _instruction(row, cfg)},
                {"role": "assistant", "content": row[cfg.response_field]}]
        trained_from = 0
    elif kind == "prompt-completion":  # conversational: train on the completion's assistant turns only
        msgs, trained_from = row[PROMPT] + row[COMPLETION], len(row[PROMPT])
    else:
        msgs, trained_from = row[cfg.messages_field], 0
    t = get_template(cfg.template)
    if t.from_tokenizer:
        return _rendered_segments(tokenizer, msgs, trained_from, where)
    return _template_segments(t, msgs, trained_from)


def _template_segments(t: Template, msgs: list[dict], trained_from: int) -> list[tuple[str, bool]]:
    """A conversation in an xft template: a system message replaces the template's system text, user
    turns become template turns, assistant turns (from index `trained_from`) are trained on."""
    system, start = t.system, 0
    if msgs[0]["role"] == "system":
        system, start = msgs[0]["content"] + "\n\n", 1
    segments, prompt = [], system
    for i, m in enumerate(msgs[start:], start):
        if m["role"] == "user":
            if segments:  # a later turn: separate it from the previous response
                prompt += t.separator
            prompt += t.turn.format(instruction=m["content"])
        elif m["role"] == "assistant":
            segments += [(prompt, False), (m["content"], i >= trained_from)]
            prompt = ""
    return [s for s in segments if s[0]]


def _rendered_segments(tokenizer, msgs: list[dict], trained_from: int, where: str) -> list[tuple[str, bool]]:
    """A conversation rendered by the tokenizer's chat template, cut at each assistant turn.

    Turn i's text is render(msgs[:i+1]) minus render(msgs[:i], generation prompt): the template's own
    end-of-turn marker is part of the trained assistant text, the generation prompt is not.
    """
    segments, done = [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, msgs[:i], generation_prompt=True, where=where)
        full = render_chat(tokenizer, msgs[: i + 1], generation_prompt=False, where=where)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UserError(f"{where}: the tokenizer's chat template renders this conversation differently "
                            "when a turn is added, so the prompt cannot be masked exactly; use another "
                            "--template")
        segments += [(prompt[len(done):], False), (full[len(prompt):], i >= trained_from)]
        done = full
    return [s for s in segments if s[0]]


class Tokenizer:
    """Turns segments into `input_ids` / `labels` with a Hugging Face tokenizer.

    BOS is prepended when the tokenizer adds one by itself; EOS ends every
    example and is trained on (so the model learns to stop). Text that already
    starts with BOS or ends with EOS (a chat template's) gets no second one.
    No truncation here.
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
            bos = [] if segs and self.tok.bos_token and segs[0][0].startswith(self.tok.bos_token) else self.bos
            input_ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
            for _, trained in segs:
                piece = ids[k]
                k += 1
                input_ids += piece
                labels += piece if trained else [IGNORE_INDEX] * len(piece)
            if not (segs and segs[-1][0].rstrip().endswith(self.tok.eos_token)):
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
    records: int  # records used (after holding out validation records and taking the subset)
    examples: int
    dropped_no_target: int  # examples whose trained tokens were all truncated away
    truncated: int
    tokens: int
    target_tokens: int


@dataclass
class Splits:
    """The tokenized training data and, when asked for, the validation data (`datasets.Dataset`s)."""

    train: Any
    stats: DataStats
    eval: Any = None
    eval_stats: DataStats | None = None


def load_dataset(cfg: DataConfig, tokenizer, batch_size: int = 1000):
    """Read, validate, shuffle, subset and tokenize `cfg.path`.

    Returns `(dataset, stats)`: a `datasets.Dataset` with `input_ids` and `labels`
    columns (lists of ints, at most `cfg.max_length` long) and a `DataStats`.
    Records held out by `cfg.eval_fraction` are not in it (see `load_splits`).
    """
    splits = load_splits(cfg, tokenizer, batch_size)
    return splits.train, splits.stats


def load_splits(cfg: DataConfig, tokenizer, batch_size: int = 1000) -> Splits:
    """The training data of `cfg` and its validation data (`cfg.eval_path` or `cfg.eval_fraction` held out).

    Held-out records are the first `eval_fraction` of the seeded permutation of
    all records; `subset` then applies to the rest, so the validation set does
    not depend on the subset and never overlaps the training records.
    """
    if cfg.max_length < 2:
        raise UserError(f"max length must be at least 2 tokens, got {cfg.max_length}")
    check_chat_template(tokenizer, cfg.template)
    records, kind = _read_valid(cfg.path, cfg)
    held_out, order = _split(_permutation(len(records.rows), cfg.seed), cfg)
    train, stats = _tokenize(records, order, kind, cfg, tokenizer, cfg.path, batch_size)
    splits = Splits(train, stats)
    if held_out:
        splits.eval, splits.eval_stats = _tokenize(records, held_out, kind, cfg, tokenizer,
                                                   f"{cfg.path} (held out)", batch_size)
    elif cfg.eval_path:
        eval_records, eval_kind = _read_valid(cfg.eval_path, cfg)
        splits.eval, splits.eval_stats = _tokenize(eval_records, list(range(len(eval_records.rows))), eval_kind,
                                                   cfg, tokenizer, cfg.eval_path, batch_size)
    return splits


def _split(order: list[int], cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(held-out, training) records of `order`: the first `eval_fraction` held out, `subset` of the rest."""
    held_out: list[int] = []
    if cfg.eval_fraction:  # DataConfig checked it is in (0, 1) and that there is no eval_path
        n_eval = max(1, round(cfg.eval_fraction * len(order)))
        if n_eval >= len(order):
            raise UserError(f"eval fraction {cfg.eval_fraction} of {len(order)} records leaves none to train on")
        held_out, order = order[:n_eval], order[n_eval:]
    return held_out, _cut(order, cfg.subset)


def training_records(n: int, cfg: DataConfig) -> int:
    """How many of `n` records `load_splits` trains on (before dropping those with no response token left)."""
    return len(_split(list(range(n)), cfg)[1])


def _read_valid(path: str, cfg: DataConfig) -> tuple[Records, str]:
    """The records of `path` and their kind, every record validated."""
    records = read_records(path)
    if not records.rows:
        raise UserError(f"data file {path} is empty (no records)")
    kind = detect_kind(records.rows[0], cfg)
    validate_records(records, kind, cfg)
    return records, kind


def _tokenize(records: Records, order: list[int], kind: str, cfg: DataConfig, tokenizer, label: str,
              batch_size: int):
    """(`datasets.Dataset`, DataStats) of the records at `order`, tokenized and cut to max length."""
    import datasets

    tok = Tokenizer(tokenizer)
    columns = {"input_ids": [], "labels": []}
    dropped = truncated = n_tokens = n_target = 0
    for start in range(0, len(order), batch_size):
        chunk = [to_segments(records.rows[i], kind, cfg, tokenizer, records.where[i])
                 for i in order[start:start + batch_size]]
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
        raise UserError(f"{label}: no example keeps any response token within max length {cfg.max_length}")
    stats = DataStats(label, kind, len(order), len(columns["input_ids"]), dropped, truncated, n_tokens, n_target)
    return datasets.Dataset.from_dict(columns), stats


def _permutation(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n)."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _cut(order: list[int], subset: float | None) -> list[int]:
    """The first `subset` (a fraction in (0, 1] or a count) of `order`."""
    if subset is None:
        return order
    n = len(order)
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
