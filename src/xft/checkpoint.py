"""Loading dense and MoE checkpoints: `xft.load(path_or_hub_id)`.

An MoE is saved with the ordinary `model.save_pretrained(dir)` (safetensors;
the stacked expert tensors `[N, *shape]` are ordinary tensors) and its
`config.json` (model type ``xft_moe``, see `xft.hfconfig`) carries the
`UpcycleConfig` under ``"xft"``. Loading rebuilds the
original dense class from that config, upcycles it (structure only), then
loads every tensor, checking that each key and shape matches — nothing is
skipped silently; an LM head tied to the embeddings is tied again before the
one saved tensor is loaded. A checkpoint without the ``"xft"`` entry is a plain
`transformers` model and is loaded with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights
from transformers.utils import cached_file

from xft.artifacts import resolve_model
from xft.config import UpcycleConfig
from xft.errors import UserError
from xft.hfconfig import CONFIG_KEY, dense_config
from xft.upcycle import upcycle

_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def is_moe_checkpoint(path: str) -> bool:
    """Whether the checkpoint at `path` (model dir, finished run dir or hub id) is an xft MoE."""
    return hasattr(_config(resolve_model(path)), CONFIG_KEY)


# `from_pretrained`'s options for where the files come from; `xft.load` honours them for MoE and dense alike.
HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "proxies", "token", "revision", "subfolder")


def load(path: str, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
         expert_impl: str | None = None, config=None, **kwargs) -> nn.Module:
    """Load a dense or MoE causal LM from a model directory, a finished xft run or a hub id (detected).

    `dtype`: None keeps the checkpoint's dtype; `device`: where to put the model
    (default CPU); `expert_impl`: an MoE's expert kernel instead of the recorded one
    (`UpcycleConfig.expert_impl`; it changes speed, not results); `config`: a loaded
    config to use instead of the checkpoint's. `kwargs`: `from_pretrained`'s download
    options (`HUB_OPTIONS`) and `attn_implementation` for any model; a dense model takes
    every other `from_pretrained` argument too, an MoE refuses them (UserError).
    """
    if kwargs.get("subfolder") and os.path.isdir(str(path)):
        path = os.path.join(str(path), kwargs.pop("subfolder"))
    hub = {k: v for k, v in kwargs.items() if k in HUB_OPTIONS and v is not None}
    path = resolve_model(path)
    config = config if config is not None else _config(path, **hub)
    if not hasattr(config, CONFIG_KEY):
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype or "auto", **kwargs)
        return model.to(device) if device is not None else model
    other = sorted(k for k, v in kwargs.items() if k not in HUB_OPTIONS + ("attn_implementation",) and v is not None)
    if other:
        raise UserError(f"{path} is an xft MoE; loading it does not take {', '.join(other)} "
                        f"(it takes dtype, device, expert_impl, attn_implementation and {', '.join(HUB_OPTIONS)})")
    xft_config = UpcycleConfig.from_dict(getattr(config, CONFIG_KEY))
    if expert_impl is not None:
        xft_config = dataclasses.replace(xft_config, expert_impl=expert_impl)  # validated again
    dtype = _resolve_dtype(dtype, config)
    attn = {"attn_implementation": kwargs["attn_implementation"]} if kwargs.get("attn_implementation") else {}
    with no_init_weights(), torch.device(device or "cpu"):  # every tensor is overwritten below
        model = AutoModelForCausalLM.from_config(dense_config(copy.deepcopy(config)), dtype=dtype, **attn)
    # no_init_weights also skips tying: alias a tied LM head to the embeddings now, so that the one saved
    # tensor fills both (Qwen2.5 0.5-3B, Llama-3.2, Gemma tie them; their checkpoints hold no lm_head).
    model.tie_weights()
    upcycle(model, xft_config, init_weights=False)  # structure only: every expert weight is loaded next
    _load_weights(model, _weight_files(path, **hub))
    return model.eval()


def upcycle_checkpoint(model: str, out: str, config: UpcycleConfig, location: str | None = None) -> nn.Module:
    """Upcycle the dense checkpoint `model` and write the MoE into directory `out`; return the MoE.

    `out` gets the MoE's weights and config, the source's tokenizer and
    generation-config files byte for byte, and a model card (`location`: the path
    the card shows, when `out` is a temporary directory renamed afterwards).
    """
    from xft.artifacts import copy_companions
    from xft.modelcard import base_model_of, write_model_card
    from xft.upcycle import is_moe

    path = resolve_model(model)
    tokenizer = load_tokenizer(path)
    moe = load(path)
    if is_moe(moe):
        raise UserError(f"{model} is already an xft MoE; XFT upcycles a dense model")
    with torch.no_grad():
        # The weights out of the checkpoint's memory map: a mapped file stays resident while any tensor of it
        # lives (the attention's), so the dense FFNs that upcycling drops would otherwise stay in RSS beside
        # their expert copies (benchmarks/bench_plan.py --real measures the peak).
        for p in moe.parameters():
            p.data = p.data.clone()
    upcycle(moe, config)
    moe.save_pretrained(out)
    copy_companions(path, out, tokenizer)
    write_model_card(out, kind="upcycled", base_model=base_model_of(path), source=model,
                     settings=config.to_dict(), location=location or out)
    return moe


def skeleton(path: str) -> nn.Module:
    """The model at `path` (dense or MoE) built on the meta device from its config alone: shapes, no weights.

    For counting parameters or planning memory without reading (or having room for) the weights.
    """
    path = resolve_model(path)
    config = _config(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(dense_config(copy.deepcopy(config)))
        model.tie_weights()
        if hasattr(config, CONFIG_KEY):
            upcycle(model, UpcycleConfig.from_dict(getattr(config, CONFIG_KEY)), init_weights=False)
    return model


def load_config(path: str, **hub):
    """The model config at `path` (resolved); UserError naming the file, and the field of a wrong type."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        return AutoConfig.from_pretrained(path, **hub)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model config from {path!r}: {str(e).splitlines()[0]}") from None
    except StrictDataclassError as e:  # transformers 5 validates field types: name the field, not a traceback
        cause = str(e.__cause__ or e).strip().splitlines()[-1].strip()
        raise UserError(f"{os.path.join(path, 'config.json')}: {cause[0].lower() + cause[1:]}") from None


