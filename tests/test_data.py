"""xft.data: formatting, label masks, truncation, shuffling, and every bad-input message."""

import json

import pytest

from xft.data import (
    IGNORE_INDEX, MAGICODER_SYSTEM, Collator, DataConfig, format_prompt, load_dataset, load_splits, read_records,
)
from xft.errors import UserError
from xft.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    corpus = [MAGICODER_SYSTEM + "\n\n@@ Instruction\nadd one\n\n@@ Response\nreturn x + 1"] * 4
    return tiny_tokenizer(corpus)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def trained_text(tok, ex):
    return tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX])


def test_magicoder_template_and_response_only_labels(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "add one", "response": "return x + 1"}])
    ds, stats = load_dataset(DataConfig(path=path), tok)
    ex = ds[0]
    assert stats.kind == "instruction" and stats.examples == 1
    prompt = format_prompt("add one")
    assert prompt == (MAGICODER_SYSTEM + "\n\n@@ Instruction\nadd one\n\n@@ Response\n")
    assert tok.decode(ex["input_ids"]) == prompt + "return x + 1" + tok.eos_token
    # Loss only on the response and the EOS that ends it; the prompt tokens are exactly the prompt's.
    assert trained_text(tok, ex) == "return x + 1" + tok.eos_token
    n_prompt = ex["labels"].index(next(lab for lab in ex["labels"] if lab != IGNORE_INDEX))
    assert ex["input_ids"][:n_prompt] == tok(prompt, add_special_tokens=False).input_ids


def test_custom_fields_and_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "hi", "a": "yo"}])
    cfg = DataConfig(path=path, instruction_field="q", response_field="a", template="alpaca")
    ex = load_dataset(cfg, tok)[0][0]
    assert "### Instruction:\nhi" in tok.decode(ex["input_ids"])
    assert trained_text(tok, ex) == "yo" + tok.eos_token


def test_chat_messages_train_on_every_assistant_turn(tmp_path, tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "two"},
            {"role": "assistant", "content": "A2"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    ds, stats = load_dataset(DataConfig(path=path), tok)
    ex = ds[0]
    text = tok.decode(ex["input_ids"])
    assert stats.kind == "chat" and text.startswith("Be brief.\n\n@@ Instruction\none")
    assert "\n\n@@ Instruction\ntwo\n\n@@ Response\nA2" in text and MAGICODER_SYSTEM not in text
    assert trained_text(tok, ex) == "A1A2" + tok.eos_token


def test_text_mode_trains_on_all_tokens(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "def f(x):\n    return x\n"}])
    ex = load_dataset(DataConfig(path=path, kind="text"), tok)[0][0]
    assert ex["labels"] == ex["input_ids"]
    assert tok.decode(ex["input_ids"]) == "def f(x):\n    return x\n" + tok.eos_token


