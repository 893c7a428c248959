"""InternVL's vision side (transformers' `InternVLForConditionalGeneration`, the "-hf" checkpoints):
the InternViT tower, pixel shuffle and the multimodal projector, matching transformers exactly.

Layout mirrors transformers' module names, so a parameter path reads as its checkpoint key:

    vision_tower/embeddings/cls_token                              (1, D)
    vision_tower/embeddings/position_embeddings                    (P + 1, D)   [use_absolute_position_embeddings]
    vision_tower/embeddings/patch_embeddings/projection/{kernel (C*p*p, D), bias (D,)}
    vision_tower/encoder/layer/...                                 stacked: leading axis L
        attention/{q_proj,k_proj,v_proj,projection_layer}/{kernel, bias}   (q/k/v bias: attention_bias)
        attention/{q_norm,k_norm}/scale                            [use_qk_norm]
        lambda_1, lambda_2                                         (L, D) layer scale
        layernorm_before/{scale, bias}, layernorm_after/{scale, bias}      (no bias for rms_norm)
        mlp/{fc1,fc2}/{kernel, bias}
    vision_tower/layernorm/{scale, bias}                           [not use_mean_pooling]
    multi_modal_projector/{layer_norm/{scale, bias}, linear_1/{kernel, bias}, linear_2/{kernel, bias}}

What transformers does, and this file mirrors:
- each layer: h = x + lambda_1 * attn(norm_before(x)); out = h + lambda_2 * mlp(norm_after(h));
- QK-norm is an RMSNorm over the full hidden size (before the head split), always eps 1e-6;
- `vision_tower.layernorm` is a LayerNorm (whatever norm_type says) when use_mean_pooling is False
  and the identity otherwise; it is applied to `last_hidden_state` only, so only
  vision_feature_layer == -1 (literally) sees it, never `hidden_states[i]`;
- the projector's LayerNorm has torch's default eps 1e-5.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxflow.models.clip import ClipMLP  # transformers builds InternViT's MLP from CLIPMLP too
from jaxflow.models.config import ConfigError
from jaxflow.models.layers import LayerNorm, Linear, RMSNorm, activation, attend, normal_init

NORM_TYPES = ("layer_norm", "rms_norm")
QK_NORM_EPS = 1e-6  # transformers builds q_norm / k_norm with the RMSNorm default, not layer_norm_eps
PROJECTOR_LN_EPS = 1e-5  # nn.LayerNorm default in InternVLMultiModalProjector


def _square(name: str, v) -> int:
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or int(v[0]) != int(v[1]):
            raise ConfigError(f"InternViT {name} {list(v)} is not square; jaxflow supports square tiles only")
        return int(v[0])
    return int(v)


@dataclasses.dataclass(frozen=True)
class InternVisionConfig:
    """The InternViT vision tower; image_size / patch_size accept an int or transformers' [h, w]."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    norm_type: str = "layer_norm"
    use_qk_norm: bool = False
    attention_bias: bool = False
    layer_scale_init_value: float = 0.1
    use_absolute_position_embeddings: bool = True
    use_mean_pooling: bool = True  # True: no final `layernorm` (transformers uses nn.Identity)

    def __post_init__(self):
        object.__setattr__(self, "image_size", _square("image_size", self.image_size))
        object.__setattr__(self, "patch_size", _square("patch_size", self.patch_size))
        if self.norm_type not in NORM_TYPES:
            raise ConfigError(f"InternViT norm_type {self.norm_type!r} not supported ({', '.join(NORM_TYPES)})")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"InternViT hidden_size {self.hidden_size} is not divisible by "
                              f"num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"InternViT image_size {self.image_size} is not a multiple of "
                              f"patch_size {self.patch_size}")
        try:
            activation(self.hidden_act)
        except ValueError:
            raise ConfigError(f"InternViT hidden_act {self.hidden_act!r}: unknown activation") from None

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers `vision_config` dict (InternVLVisionConfig) for this config."""
        return {
            "model_type": "internvl_vision", "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "image_size": [self.image_size, self.image_size],
            "patch_size": [self.patch_size, self.patch_size], "num_channels": self.num_channels,
            "layer_norm_eps": self.layer_norm_eps, "hidden_act": self.hidden_act, "norm_type": self.norm_type,
            "use_qk_norm": self.use_qk_norm, "attention_bias": self.attention_bias,
            "layer_scale_init_value": self.layer_scale_init_value,
            "use_absolute_position_embeddings": self.use_absolute_position_embeddings,
            "use_mean_pooling": self.use_mean_pooling, "use_mask_token": False,
        }


def vision_config_from_hf(d: dict[str, Any]) -> InternVisionConfig:
    """An InternVL `vision_config` dict, parsed by transformers' InternVLVisionConfig (its defaults).

    Ignored: dropouts (inference only), initializer settings, chunk_size_feed_forward.
    Rejected (ConfigError, a ValueError): use_mask_token (masked image modelling only), non-square
    image/patch sizes, norm types other than layer_norm / rms_norm, unknown activations.
    """
    from transformers import InternVLVisionConfig  # configs only: no torch needed

    mt = d.get("model_type", "internvl_vision")
    if mt != "internvl_vision":
        raise ConfigError(f"vision_config has model_type={mt!r}; expected 'internvl_vision'")
    try:
        v = InternVLVisionConfig.from_dict(dict(d))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ConfigError(f"not a valid InternVL vision_config: {' '.join(str(e).split())}") from e
    if v.use_mask_token:
        raise ConfigError("InternViT use_mask_token=True is not supported (masked image modelling only)")
    return InternVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_layers=v.num_hidden_layers,
        num_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        num_channels=v.num_channels, layer_norm_eps=float(v.layer_norm_eps), hidden_act=v.hidden_act,
        norm_type=v.norm_type, use_qk_norm=bool(v.use_qk_norm), attention_bias=bool(v.attention_bias),
        layer_scale_init_value=float(v.layer_scale_init_value),
        use_absolute_position_embeddings=bool(v.use_absolute_position_embeddings),
        use_mean_pooling=bool(v.use_mean_pooling),
    )


# --------------------------------------------------------------------------- vision tower


def _norm(cfg: InternVisionConfig, dtype):
    if cfg.norm_type == "rms_norm":
        return RMSNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
    return LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)


class InternVisionAttention(nnx.Module):
    def __init__(self, cfg: InternVisionConfig, *, rngs: nnx.Rngs, dtype):
        d = cfg.hidden_size
        self.q_proj = Linear(d, d, bias=cfg.attention_bias, rngs=rngs, dtype=dtype, axes=("embed", "heads"))
        self.k_proj = Linear(d, d, bias=cfg.attention_bias, rngs=rngs, dtype=dtype, axes=("embed", "heads"))
        self.v_proj = Linear(d, d, bias=cfg.attention_bias, rngs=rngs, dtype=dtype, axes=("embed", "heads"))
        self.projection_layer = Linear(d, d, bias=True, rngs=rngs, dtype=dtype, axes=("heads", "embed"))
        self.q_norm = RMSNorm(d, QK_NORM_EPS, dtype) if cfg.use_qk_norm else None
        self.k_norm = RMSNorm(d, QK_NORM_EPS, dtype) if cfg.use_qk_norm else None
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim

    def __call__(self, x, impl: str):  # (N, T, D) -> (N, T, D)
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (N, T, D)
        if self.q_norm is not None:  # over the full hidden size, before the head split
            q, k = self.q_norm(q), self.k_norm(k)
        split = lambda a: a.reshape(b, t, self.num_heads, self.head_dim)  # (N, T, H, hd)
        allowed = jnp.ones((b, t, t), bool)
        o = attend(split(q), split(k), split(v), allowed, impl=impl, scale=self.head_dim ** -0.5)
        return self.projection_layer(o.reshape(b, t, -1))


class InternVisionLayer(nnx.Module):
    """Pre-norm block with layer scale: x + l1 * attn(n1(x)), then h + l2 * mlp(n2(h))."""

    def __init__(self, cfg: InternVisionConfig, *, rngs: nnx.Rngs, dtype):
        d = cfg.hidden_size
        self.attention = InternVisionAttention(cfg, rngs=rngs, dtype=dtype)
        self.mlp = ClipMLP(cfg, rngs=rngs, dtype=dtype)
        self.layernorm_before = _norm(cfg, dtype)
        self.layernorm_after = _norm(cfg, dtype)
        self.lambda_1 = nnx.Param(jnp.full((d,), cfg.layer_scale_init_value, dtype))
        self.lambda_2 = nnx.Param(jnp.full((d,), cfg.layer_scale_init_value, dtype))

    def __call__(self, x, impl: str):  # (N, T, D) -> (N, T, D)
        h = x + self.lambda_1[...] * self.attention(self.layernorm_before(x), impl)
        return h + self.lambda_2[...] * self.mlp(self.layernorm_after(h))


class InternVisionPatchEmbeddings(nnx.Module):
    def __init__(self, cfg: InternVisionConfig, *, rngs: nnx.Rngs, dtype):
        p, c = cfg.patch_size, cfg.num_channels
        # the Conv2d (D, C, p, p) with bias, as a (C*p*p, D) matmul over patches flattened in (C, p, p) order
        self.projection = Linear(c * p * p, cfg.hidden_size, bias=True, rngs=rngs, dtype=dtype)


class InternVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: InternVisionConfig, *, rngs: nnx.Rngs, dtype):
        d = cfg.hidden_size
        self.cls_token = nnx.Param(normal_init(rngs, (1, d), dtype))
        self.patch_embeddings = InternVisionPatchEmbeddings(cfg, rngs=rngs, dtype=dtype)
        self.position_embeddings = (nnx.Param(normal_init(rngs, (cfg.num_patches + 1, d), dtype))
                                    if cfg.use_absolute_position_embeddings else None)
        self.cfg = cfg

    def __call__(self, pixel_values):  # (N, C, S, S) -> (N, 1 + P, D)
        cfg = self.cfg
        b, c, h, w = pixel_values.shape
        p, g = cfg.patch_size, cfg.grid
        if (c, h, w) != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values must be (N, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}), "
                             f"got {tuple(pixel_values.shape)}")
        proj = self.patch_embeddings.projection
        x = pixel_values.astype(proj.kernel.dtype).reshape(b, c, g, p, g, p)
        x = x.transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)  # (N, P, C*p*p), row-major patches
        patches = proj(x)  # (N, P, D)
        cls = jnp.broadcast_to(self.cls_token[...][None], (b, 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1)  # (N, 1 + P, D)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings[...][None]
        return x


class InternVisionEncoder(nnx.Module):
    """Holds `layer`: the InternVisionLayers stacked on a leading axis (transformers: encoder.layer.{i})."""

    def __init__(self, cfg: InternVisionConfig, *, rngs: nnx.Rngs, dtype):
        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs):
            return InternVisionLayer(cfg, rngs=rngs, dtype=dtype)

        self.layer = make_layers(rngs)


class InternVisionModel(nnx.Module):
    """pixel_values (N, C, S, S) -> hidden states (n+1, N, 1 + P, D) for the first n layers."""

    def __init__(self, cfg: InternVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        self.embeddings = InternVisionEmbeddings(cfg, rngs=rngs, dtype=dtype)
        self.encoder = InternVisionEncoder(cfg, rngs=rngs, dtype=dtype)
        # transformers: nn.Identity() if use_mean_pooling else nn.LayerNorm (even for norm_type rms_norm)
        self.layernorm = None if cfg.use_mean_pooling else LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)

    def __call__(self, pixel_values, num_layers: int | None = None, impl: str = "fused"):
        """(N, C, S, S) -> hidden states 0..n stacked (n + 1, N, 1 + P, D); index 0 = embeddings output.

        These are transformers' `hidden_states` (no final layernorm); see `last_hidden_state`."""
        n = self.cfg.num_layers if num_layers is None else num_layers
        if not 0 <= n <= self.cfg.num_layers:
            raise ValueError(f"num_layers must be in 0..{self.cfg.num_layers}, got {n}")
        x = self.embeddings(pixel_values)  # (N, 1 + P, D)
        if n == 0:
            return x[None]
        graphdef, state = nnx.split(self.encoder.layer)
        state = jax.tree.map(lambda a: a[:n], state)

        def body(h, layer_state):
            h = nnx.merge(graphdef, layer_state)(h, impl)
            return h, h

        _, hs = jax.lax.scan(body, x, state)  # (n, N, 1 + P, D)
        return jnp.concatenate([x[None], hs], axis=0)

    def last_hidden_state(self, h):  # (N, 1 + P, D) output of the last layer -> (N, 1 + P, D)
        """transformers' `last_hidden_state`: the final layernorm, when the config has one."""
        return h if self.layernorm is None else self.layernorm(h)