_config = load_config


def load_tokenizer(path: str):
    """The tokenizer saved with model `path` (resolved), its config.json checked first; UserError if either
    cannot be loaded (a tokenizer may read config.json, and would fail with a traceback there)."""
    from transformers import AutoTokenizer

    load_config(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from None


def _resolve_dtype(dtype, config) -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _weight_files(path: str, **hub) -> list[str]:
    """Local paths of the checkpoint's safetensors files (one, or the shards of an index)."""
    index = cached_file(path, _INDEX, _raise_exceptions_for_missing_entries=False, **hub)
    if index is None:
        single = cached_file(path, _WEIGHTS, _raise_exceptions_for_missing_entries=False, **hub)
        if single is None:
            raise UserError(f"{path}: no {_WEIGHTS} or {_INDEX} (an xft MoE is saved as safetensors)")
        return [single]
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return [cached_file(path, shard, **hub) for shard in shards]


@torch.no_grad()
def _load_weights(model: nn.Module, files: list[str]) -> None:
    """Copy every tensor of `files` into `model`, one at a time (peak memory: the model + one tensor).

    Asserts that keys and shapes match; only tied aliases (e.g. an LM head tied to the embeddings)
    may be absent from the files.
    """
    expected = model.state_dict()
    seen = set()
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key not in expected:
                    raise UserError(f"{file}: tensor {key} does not exist in the model "
                                    f"({type(model).__name__} upcycled as recorded in config.json)")
                tensor = f.get_tensor(key)
                if tensor.shape != expected[key].shape:
                    raise UserError(f"{file}: tensor {key} has shape {tuple(tensor.shape)}; "
                                    f"the model expects {tuple(expected[key].shape)}")
                expected[key].copy_(tensor)
                seen.add(key)
    missing = sorted(set(expected) - seen - _tied_keys(model))
    if missing:
        raise UserError(f"checkpoint is missing {len(missing)} tensors: {missing[:5]}"
                        f"{'…' if len(missing) > 5 else ''}")
    model.tie_weights()


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that alias another tensor in the model (e.g. a tied LM head)."""
    seen, tied = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(name)
        seen.setdefault(id(tensor), name)
    return tied
