"""Public names of a package imported on first use, so `import xft` and `xft --help` stay light.

`export_lazily(__name__, {"load": "xft.checkpoint", ...})` in a package's
`__init__` makes `pkg.load`, `from pkg import load` and `pkg.__all__` work as
eager imports would, but the defining module (and torch, transformers behind
it) is imported only when a name is first used.
"""

from __future__ import annotations

import importlib
import sys
import types


class LazyPackage(types.ModuleType):
    """A package whose public names (`_lazy_exports`: name -> defining module) load on first access."""

    def __getattr__(self, name: str):
        exports = self.__dict__.get("_lazy_exports", {})
        if name not in exports:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        super().__setattr__(name, value)
        return value

    def __dir__(self) -> list[str]:
        return sorted(set(self.__dict__) | set(self.__dict__.get("_lazy_exports", {})))

    def __setattr__(self, name: str, value) -> None:
        # The import system binds each loaded submodule on its package; where a public function is
        # named like its module (`xft.merge`, `xft.upcycle`, `xft.eval.sanitize`) the function stays.
        if isinstance(value, types.ModuleType) and self.__dict__.get("_lazy_exports", {}).get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


def export_lazily(package: str, exports: dict[str, str]) -> None:
    """Make each `name -> module` of `exports` a public attribute of `package`, imported on first access."""
    module = sys.modules[package]
    module._lazy_exports = exports
    module.__all__ = sorted(exports)
    module.__class__ = LazyPackage
