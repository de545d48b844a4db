"""What the model is asked, for each benchmark and prompt style.

* ``instruction`` (default; instruction-tuned models): a training template of
  `xft.data` (default: the Magicoder template the paper trains and evaluates with;
  ``chat``: the model's own chat template). A code prompt (HumanEval, MBPP) becomes "Write a solution to
  the following problem:" plus the prompt in a Python block; an instruction
  benchmark (minicode) uses its instruction as is. The response is started with
  an open ```python fence, as the project's training responses are written.
* ``completion`` (base models): the code prompt itself; the model continues it.
"""

from __future__ import annotations

from xft.data import format_prompt
from xft.errors import UserError
from xft.eval.benchmarks import Benchmark, Task

STYLES = ("instruction", "completion")
# Stop strings. Completion style: the next top-level statement ends the function
# (EvalPlus's list); instruction style: the end of the code block or a new turn.
COMPLETION_STOPS = ["\ndef ", "\nclass ", "\nimport ", "\nfrom ", "\nassert ", '\n"""',
                    "\nif __name__", "\nprint("]
INSTRUCTION_STOPS = ["\n```", "\n@@ Instruction"]


def response_prefix(bench: Benchmark, style: str) -> str:
    """Text the response starts with (part of the prompt, and of the raw answer)."""
    return "```python\n" if style == "instruction" else ""


def build_prompt(bench: Benchmark, task: Task, style: str, template: str = "magicoder", tokenizer=None) -> str:
    """The full text given to the model for `task` (template "chat" renders with `tokenizer`'s chat template)."""
    if style == "completion":
        if bench.prompt_kind != "code":
            raise UserError(f"{bench.name} gives natural-language instructions: use "
                            "--prompt-style instruction")
        return task.prompt
    if style != "instruction":
        raise UserError(f"unknown --prompt-style {style!r}; choose {' or '.join(STYLES)}")
    if bench.prompt_kind == "code":
        instruction = f"Write a solution to the following problem:\n```python\n{task.prompt.strip()}\n```"
    else:
        instruction = task.prompt.strip()
    return format_prompt(instruction, template, tokenizer=tokenizer) + response_prefix(bench, style)


def stop_strings(bench: Benchmark, style: str) -> list[str]:
    return list(COMPLETION_STOPS if style == "completion" else INSTRUCTION_STOPS)
