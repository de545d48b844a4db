"""How an xft MoE presents itself to `transformers`: never as the dense model it came from.

An upcycled model keeps its class (e.g. `LlamaForCausalLM`) and its config
object; only what is *written* changes. Its `config.json` says

    "model_type": "xft_moe", "base_model_type": "llama",
    "architectures": ["XFTMoEForCausalLM"], "base_architectures": [...], "xft": {UpcycleConfig}

so a tool that does not know xft refuses the checkpoint loudly instead of
loading the dense architecture with freshly initialised FFNs: plain
`transformers` raises "model type `xft_moe` ... does not recognize", vLLM
"architectures ['XFTMoEForCausalLM'] are not supported". In a process that has
imported xft, `AutoConfig` and `AutoModelForCausalLM.from_pretrained` know the
type and load the MoE exactly as `xft.load` does.

Mechanism: `mark_moe(config)` switches the live config to a subclass of its own
class whose `to_dict`/`to_diff_dict` write the fields above (everything else,
including `config.model_type` in memory, is the base's); `dense_config(config)`
undoes it. Checkpoints written before this format (base `model_type` plus an
``"xft"`` entry) still load through `xft.load`.
"""

from __future__ import annotations

import sys

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from xft.modelcard import MOE_NOTE

MODEL_TYPE = "xft_moe"
ARCHITECTURE = "XFTMoEForCausalLM"
CONFIG_KEY = "xft"
_BASE_TYPE = "base_model_type"
_BASE_ARCHS = "base_architectures"
_NOTE = MOE_NOTE  # written into config.json as "xft_note"; the model card says it too


class _MoEConfigMixin:
    """Writes an MoE config as `xft_moe`; in memory it stays the base config (same fields, same model_type)."""

    def _as_moe(self, d: dict) -> dict:
        d = dict(d)
        d[_BASE_TYPE] = self.base_config_class.model_type
        d["model_type"] = MODEL_TYPE
        d[_BASE_ARCHS] = self.architectures
        d["architectures"] = [ARCHITECTURE]
        d["xft_note"] = _NOTE
        return d

    def to_dict(self) -> dict:
        return self._as_moe(super().to_dict())

    def to_diff_dict(self) -> dict:
        return self._as_moe(super().to_diff_dict())


_CLASSES: dict[type, type] = {}


def moe_config_class(base: type) -> type:
    """The MoE twin of config class `base` (made once, importable by name so configs pickle)."""
    if base in _CLASSES:
        return _CLASSES[base]
    name = f"XFTMoE{base.__name__}"
    cls = type(name, (_MoEConfigMixin, base), {"base_config_class": base, "__module__": __name__,
                                               "__qualname__": name})
    setattr(sys.modules[__name__], name, cls)
    _CLASSES[base] = cls
    model_cls = type(f"XFTMoE{base.__name__}ForCausalLM", (_AutoLoader,), {"config_class": cls})
    AutoModelForCausalLM.register(cls, model_cls, exist_ok=True)
    return cls


def mark_moe(config: PretrainedConfig, upcycle_config: dict) -> None:
    """Record `upcycle_config` in `config` (in place) and make it write itself as an xft MoE."""
    setattr(config, CONFIG_KEY, upcycle_config)
    if not isinstance(config, _MoEConfigMixin):
        config.__class__ = moe_config_class(type(config))


def dense_config(config: PretrainedConfig) -> PretrainedConfig:
    """`config` (in place) as the plain base config again: no xft entry, the base class."""
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    if isinstance(config, _MoEConfigMixin):
        config.__class__ = config.base_config_class
    return config


class XFTMoEConfig(PretrainedConfig):
    """What `AutoConfig` builds for `model_type: xft_moe`: the base config, marked as an MoE."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        d = dict(config_dict)
        base_type = d.pop(_BASE_TYPE, None)
        if base_type not in CONFIG_MAPPING:
            raise ValueError(f"xft MoE config: base_model_type {base_type!r} is not a transformers model type")
        d["model_type"] = base_type
        d["architectures"] = d.pop(_BASE_ARCHS, None)
        d.pop("xft_note", None)
        result = CONFIG_MAPPING[base_type].from_dict(d, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        if CONFIG_KEY not in d:
            raise ValueError(f"xft MoE config without its {CONFIG_KEY!r} entry (the UpcycleConfig)")
        mark_moe(config, d[CONFIG_KEY])
        return result


class _AutoLoader:
    """`AutoModelForCausalLM.from_pretrained` on an xft MoE directory, in a process that imported xft."""

    # What the Auto classes pass along that changes nothing here: an xft MoE has no remote code or adapter.
    _NEUTRAL = {"trust_remote_code", "code_revision", "adapter_kwargs"}

    @classmethod
    def from_pretrained(cls, path, *args, config=None, dtype=None, torch_dtype=None, device_map=None, **kwargs):
        """Load through `xft.load`: download options are honoured, arguments it cannot honour refused (ValueError).

        Private arguments (`_from_auto`, `_commit_hash`, ...) are transformers' own plumbing between its
        loaders, not requests about what to load, so a release that adds one does not break this hook.
        """
        from xft.checkpoint import load
        from xft.errors import UserError

        if args or (device_map is not None and not isinstance(device_map, str)):
            raise ValueError(f"{path} is an xft MoE: from_pretrained loads it through xft.load(path, dtype, "
                             f"device), which takes no positional model arguments or per-module device_map")
        asked = {k: v for k, v in kwargs.items() if not k.startswith("_") and k not in cls._NEUTRAL}
        device = None if device_map in (None, "auto") else device_map
        try:
            return load(str(path), dtype=dtype or torch_dtype, device=device, config=config, **asked)
        except UserError as e:
            raise ValueError(str(e)) from None


AutoConfig.register(MODEL_TYPE, XFTMoEConfig, exist_ok=True)
