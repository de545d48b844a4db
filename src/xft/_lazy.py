"""Public names of a package imported on first use, so `import xft` and `xft --help` stay light.

`export_lazily(__name__, {"load": "xft.checkpoint", ...})` in a package's
`__init__` makes `pkg.load`, `from pkg import load` and `pkg.__all__` work as
eager imports would, but the defining module (and torch, transformers behind
it) is imported only when a name is first used.
"""

from __future__ import annotations

import importlib
import importlib.util
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


class _AfterImport:
    """Meta-path finder that runs `callback` right after module `name` is first imported (then retires)."""

    def __init__(self, name: str, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the real spec, from the finders after this one
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run, callback = spec.loader.exec_module, self.callback

            def exec_module(module):
                run(module)
                callback()

            spec.loader.exec_module = exec_module  # this module's own loader instance only
        return spec


def after_import(name: str, callback) -> None:
    """Call `callback()` once module `name` is imported: now if it already is, else right after its import."""
    if name in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))