# --------------------------------------------------------------------------- pixel shuffle + projector


def pixel_shuffle(x, scale_factor: float = 0.5):
    """(N, W, H, C) -> (N, W*s, H*s, C/s^2), element order exactly as InternVLModel.pixel_shuffle."""
    n, w, h, c = x.shape
    s = scale_factor
    h2, w2, c1, c2 = h * s, w * s, c / s, c / (s * s)
    if any(abs(v - round(v)) > 1e-9 or round(v) < 1 for v in (h2, w2, c1, c2)):
        raise ValueError(f"pixel_shuffle: shape {tuple(x.shape)} does not divide by scale_factor {scale_factor}")
    h2, w2, c1, c2 = int(round(h2)), int(round(w2)), int(round(c1)), int(round(c2))
    x = x.reshape(n, w, h2, c1).transpose(0, 2, 1, 3)  # (N, H*s, W, C/s)
    return x.reshape(n, h2, w2, c2).transpose(0, 2, 1, 3)  # (N, W*s, H*s, C/s^2)


class InternVLProjector(nnx.Module):
    """layer_norm -> linear_1 -> act -> linear_2 over pixel-shuffled features (vision_hidden * (1/r)^2)."""

    def __init__(self, vision_hidden: int, text_hidden: int, *, downsample_ratio: float = 0.5,
                 hidden_act: str = "gelu", rngs: nnx.Rngs, dtype=jnp.float32):
        din = vision_hidden * int(1 / downsample_ratio) ** 2  # transformers' int() truncation
        self.layer_norm = LayerNorm(din, PROJECTOR_LN_EPS, dtype)
        self.linear_1 = Linear(din, text_hidden, bias=True, rngs=rngs, dtype=dtype, axes=(None, "mlp"))
        self.linear_2 = Linear(text_hidden, text_hidden, bias=True, rngs=rngs, dtype=dtype, axes=("mlp", "embed"))
        self.act = activation(hidden_act)
        self.in_features = din

    def __call__(self, x):  # (N, T, vision_hidden / r^2) -> (N, T, text_hidden)
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


