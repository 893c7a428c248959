"""Model configuration: frozen, hashable dataclasses read from a transformers config.json.

Parsing goes through transformers' own config classes, so every default that a
partial hub config relies on (llava-hf's text_config lists only a few fields) and
every legacy RoPE layout (`rope_theta` + `rope_scaling`, or v5 `rope_parameters`)
is filled exactly as transformers fills it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


class ConfigError(ValueError):
    """A config that jaxflow cannot build a model from."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    rope: RopeConfig = RopeConfig()
    attention_bias: bool = False  # q/k/v (and o, unless o_proj_bias says otherwise) projections
    o_proj_bias: bool | None = None  # None: as attention_bias (Llama); Qwen2: False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 32000
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    tie_word_embeddings: bool = False
    family = "llava"

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Vision hidden-state indices (into the L+1 states, negatives resolved)."""
        layers = self.vision_feature_layer
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        n = self.vision.num_layers + 1
        return tuple(l % n for l in layers)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image in the language model's sequence."""
        extra = 1 if self.vision_feature_select_strategy == "full" else 0
        return self.vision.num_patches + extra

    @property
    def grid_hw(self) -> tuple[int, int]:
        return (self.vision.grid, self.vision.grid)

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-5 style LLaVA config.json dict for this config."""
        v = self.vision
        return {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "image_token_index": self.image_token_id,
            "vision_feature_layer": (self.vision_feature_layer if isinstance(self.vision_feature_layer, int)
                                     else list(self.vision_feature_layer)),
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "projector_hidden_act": self.projector_hidden_act,
            "multimodal_projector_bias": self.projector_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "image_seq_length": self.num_image_tokens,
            "vision_config": {
                "model_type": "clip_vision_model", "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
                "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
                "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act,
            },
            "text_config": text_config_to_hf(self.text, "llama", self.tie_word_embeddings),
        }


def _rope_from_hf(text_cfg) -> RopeConfig:
    if hasattr(text_cfg, "standardize_rope_params"):
        text_cfg.standardize_rope_params()
    params = dict(getattr(text_cfg, "rope_parameters", None) or {})
    if not params:  # very old configs: rope_theta + rope_scaling attributes
        params = dict(getattr(text_cfg, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(text_cfg, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"unsupported rope type {rope_type!r}; jaxflow supports {', '.join(SUPPORTED_ROPE_TYPES)}")
    return RopeConfig(
        rope_type=rope_type,
        theta=float(params.get("rope_theta", 10000.0)),
        factor=float(params.get("factor", 1.0) or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings")
                                             or text_cfg.max_position_embeddings),
    )


def _as_tuple(x) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(int(i) for i in x) if isinstance(x, (list, tuple)) else (int(x),)


def text_config_from_hf(t) -> TextConfig:
    """A transformers Llama or Qwen2 text config object -> TextConfig (Qwen2: q/k/v bias, no o bias)."""
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    qwen2 = getattr(t, "model_type", "llama") == "qwen2"
    if qwen2 and getattr(t, "use_sliding_window", False):
        raise ConfigError("Qwen2 decoders with use_sliding_window=True are not supported")
    return TextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
        num_kv_heads=t.num_key_value_heads or t.num_attention_heads, head_dim=head_dim,
        rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings,
        rope=_rope_from_hf(t), attention_bias=True if qwen2 else bool(getattr(t, "attention_bias", False)),
        o_proj_bias=False if qwen2 else None,
        mlp_bias=bool(getattr(t, "mlp_bias", False)), hidden_act=t.hidden_act,
        bos_token_id=t.bos_token_id, eos_token_id=_as_tuple(t.eos_token_id), pad_token_id=t.pad_token_id,
    )


def text_config_to_hf(t: TextConfig, model_type: str, tie_word_embeddings: bool) -> dict[str, Any]:
    """TextConfig -> a transformers text_config dict (inverse of `text_config_from_hf`)."""
    rope: dict[str, Any] = {"rope_type": t.rope.rope_type, "rope_theta": t.rope.theta}
    if t.rope.rope_type != "default":
        rope["factor"] = t.rope.factor
    if t.rope.rope_type == "llama3":
        rope.update(low_freq_factor=t.rope.low_freq_factor, high_freq_factor=t.rope.high_freq_factor,
                    original_max_position_embeddings=t.rope.original_max_position_embeddings)
    eos = list(t.eos_token_id)
    d = {
        "model_type": model_type, "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
        "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
        "rope_parameters": rope, "hidden_act": t.hidden_act, "bos_token_id": t.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": t.pad_token_id,
        "tie_word_embeddings": tie_word_embeddings,
    }
    if model_type == "llama":
        d.update(attention_bias=t.attention_bias, mlp_bias=t.mlp_bias)
    return d


def from_hf_dict(d: dict[str, Any]) -> LlavaConfig:
    """Builds a LlavaConfig from a transformers LLaVA config.json dict (any transformers version)."""
    from transformers import LlavaConfig as HFLlavaConfig  # configs only: no torch needed

    model_type = d.get("model_type")
    if model_type != "llava":
        raise ConfigError(f"config.json has model_type={model_type!r}; jaxflow converts LLaVA checkpoints "
                          "(model_type 'llava', LlavaForConditionalGeneration)")
    vt = (d.get("vision_config") or {}).get("model_type", "clip_vision_model")
    if vt != "clip_vision_model":
        raise ConfigError(f"vision tower {vt!r} is not supported; jaxflow supports CLIP vision towers")
    tt = (d.get("text_config") or {}).get("model_type", "llama")
    if tt != "llama":
        raise ConfigError(f"language model {tt!r} is not supported; jaxflow supports Llama decoders")
    try:
        hf = HFLlavaConfig.from_dict(dict(d))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ConfigError(f"config.json is not a valid LLaVA config: {e}") from e
    v, t = hf.vision_config, hf.text_config
    if v.hidden_act not in ("quick_gelu", "gelu"):
        raise ConfigError(f"vision hidden_act {v.hidden_act!r} not supported (quick_gelu, gelu)")
    if t.hidden_act != "silu":
        raise ConfigError(f"text hidden_act {t.hidden_act!r} not supported (silu)")
    if hf.projector_hidden_act not in ("gelu", "gelu_pytorch_tanh", "quick_gelu", "silu", "relu"):
        raise ConfigError(f"projector_hidden_act {hf.projector_hidden_act!r} not supported")
    strategy = hf.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ConfigError(f"vision_feature_select_strategy {strategy!r} not supported (default, full)")
    vfl = hf.vision_feature_layer
    vfl = int(vfl) if isinstance(vfl, int) else tuple(int(i) for i in vfl)
    text = text_config_from_hf(t)
    vision = VisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_layers=v.num_hidden_layers,
        num_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        num_channels=v.num_channels, layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act,
    )
    cfg = LlavaConfig(
        vision=vision, text=text, image_token_id=int(hf.image_token_id), vision_feature_layer=vfl,
        vision_feature_select_strategy=strategy, projector_hidden_act=hf.projector_hidden_act,
        projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
    )
    for l in (vfl,) if isinstance(vfl, int) else vfl:
        if not -(vision.num_layers + 1) <= l <= vision.num_layers:
            raise ConfigError(f"vision_feature_layer {l} is outside the {vision.num_layers + 1} hidden states")
    return cfg


def load_config(path: str):
    """Reads `path/config.json` (or a config.json path) into its family's config (LlavaConfig, ...)."""
    f = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(f):
        raise ConfigError(f"no config.json at {path}")
    try:
        with open(f) as fh:
            d = json.load(fh)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f} is not valid JSON: {e}") from e
    from jaxflow.models.family import config_from_hf_dict

    return config_from_hf_dict(d)
