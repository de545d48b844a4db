"""`xft eval` end to end: scoring a samples file, generating with tiny local models
(dense and MoE), batch-size independence, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

import xft
import xft.errors
from xft.cli import main
from xft.eval import load_benchmark
from xft.eval.benchmarks import Benchmark, Task
from xft.config import DecodingConfig
from xft.eval.generate import generate_samples
from xft.testing import tiny_model, tiny_tokenizer

TINY_TASKS = [  # HumanEval-format tasks short enough for a 512-position tiny model
    {"task_id": f"Tiny/{i}", "prompt": f"def add{i}(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
     "entry_point": f"add{i}", "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"} for i in range(3)
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in TINY_TASKS))
    return str(path)


@pytest.fixture(scope="module", params=["dense", "moe"])
def checkpoint(request, tmp_path_factory):
    model = tiny_model("llama")
    if request.param == "moe":
        model = xft.upcycle(model, xft.UpcycleConfig(num_experts=4, top_k=2))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def _write_samples(path, samples):
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return str(path)


def test_score_samples_file(tmp_path, capsys):
    bench = load_benchmark("humaneval")
    tasks = list(bench.tasks.values())[:4]
    samples = [{"task_id": t.task_id, "completion": t.canonical_solution} for t in tasks[:3]]
    samples.append({"task_id": tasks[3].task_id, "completion": "    return None\n"})
    out = tmp_path / "out"
    code = main(["eval", "--samples", _write_samples(tmp_path / "s.jsonl", samples),
                 "--benchmark", "humaneval", "--out", str(out), "--partial"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["benchmark"] == "humaneval" and results["pass@1"] == pytest.approx(0.75)
    assert results["sandbox"]["level"] in ("namespaces", "userns", "rlimits")
    assert results["decoding"] is None
    assert results["tasks"][tasks[0].task_id] == {"passed": True, "status": "pass", "error": None,
                                                  "n": 1, "correct": 1}
    assert results["tasks"][tasks[3].task_id]["status"] == "fail"
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in lines] == [s["task_id"] for s in samples]
    assert "pass@1 0.7500" in capsys.readouterr().out


@pytest.mark.parametrize("make_args,message", [
    (lambda p: ["--samples", str(p / "missing.jsonl")], "cannot read samples"),
    (lambda p: ["--samples", _write_samples(p / "s.jsonl", [{"task_id": "HumanEval/0"}])], "s.jsonl line 1"),
    (lambda p: ["--samples", _write_samples(p / "s.jsonl", [{"task_id": "Nope/1", "solution": ""}])],
     "not in humaneval"),
    (lambda p: ["--samples", _write_samples(p / "s.jsonl", [{"task_id": "HumanEval/0", "solution": ""}])],
     "--partial"),
    (lambda p: [str(p / "no-model"), "--samples", str(p / "x.jsonl")], "not both"),
    (lambda p: [], "either MODEL"),
    (lambda p: [str(p / "no-model")], "does not exist"),
    (lambda p: ["--samples", str(p / "x.jsonl"), "--data", str(p / "nodata.jsonl")], "no such file"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, make_args, message):
    out = tmp_path / "out"
    code = main(["eval", *make_args(tmp_path), "--benchmark", "humaneval", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("xft eval: error:") and message in err[0]
    assert not out.exists()


def test_generate_and_score_end_to_end(checkpoint, tiny_data, tmp_path):
    out = tmp_path / "out"
    code = main(["eval", checkpoint, "--benchmark", "humaneval", "--data", tiny_data, "--out", str(out),
                 "--max-new-tokens", "6", "--batch-size", "2", "--device", "cpu", "--workers", "2"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["pass@1"] <= 1.0 and results["n_tasks"] == len(TINY_TASKS)
    assert results["decoding"]["max_new_tokens"] == 6 and results["decoding"]["temperature"] == 0.0
    assert results["model"] == checkpoint
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all({"task_id", "solution", "completion", "raw"} <= set(s) for s in samples)


def test_evaluate_takes_a_path_or_a_loaded_model_and_returns_what_it_writes(checkpoint, tiny_data, tmp_path):
    """`xft.eval.evaluate`, the one entry point: a loaded (model, tokenizer) pair scores as its path does."""
    from xft.eval import evaluate
    from xft.eval.generate import load_model

    def decoding():
        return DecodingConfig(max_new_tokens=6, batch_size=2)

    out = tmp_path / "by-path"
    by_path = evaluate(checkpoint, "humaneval", str(out), data=tiny_data, decoding=decoding(), device="cpu",
                       workers=1)
    loaded = evaluate(load_model(checkpoint, device="cpu"), "humaneval", None, data=tiny_data,
                      decoding=decoding(), workers=1)
    assert loaded.samples == by_path.samples and loaded.tasks == by_path.tasks and loaded.out is None
    written = json.loads((out / "results.json").read_text())
    assert written["tasks"] == by_path.tasks and written["pass@1"] == by_path.pass_at_1
    assert [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()] == by_path.samples
    assert by_path.n_tasks == by_path.n_samples == len(TINY_TASKS) == sum(by_path.statuses.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["by-path"]  # the loaded model's run wrote nothing
    with pytest.raises(xft.errors.UserError, match="not empty"):
        evaluate(checkpoint, "humaneval", str(out), data=tiny_data, decoding=decoding(), device="cpu")


@pytest.mark.parametrize("temperature,n", [(0.0, 1), (0.8, 2)])
def test_generation_does_not_depend_on_batch_size(checkpoint, tiny_data, temperature, n):
    bench = load_benchmark("humaneval", tiny_data)
    runs = [generate_samples(bench, checkpoint, DecodingConfig(
        prompt_style="completion", max_new_tokens=8, temperature=temperature, n_samples=n,
        batch_size=bs), device="cpu") for bs in (1, 4)]
    assert runs[0] == runs[1]


def test_instruction_benchmark_prompts_use_the_magicoder_template(tiny_data):
    from xft.eval.prompts import build_prompt

    task = Task("m/0", "Write add(a, b).", "add", "")
    prompt = build_prompt(Benchmark("mini", {"m/0": task}, style="check", prompt_kind="instruction"),
                          task, "instruction")
    assert prompt.startswith("You are an exceptionally intelligent coding assistant")
    assert "@@ Instruction\nWrite add(a, b).\n\n@@ Response\n" in prompt


def test_vllm_backend_missing_is_a_clear_error(checkpoint, tiny_data, tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed")
    except ImportError:
        pass
    code = main(["eval", checkpoint, "--benchmark", "humaneval", "--data", tiny_data,
                 "--out", str(tmp_path / "o"), "--backend", "vllm"])
    assert code == 2 and "vLLM" in capsys.readouterr().err


CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_template_prompts_come_from_the_tokenizer(tmp_path, tiny_data):
    from transformers import AutoTokenizer

    from xft.eval.generate import _prompts

    model = tiny_model("llama")
    tok = tiny_tokenizer()
    model.save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    tok.chat_template = CHAT
    model.save_pretrained(tmp_path / "chat")
    tok.save_pretrained(tmp_path / "chat")
    bench = load_benchmark("humaneval", tiny_data)
    cfg = DecodingConfig(template="chat")
    tok = AutoTokenizer.from_pretrained(tmp_path / "chat")
    prompt = _prompts(bench, [("Tiny/0", 0)], cfg, tok)[0]
    assert prompt.startswith("<|bos|><|user|>Write a solution") and prompt.endswith("<|assistant|>```python\n")
    code = main(["eval", str(tmp_path / "chat"), "--benchmark", "humaneval", "--data", tiny_data, "--template",
                 "chat", "--out", str(tmp_path / "out"), "--max-new-tokens", "4", "--device", "cpu",
                 "--workers", "1"])
    assert code == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["decoding"]["template"] == "chat"
    code = main(["eval", str(tmp_path / "plain"), "--benchmark", "humaneval", "--data", tiny_data, "--template",
                 "chat", "--out", str(tmp_path / "out2"), "--max-new-tokens", "4", "--device", "cpu"])
    assert code == 2 and not (tmp_path / "out2").exists()
