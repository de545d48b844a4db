"""Extract the program from a model's answer, as EvalPlus's sanitizer does.

1. Find the code: the fenced blocks of a Markdown answer (the one defining the
   entry point, else the longest that parses), else the longest run of lines that
   parses as Python (so chatter before and after is dropped).
2. Keep what the entry point needs: all imports, plus the top-level classes,
   functions (those that return something) and assignments reachable from the
   entry point through the names they use. Test code, prints and
   `if __name__ == "__main__":` blocks are dropped.

Written with the standard `ast` module (EvalPlus uses tree-sitter); behaviour,
not code, follows EvalPlus 0.3.1. One deliberate difference: decorated
definitions are kept (EvalPlus drops them).
"""

from __future__ import annotations

import ast
import re

_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):  # ValueError: null bytes
        return False
    return True


def _longest_parsing_span(text: str) -> str:
    """The span of lines with the most non-blank lines that parses (EvalPlus's rule)."""
    if _parses(text):
        return text
    lines = text.split("\n")
    weight = [0]
    for line in lines:
        weight.append(weight[-1] + bool(line.strip()))
    best, best_span = 0, (0, -1)
    for i in range(len(lines)):
        if weight[-1] - weight[i] <= best:
            break  # no span starting here can beat the best
        for j in range(len(lines) - 1, i - 1, -1):
            if weight[j + 1] - weight[i] <= best:
                break
            if _parses("\n".join(lines[i:j + 1])):
                best, best_span = weight[j + 1] - weight[i], (i, j)
                break
    return "\n".join(lines[best_span[0]:best_span[1] + 1])


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code part of an answer: a fenced block if there is one, else the longest parsing span."""
    blocks = [b for b in _FENCE.findall(text) if b.strip()]
    parsing = [b for b in blocks if _parses(b)]
    if entry_point:
        defining = [b for b in parsing if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", b)]
        if defining:
            return max(defining, key=len)
    if parsing:
        return max(parsing, key=len)
    return _longest_parsing_span(blocks[0] if blocks else text)


def _has_return(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Return) for n in ast.walk(node))


def _names_used(node: ast.AST) -> set[str]:
    return {n.id if isinstance(n, ast.Name) else n.attr
            for n in ast.walk(node) if isinstance(n, (ast.Name, ast.Attribute))}


def _definitions(tree: ast.Module) -> tuple[list[ast.stmt], list[tuple[str, ast.stmt]]]:
    """Top-level imports, and (name, node) of the first definition of each name."""
    imports, defs, seen = [], [], set()
    for node in tree.body:
        name = None
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
        elif isinstance(node, ast.ClassDef):
            name = node.name
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _has_return(node):
            name = node.name
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            name = node.target.id
        if name is not None and name not in seen:
            seen.add(name)
            defs.append((name, node))
    return imports, defs


def _reachable(entry_point: str, defs: list[tuple[str, ast.stmt]]) -> set[str]:
    deps = {name: _names_used(node) for name, node in defs}
    seen, queue = {entry_point}, [entry_point]
    while queue:
        for dep in deps.get(queue.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                queue.append(dep)
    return seen


def _source(code: str, node: ast.stmt) -> str:
    lines = code.split("\n")
    start = node.lineno - 1
    if getattr(node, "decorator_list", None):  # a decorator's line is its '@' line
        start = min(d.lineno for d in node.decorator_list) - 1
    return "\n".join(lines[start:node.end_lineno])


def sanitize(text: str, entry_point: str | None = None) -> str:
    """A runnable program from a model's answer (see the module docstring)."""
    code = extract_code(text, entry_point)
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code
    imports, defs = _definitions(tree)
    names = {name for name, _ in defs}
    keep = _reachable(entry_point, defs) if entry_point and entry_point in names else names
    parts = [_source(code, n) for n in imports]
    parts += [_source(code, node) for name, node in defs if name in keep]
    sanitized = "\n".join(parts).strip()
    return sanitized or code