def test_truncation_and_examples_without_targets_are_dropped(tmp_path, tok):
    rows = [{"instruction": "add one", "response": "return x + 1 " * 20},
            {"instruction": "add one " * 200, "response": "never seen"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds, stats = load_dataset(DataConfig(path=path, max_length=64), tok)
    assert stats.records == 2 and stats.examples == 1 and stats.dropped_no_target == 1
    assert stats.truncated == 1 and all(len(e["input_ids"]) == 64 for e in ds)


def test_shuffle_is_deterministic_and_subsets(tmp_path, tok):
    rows = [{"instruction": f"task {i}", "response": f"r{i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)

    def order(**kw):
        ds = load_dataset(DataConfig(path=path, **kw), tok)[0]
        return [trained_text(tok, e) for e in ds]

    assert order(seed=1) == order(seed=1)
    assert order(seed=1) != order(seed=2)
    assert sorted(order(seed=1)) == sorted(f"r{i}{tok.eos_token}" for i in range(20))
    assert order(seed=1, subset=0.25) == order(seed=1)[:5]
    assert order(seed=1, subset=7) == order(seed=1)[:7]


def test_json_parquet_and_datasets_dir(tmp_path, tok):
    import datasets

    rows = [{"instruction": "a", "response": "b"}, {"instruction": "c", "response": "d"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    for name in ("d.json", "d.parquet", "ds"):
        assert read_records(str(tmp_path / name)).rows == rows
        assert load_dataset(DataConfig(path=str(tmp_path / name)), tok)[1].examples == 2


def test_collator_pads_right_with_ignored_labels():
    batch = Collator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                      {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


@pytest.mark.parametrize("content, expected", [
    ('{"instruction": "a", "response": "b"}\n{"instruction": "a", "response": "b"}\n{"instruction": "a",,}\n',
     ["d.jsonl line 3", "malformed JSON"]),
    ('{"instruction": "a", "response": "b"}\n{"instruction": "a", "answer": "b"}\n',
     ["d.jsonl line 2", "'response'", "--response-field"]),
    ('{"instruction": "a", "response": 3}\n', ["line 1", "'response' must be a string"]),
    ("", ["d.jsonl is empty"]),
    ("\n\n", ["is empty"]),
    ('[1, 2]\n', ["line 1", "expected a JSON object"]),
    ('{"prompt": "a"}\n', ["cannot tell the record kind", "--instruction-field"]),
    ('{"messages": [{"role": "user", "content": "a"}]}\n', ["no assistant message"]),
])
def test_bad_input_messages(tmp_path, tok, content, expected):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(UserError) as e:
        load_dataset(DataConfig(path=str(tmp_path / "d.jsonl")), tok)
    for part in expected:
        assert part in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_and_malformed_json_array(tmp_path, tok):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(DataConfig(path=str(tmp_path / "nope.jsonl")), tok)
    (tmp_path / "d.json").write_text('[\n{"instruction": "a", "response": "b"},\n{"instruction": }\n]')
    with pytest.raises(UserError, match=r"d.json line 3: malformed JSON"):
        load_dataset(DataConfig(path=str(tmp_path / "d.json")), tok)


def test_malformed_json_message_says_at_once(tmp_path, tok):
    # Python's decoder ends some messages with "at" ("Unterminated string starting at").
    for content, expected in (('{"instruction": "a", "response": "b', "Unterminated string starting at column 34"),
                              ('{"instruction": "a", "response": "b\n', "Invalid control character at column 36"),
                              ('{"instruction": "a",,}\n', "Expecting property name enclosed in double quotes "
                                                           "at column 21")):
        (tmp_path / "d.jsonl").write_text(content)
        with pytest.raises(UserError) as e:
            load_dataset(DataConfig(path=str(tmp_path / "d.jsonl")), tok)
        assert expected in str(e.value) and "at at" not in str(e.value), str(e.value)


# ---------------------------------------------------------------- the tokenizer's chat template, TRL records

CHATML = ("{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")


@pytest.fixture
def chat_tok(tok):
    t = tiny_tokenizer([MAGICODER_SYSTEM + "\nuser\nassistant\nsystem\nadd one\nreturn x + 1"] * 4)
    t.chat_template = CHATML
    return t


def test_chat_template_masks_all_but_assistant_turns(tmp_path, chat_tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "two"},
            {"role": "assistant", "content": "A2"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    ex = load_dataset(DataConfig(path=path, template="chat"), chat_tok)[0][0]
    # The whole example is exactly the template's rendering: no second BOS, no extra EOS.
    assert ex["input_ids"] == chat_tok(chat_tok.apply_chat_template(msgs, tokenize=False),
                                       add_special_tokens=False).input_ids
    # Trained: each assistant answer and the template's end-of-turn marker after it, nothing else.
    assert trained_text(chat_tok, ex) == "A1<|eos|>\nA2<|eos|>\n"


def test_chat_template_wraps_instruction_records_and_builds_prompts(tmp_path, chat_tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "add one", "response": "return x + 1"}])
    ex = load_dataset(DataConfig(path=path, template="chat"), chat_tok)[0][0]
    prompt = format_prompt("add one", "chat", tokenizer=chat_tok)
    assert prompt == "<|bos|>user\nadd one<|eos|>\n<|bos|>assistant\n"
    assert chat_tok.decode(ex["input_ids"]) == prompt + "return x + 1<|eos|>\n"
    assert trained_text(chat_tok, ex) == "return x + 1<|eos|>\n"


def test_chat_template_missing_is_one_clear_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "response": "b"}])
    with pytest.raises(UserError, match="--template chat uses the tokenizer's chat template, but .* has none"):
        load_dataset(DataConfig(path=path, template="chat"), tok)
    with pytest.raises(UserError, match="pass the tokenizer"):
        format_prompt("a", "chat")


def test_trl_prompt_completion_strings_and_conversations(tmp_path, tok, chat_tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "def add(a, b):\n", "completion": "    return a + b"}])
    ds, stats = load_dataset(DataConfig(path=path), tok)
    assert stats.kind == "prompt-completion"  # detected
    assert tok.decode(ds[0]["input_ids"]) == "def add(a, b):\n    return a + b" + tok.eos_token  # prompt verbatim
    assert trained_text(tok, ds[0]) == "    return a + b" + tok.eos_token
    conv = {"prompt": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "A1"},
                       {"role": "user", "content": "two"}],
            "completion": [{"role": "assistant", "content": "A2"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [conv])
    ex = load_dataset(DataConfig(path=path, template="chat"), chat_tok)[0][0]
    assert trained_text(chat_tok, ex) == "A2<|eos|>\n"  # the prompt's assistant turn is context only
    ex = load_dataset(DataConfig(path=path), tok)[0][0]  # an xft template works too
    assert trained_text(tok, ex) == "A2" + tok.eos_token and "@@ Instruction\ntwo" in tok.decode(ex["input_ids"])
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}])
    with pytest.raises(UserError, match="must both be strings or both lists of messages"):
        load_dataset(DataConfig(path=path), tok)