def internvl_image_features(vision: InternVisionModel, projector: InternVLProjector, pixel_values, *,
                            vision_feature_layer: int, select_strategy: str, downsample_ratio: float,
                            impl: str = "fused"):
    """pixel_values (N_tiles, C, S, S) -> (N_tiles, tokens_per_tile, D_text), as transformers'
    InternVLModel.get_image_features(...).pooler_output."""
    num_l = vision.cfg.num_layers
    if not isinstance(vision_feature_layer, int) or isinstance(vision_feature_layer, bool):
        raise ValueError(f"vision_feature_layer must be one int, got {vision_feature_layer!r}")
    if not -(num_l + 1) <= vision_feature_layer <= num_l:
        raise ValueError(f"vision_feature_layer {vision_feature_layer} is outside the {num_l + 1} hidden states")
    if select_strategy not in ("default", "full"):
        raise ValueError(f"select_strategy must be 'default' or 'full', got {select_strategy!r}")
    t = vision.cfg.num_patches + (select_strategy == "full")
    side = math.isqrt(t)
    if side * side != t:
        raise ValueError(f"{t} vision tokens per tile do not form a square grid (select_strategy {select_strategy!r})")
    if vision_feature_layer == -1:  # transformers: last_hidden_state (after the final layernorm, if any)
        feats = vision.last_hidden_state(vision(pixel_values, impl=impl)[-1])  # (N, 1 + P, D)
    else:  # transformers: hidden_states[i], run only as far as needed
        feats = vision(pixel_values, num_layers=vision_feature_layer % (num_l + 1), impl=impl)[-1]
    if select_strategy == "default":
        feats = feats[:, 1:]  # (N, P, D)
    b, _, d = feats.shape
    feats = pixel_shuffle(feats.reshape(b, side, side, d), downsample_ratio)  # (N, g*r, g*r, D/r^2)
    feats = feats.reshape(b, -1, feats.shape[-1])  # (N, tokens_per_tile, D/r^2)
    if feats.shape[-1] != projector.in_features:
        raise ValueError(f"pixel-shuffled features have {feats.shape[-1]} channels, "
                         f"the projector expects {projector.in_features}")
    return projector(feats)


