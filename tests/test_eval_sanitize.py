"""The sanitizer extracts the program the way EvalPlus's does."""

import pytest

from xft.eval import sanitize
from xft.eval.sanitize import extract_code

CHATTY = '''Sure! Here is my solution:

```python
import math
from functools import lru_cache

def helper(x):
    return x * 2

@lru_cache(maxsize=None)
def solve(x):
    return helper(x) + math.floor(1.5)

def unrelated():
    return 3

print(solve(2))
assert solve(1) == 3
if __name__ == "__main__":
    solve(3)
```

It works because helper doubles its input.'''


def test_keeps_imports_and_what_the_entry_point_needs():
    out = sanitize(CHATTY, "solve")
    assert "import math" in out and "from functools import lru_cache" in out
    assert "def helper" in out and "@lru_cache(maxsize=None)\ndef solve" in out
    assert "unrelated" not in out and "print(" not in out and "assert" not in out
    assert "__main__" not in out and "It works" not in out
    compile(out, "<sanitized>", "exec")


def test_prefers_the_block_defining_the_entry_point():
    text = "```python\nx = 1\ny = 2\nz = 3\n```\nand\n```python\ndef f():\n    return 1\n```"
    assert extract_code(text, "f").startswith("def f")


def test_unfenced_answer_drops_trailing_chatter():
    text = "def f(a):\n    return a + 1\nThis function adds one to its argument."
    assert sanitize(text, "f") == "def f(a):\n    return a + 1"


def test_unterminated_fence_still_extracts_code():
    assert sanitize("```python\ndef f():\n    return 2\n", "f") == "def f():\n    return 2"


def test_helpers_reached_through_assignments_and_classes_are_kept():
    text = "TABLE = {1: 2}\nclass Box:\n    pass\ndef f(x):\n    return Box, TABLE[x]\nOTHER = 5\n"
    out = sanitize(text, "f")
    assert "TABLE" in out and "class Box" in out and "OTHER" not in out


@pytest.mark.parametrize("text", ["", "no code at all here", "```\n```"])
def test_hopeless_answers_do_not_crash(text):
    assert isinstance(sanitize(text, "f"), str)
