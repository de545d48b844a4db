"""Loading dense and MoE checkpoints: `xft.load(path_or_hub_id)`.

An MoE is saved with the ordinary `model.save_pretrained(dir)` (safetensors;
the stacked expert tensors `[N, *shape]` are ordinary tensors) and its
`config.json` carries the `UpcycleConfig` under ``"xft"``. Loading rebuilds the
original dense class from that config, upcycles it (structure only), then
loads every tensor, checking that each key and shape matches — nothing is
skipped silently. A checkpoint without the ``"xft"`` entry is a plain
`transformers` model and is loaded with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights
from transformers.utils import cached_file

from xft.config import UpcycleConfig
from xft.errors import UserError
from xft.upcycle import CONFIG_KEY, upcycle

_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def is_moe_checkpoint(path: str) -> bool:
    """Whether the checkpoint at `path` (dir or hub id) is an xft MoE."""
    return hasattr(_config(path), CONFIG_KEY)


def load(path: str, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
         **kwargs) -> nn.Module:
    """Load a dense or MoE causal LM from a local directory or hub id (detected from its config).

    `dtype`: None keeps the checkpoint's dtype; `device`: where to put the model
    (default CPU). Extra `kwargs` go to `from_pretrained` for dense models.
    """
    config = _config(path)
    if not hasattr(config, CONFIG_KEY):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", **kwargs)
        return model.to(device) if device is not None else model
    xft_config = UpcycleConfig.from_dict(getattr(config, CONFIG_KEY))
    dense_config = copy.deepcopy(config)
    delattr(dense_config, CONFIG_KEY)
    dtype = _resolve_dtype(dtype, config)
    with no_init_weights():  # every tensor is overwritten below
        model = AutoModelForCausalLM.from_config(dense_config, dtype=dtype)
    upcycle(model, xft_config)
    _load_state(model, _state_dict(path))
    model = model.to(device) if device is not None else model
    return model.eval()


def _config(path: str):
    if os.path.sep in str(path) or str(path).startswith("."):
        if not os.path.isdir(path):
            raise UserError(f"model path {path!r} does not exist or is not a directory")
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as e:
        raise UserError(f"cannot load a model config from {path!r}: {str(e).splitlines()[0]}") from None


def _resolve_dtype(dtype, config) -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _state_dict(path: str) -> dict[str, torch.Tensor]:
    index = cached_file(path, _INDEX, _raise_exceptions_for_missing_entries=False)
    if index is None:
        single = cached_file(path, _WEIGHTS, _raise_exceptions_for_missing_entries=False)
        if single is None:
            raise UserError(f"{path}: no {_WEIGHTS} or {_INDEX} (an xft MoE is saved as safetensors)")
        return load_file(single)
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
        state.update(load_file(cached_file(path, shard)))
    return state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into `model`, asserting that keys and shapes match (tied weights may be absent)."""
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    tied = _tied_keys(model)
    missing = [k for k in missing if k not in tied]
    if unexpected or missing:
        raise UserError(f"checkpoint does not match the model: missing {missing[:5]}"
                        f"{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                        f"{'…' if len(unexpected) > 5 else ''}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise UserError(f"checkpoint tensor {key} has shape {tuple(tensor.shape)}; "
                            f"the model expects {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that alias another tensor in the model (e.g. a tied LM head)."""
    seen, tied = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(name)
        seen.setdefault(id(tensor), name)
    return tied