# ---------------------------------------------------------------- validation split

def test_held_out_records_are_not_trained_on_and_stay_put(tmp_path, tok):
    rows = [{"instruction": f"task {i}", "response": f"r{i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    splits = load_splits(DataConfig(path=path, eval_fraction=0.25, seed=3), tok)
    train = {trained_text(tok, e) for e in splits.train}
    held = {trained_text(tok, e) for e in splits.eval}
    assert len(held) == 5 and len(train) == 15 and not train & held
    assert splits.eval_stats.path.endswith("(held out)") and splits.stats.records == 15
    # The held-out set does not depend on the subset, and the subset never reaches into it.
    again = load_splits(DataConfig(path=path, eval_fraction=0.25, seed=3, subset=4), tok)
    assert {trained_text(tok, e) for e in again.eval} == held and len(again.train) == 4
    with pytest.raises(UserError, match="leaves none to train on"):
        load_splits(DataConfig(path=write_jsonl(tmp_path / "one.jsonl", rows[:1]), eval_fraction=0.5), tok)


def test_validation_file(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "response": "b"}] * 3)
    val = write_jsonl(tmp_path / "v.jsonl", [{"prompt": "x", "completion": "y"}] * 2)
    splits = load_splits(DataConfig(path=path, eval_path=val), tok)
    assert len(splits.train) == 3 and len(splits.eval) == 2 and splits.eval_stats.path == val
    assert load_splits(DataConfig(path=path), tok).eval is None


def test_alpaca_input_is_part_of_the_instruction(tmp_path):
    from xft.data import to_segments

    cfg = DataConfig(path="x", response_field="output")
    with_input = to_segments({"instruction": "Add x", "input": "x = 1", "output": "x + 1"}, "instruction", cfg)
    without = to_segments({"instruction": "Add x", "input": " ", "output": "x + 1"}, "instruction", cfg)
    assert "Add x\n\nx = 1\n" in with_input[0][0] and "Add x\n" in without[0][0] and "x = 1" not in without[0][0]
    assert with_input[-1] == ("x + 1", True)


def test_a_missing_field_names_the_one_that_looks_like_it(tmp_path):
    from xft.data import read_records, validate_records

    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add x", "output": "x + 1"}])
    with pytest.raises(UserError, match=r"no 'response' field .*set --response-field; 'output' looks like it"):
        validate_records(read_records(str(path)), "instruction", DataConfig(path=str(path)))


def test_sharegpt_conversations_train_as_chat_messages(tmp_path, tok):
    from xft.data import read_records

    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Add 1 and 2"},
                               {"from": "gpt", "value": "3"}]}]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    assert read_records(str(path)).rows[0]["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1 and 2"},
        {"role": "assistant", "content": "3"}]
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": read_records(str(path)).rows[0]["messages"]}])
    ours, _ = load_dataset(DataConfig(path=str(path)), tok)
    theirs, _ = load_dataset(DataConfig(path=str(chat)), tok)
    assert ours[0] == theirs[0]
