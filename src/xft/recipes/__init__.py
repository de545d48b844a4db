"""The recipes shipped with xft (`<name>.yaml` here): `xft run NAME` finds them by name.

Kept import-free, so `xft run --help` can list them without loading the pipeline.
"""

from __future__ import annotations

from pathlib import Path

DIR = Path(__file__).resolve().parent


def names() -> list[str]:
    """Names of the bundled recipes, e.g. ["deepseek-coder-1.3b", "minicode"]."""
    return sorted(p.stem for p in DIR.glob("*.yaml"))


def path(name: str) -> Path:
    """The file of bundled recipe `name` (e.g. "minicode" or "minicode.yaml")."""
    return DIR / f"{name[:-5] if name.endswith('.yaml') else name}.yaml"
