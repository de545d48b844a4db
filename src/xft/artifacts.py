"""Artifacts on disk: where models are, writing outputs so that they appear only whole, comparing settings.

Model arguments: one rule for every command and `xft.load` that takes a model.

`resolve_model(arg)` accepts

* a model directory (holds `config.json`), as `from_pretrained` does; the
  `--out D` of every xft command is one once the command has finished (a run
  of xft 0.1 kept its model in `D/final`: found too);
* a Hugging Face Hub id (`org/name`, or a legacy bare name such as `gpt2`).

and fails fast with one line saying what is wrong: a local path that does not
exist, a run that has not finished, a directory that holds no model, or a Hub
id that is neither in the local cache nor reachable (checked with a single
request instead of the Hub client's retries, which take ~25–50 s offline).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

from xft.errors import UserError

HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
RUN_FILE = "xft_run.json"  # in an --out directory while its command works on it (xft.training.rundir)
LEGACY_FINAL = "final"  # where runs of xft 0.1 kept their model (OUT/final/): still found, never written


# Files of a model directory that are not the weights or the model config: the tokenizer in its several
# formats, the chat template, the generation defaults. Outputs carry them byte for byte, so a merged model
# tokenizes, chats and generates exactly as the base did (a re-save may rewrite them).
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def copy_companions(source: str, dst: str, tokenizer=None) -> None:
    """Put `source`'s tokenizer and generation-config files into `dst`, byte for byte.

    `source` is a resolved model location; for a Hub id (no local directory) the
    loaded `tokenizer` is saved instead. Files of `dst` with those names (e.g.
    a generation_config.json `save_pretrained` just wrote) are replaced.
    """
    import shutil

    found = [n for n in COMPANION_FILES if os.path.isfile(os.path.join(source, n))] if os.path.isdir(source) else []
    if not any(n != "generation_config.json" for n in found):
        if tokenizer is None:
            raise UserError(f"{source} holds no tokenizer files to copy")
        tokenizer.save_pretrained(dst)
    for name in found:
        shutil.copyfile(os.path.join(source, name), os.path.join(dst, name))


def update_config(directory: str, *, torch_dtype_alias: bool = False, **fields) -> None:
    """Set `fields` in `directory`/config.json (e.g. the base model's `use_cache`, which Trainer turns off while
    training); with `torch_dtype_alias`, make it readable by older tools too: `torch_dtype` beside
    transformers 5's `dtype`."""
    import json

    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    new = {**config, **fields}
    if torch_dtype_alias and "dtype" in new and "torch_dtype" not in new:
        new["torch_dtype"] = new["dtype"]
    if new != config:
        atomic_write_text(path, json.dumps(new, indent=2, sort_keys=True) + "\n")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one, never a part."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:  # open(), not mkstemp: the file follows the umask
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON atomically (see `atomic_write_text`)."""
    import json

    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def read_json(path: str | os.PathLike):
    """The JSON value in `path`, or None when the file is missing or damaged (a record that may not exist yet)."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, value) of every non-blank line of a JSON-lines file (gzip if it ends in .gz).

    UserError naming the file and line on malformed JSON or non-UTF-8 text; OSError as raised.
    """
    import gzip
    import json

    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield lineno, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(json_error(path, lineno, e)) from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text (expected JSON lines)") from None


def json_error(path: str, lineno: int, e) -> str:
    """One line for a `json.JSONDecodeError` at `lineno` of `path`."""
    at = "" if e.msg.endswith(" at") else " at"  # some decoder messages already end in "at"
    return f"{path} line {lineno}: malformed JSON ({e.msg}{at} column {e.colno})"


@contextlib.contextmanager
def atomic_dir(target: str):
    """Yield a temporary directory next to `target`; on success rename it to `target` in one step.

    On an exception the temporary directory is removed and `target` is untouched.
    An existing `target` is replaced only after the new one is complete. The
    temporaries are `.<name>.tmp-*` / `.<name>.old-*` beside `target`.
    """
    import shutil
    import tempfile

    parent = os.path.dirname(os.path.abspath(target)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        yield tmp
        follow_umask(tmp)  # mkdtemp made it 0700, safetensors writes 0600: the result follows the umask
        if os.path.exists(target):
            trash = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
            os.rename(target, os.path.join(trash, "x"))
            os.rename(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def settings_diff(old: dict, new: dict, ignore=frozenset()) -> dict[str, str]:
    """Key -> "key: old -> new" for every setting that differs between two flat records, `ignore`d keys aside.

    The one check behind "refuse to resume with other settings" (training
    stages, `xft upcycle`, `xft run`'s recipe).
    """
    keys = sorted((set(old) | set(new)) - set(ignore))
    return {k: f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)}


def _umask() -> int:
    """This process's umask: read from /proc where it can be (setting it, even briefly, affects every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: str) -> None:
    """Give `root` and everything under it the modes plain mkdir/open would (0755/0644 under umask 022).

    Temporary directories (0700) and some writers (safetensors: 0600) are private by default; an output
    directory renamed into place from them would otherwise stay unreadable to the group and others.
    """
    mask = _umask()
    for here, dirs, files in os.walk(root):
        os.chmod(here, 0o777 & ~mask)
        for name in files:
            path = os.path.join(here, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def resolve_model(path: str) -> str:
    """`path` as a loadable location: a model directory, a finished run's model, a GGUF file (`xft.gguf`:
    converted once into a cached model directory, which is returned) or a Hub id; UserError if not."""
    path = str(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
        if os.path.isfile(os.path.join(path, LEGACY_FINAL, "config.json")):
            return os.path.join(path, LEGACY_FINAL)
        if os.path.isfile(os.path.join(path, RUN_FILE)):
            raise UserError(f"{path} is an unfinished xft run (no model yet); resume it by re-running its command")
        raise UserError(f"{path} is not a model directory (no config.json)")
    from xft.gguf import is_gguf_argument

    if is_gguf_argument(path):
        return _converted_gguf(path)
    if os.path.exists(path):
        raise UserError(f"model path {path} is a file; expected a model directory, a .gguf file or a Hub id")
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or (os.sep != "/" and os.sep in path)
    if looks_local or not HUB_ID.fullmatch(path):
        raise UserError(f"model path {path} does not exist")
    _check_hub_id(path)
    return path


def _converted_gguf(arg: str) -> str:
    """The cached checkpoint of the GGUF file `arg` names (`xft.gguf`), converted now if it is not there yet."""
    import sys

    from xft import gguf

    path = gguf.gguf_file(arg)
    gguf.check_magic(path)
    target = cache_root() / "gguf" / f"{path.stem}-{file_sha256(path)[:16]}"
    if not (target / "config.json").is_file():
        print(f"xft: converting {path} to a checkpoint in {target} (once per file)", file=sys.stderr)
        with atomic_dir(str(target)) as tmp:
            gguf.convert(path, tmp)
    return str(target)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, hex (read in 1 MiB blocks)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """Where xft caches what it builds (MiniCode base models, converted GGUF files): $XFT_CACHE_DIR, else
    $XDG_CACHE_HOME/xft, else ~/.cache/xft."""
    if os.environ.get("XFT_CACHE_DIR"):
        return Path(os.environ["XFT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xft"


def _check_hub_id(repo_id: str) -> None:
    """Raise UserError unless `repo_id` is in the local Hub cache or the Hub answers for it."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    where = f"{repo_id} is not a local directory"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{where} and is not in the Hugging Face cache (HF_HUB_OFFLINE is set)")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=10)
    except GatedRepoError:
        return  # exists; loading reports the access problem in its own words
    except RepositoryNotFoundError:
        raise UserError(f"{where}, and the Hugging Face Hub has no model {repo_id} "
                        "(or it is private: log in with `hf auth login`)") from None
    except Exception as e:  # no network, DNS, timeout, proxy: one line, not the client's retries
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{where}, and the Hugging Face Hub could not be reached to fetch it ({reason}); "
                        "give a local model directory, or check the network") from None