# --------------------------------------------------------------------------- checkpoint key map

ROOTS = ("vision_tower", "multi_modal_projector")
# paths whose transform is not the leaf rule's (kernel -> "transpose", anything else -> "ident")
_SPECIAL_TRANSFORMS = {
    ("vision_tower", "embeddings", "patch_embeddings", "projection", "kernel"): "conv",
    ("vision_tower", "embeddings", "cls_token"): "unbatch",
    ("vision_tower", "embeddings", "position_embeddings"): "unbatch",
}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight"}  # our leaf -> transformers' leaf
_STACKED = ("vision_tower", "encoder", "layer")


def hf_source(path: tuple[str, ...], cfg: InternVisionConfig) -> tuple[tuple[str, ...], str, bool]:
    """Our parameter path (rooted at "vision_tower" or "multi_modal_projector") -> (transformers keys
    as `save_pretrained` writes them, transform name in HF_TRANSFORMS, stacked).

    Stacked params (under vision_tower/encoder/layer) have one key per layer: transform each, then
    np.stack them on axis 0. In memory transformers prefixes the keys with "model."."""
    path = tuple(str(p) for p in path)
    if len(path) < 2 or path[0] not in ROOTS:
        raise ValueError(f"parameter path {'/'.join(path)} is not under {' or '.join(ROOTS)}")
    transform = _SPECIAL_TRANSFORMS.get(path, "transpose" if path[-1] == "kernel" else "ident")
    leaf = _LEAF_NAMES.get(path[-1], path[-1])
    if path[:3] == _STACKED:
        rest = ".".join(path[3:-1] + (leaf,))
        return tuple(f"vision_tower.encoder.layer.{i}.{rest}" for i in range(cfg.num_layers)), transform, True
    return (".".join(path[:-1] + (leaf,)),), transform, False


HF_TRANSFORMS = {
    "ident": lambda a: np.asarray(a),
    "transpose": lambda a: np.ascontiguousarray(np.asarray(a).T),  # torch Linear (out, in) -> (in, out)
    # Conv2d weight (D, C, p, p) -> (C*p*p, D), rows in the (C, p, p) order InternVisionEmbeddings flattens
    "conv": lambda a: np.ascontiguousarray(np.asarray(a).reshape(a.shape[0], -1).T),
    "unbatch": lambda a: np.asarray(a)[0],  # cls_token (1, 1, D) -> (1, D); position (1, P+1, D) -> (P+1, D)
}
