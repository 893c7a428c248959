"""Qwen-VL (v1, 2023; the paper's Qwen model): a ViT, one cross-attention resampler of 256 queries,
and a Qwen-7B decoder, matching the official remote code (`QWenLMHeadModel`, `visual.py`).

Official checkpoint keys (`transformer.*`, `transformer.visual.*`, `lm_head.weight`) map onto:

    visual/conv1                                 (3*P*P, W)  patch embedding, no bias
    visual/positional_embedding                  (256, W)    bicubically resized to the patch grid
    visual/ln_pre, visual/blocks/... (stacked)   pre-LN blocks: ln_1, attn (in_proj per head [q|k|v]), ln_2, mlp
    visual/attn_pool/{query, pos_embed, kv_proj, attn/{q,k,v,out}_proj, ln_q, ln_kv}
    visual/ln_post, visual/proj                  (D, D) used as x @ proj
    language_model                               the Llama-like decoder (jaxflow.models.llama): c_attn split
                                                 into q/k/v (with bias), c_proj -> o_proj, w2 = gate, w1 = up

What the official code does and this file reproduces:
- the ViT's 16 x 16 positional table and the resampler's key positions are resized to the patch grid
  with torch's bicubic (a = -0.75, align_corners=False, no antialias), here an exact separable
  interpolation matrix; queries carry the fixed 16 x 16 sin-cos table;
- an image is `<img>`, 256 `<imgpad>`, `</img>`: the 256 slots between the markers get the image's
  features (`image_token_id` is `<imgpad>`), the markers keep their embeddings;
- RoPE positions are the absolute index in the padded sequence (the official forward ignores
  `position_ids`; batched evaluation pads on the left), so positions are arange(T) for every row;
- dynamic NTK: the rotary base is `base * alpha ** (d / (d - 2))` with
  alpha = max(2 ** ceil(log2(T / seq_length) + 1) - 1, 1) for the padded prompt length T; decoding
  keeps the prompt's alpha (`rope_tables(..., context_len=T)`);
- logn attention: every query at position p with p + 1 > seq_length is multiplied, after RoPE, by
  log(p + 1) / log(seq_length). `rope_tables` returns separate key and query tables (B, T, 2, hd),
  the query tables carrying that factor, so the one decoder layer needs no Qwen-specific branch.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxflow.models.config import ConfigError, RopeConfig, TextConfig
from jaxflow.models.family import DecoderVLM
from jaxflow.models.image_layout import square_geometry
from jaxflow.models.layers import LayerNorm, Linear, activation, attend, normal_init, rope_cos_sin
from jaxflow.models.llama import LlamaModel

REAL_IMAGE_START_ID = 151857  # <img> in the official tokenizer; </img> = +1, <imgpad> = +2
REAL_EOD_ID = 151643  # <|endoftext|>
POS_TABLE_SIDE = 16  # the ViT's positional table is 16 x 16 (256 rows) whatever the image size
LN_EPS = 1e-6  # every LayerNorm of visual.py


@dataclasses.dataclass(frozen=True)
class QwenVLVisionConfig:
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231
    image_size: int = 448
    patch_size: int = 14
    n_queries: int = 256
    output_dim: int = 4096
    image_start_id: int = REAL_IMAGE_START_ID

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def pool_heads(self) -> int:
        return self.output_dim // 128

    @property
    def query_side(self) -> int:
        return math.isqrt(self.n_queries)


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    vision: QwenVLVisionConfig
    text: TextConfig
    seq_length: int = 2048
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    tie_word_embeddings: bool = False
    extra: tuple = ()  # other config.json keys, kept for to_hf_dict: ((key, json value), ...)
    family = "qwen_vl"

    @property
    def image_start_id(self) -> int:
        return self.vision.image_start_id

    @property
    def image_end_id(self) -> int:
        return self.vision.image_start_id + 1

    @property
    def image_token_id(self) -> int:
        """<imgpad>: the 256 slots of an image span."""
        return self.vision.image_start_id + 2

    @property
    def num_image_tokens(self) -> int:
        return self.vision.n_queries

    @property
    def max_positions(self) -> int:
        """The official code's logn table covers positions up to 32767 (dynamic NTK stretches RoPE beyond
        max_position_embeddings, so that is the real limit)."""
        return 32767

    def to_hf_dict(self) -> dict[str, Any]:
        """The official config.json dict (model_type "qwen", `visual` section) for this config."""
        t, v = self.text, self.vision
        d = {k: json.loads(v) for k, v in self.extra}
        d.update({
            "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size, "num_attention_heads": t.num_heads, "kv_channels": t.head_dim,
            "intermediate_size": 2 * t.intermediate_size, "num_hidden_layers": t.num_layers,
            "layer_norm_epsilon": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
            "seq_length": self.seq_length, "no_bias": not t.mlp_bias, "rotary_emb_base": t.rope.theta,
            "rotary_pct": 1.0, "use_dynamic_ntk": self.use_dynamic_ntk, "use_logn_attn": self.use_logn_attn,
            "tie_word_embeddings": self.tie_word_embeddings,
            "visual": {"width": v.width, "layers": v.layers, "heads": v.heads, "mlp_ratio": v.mlp_ratio,
                       "image_size": v.image_size, "patch_size": v.patch_size, "n_queries": v.n_queries,
                       "output_dim": v.output_dim, "image_start_id": v.image_start_id},
        })
        return d


_PARSED = {"vocab_size", "hidden_size", "num_attention_heads", "kv_channels", "intermediate_size",
           "num_hidden_layers", "layer_norm_epsilon", "max_position_embeddings", "seq_length", "no_bias",
           "rotary_emb_base", "rotary_pct", "use_dynamic_ntk", "use_logn_attn", "tie_word_embeddings", "visual",
           "architectures", "model_type"}


def qwen_vl_config_from_hf(d: dict[str, Any]) -> QwenVLConfig:
    """The official Qwen-VL config.json dict (model_type "qwen" with a `visual` section) -> QwenVLConfig."""
    if not isinstance(d.get("visual"), dict):
        raise ConfigError("config.json has model_type 'qwen' but no 'visual' section: that is the text-only Qwen, "
                          "which jaxflow does not support (Qwen-VL checkpoints have one)")
    try:
        vis = d["visual"]
        h, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        kv = int(d.get("kv_channels", h // heads))
        start = vis.get("image_start_id")
        vision = QwenVLVisionConfig(
            width=int(vis["width"]), layers=int(vis["layers"]), heads=int(vis["heads"]),
            mlp_ratio=float(vis["mlp_ratio"]), image_size=int(vis["image_size"]), patch_size=int(vis["patch_size"]),
            n_queries=int(vis.get("n_queries", 256)), output_dim=int(vis["output_dim"]),
            image_start_id=REAL_IMAGE_START_ID if start is None else int(start))
        vocab = int(d["vocab_size"])
        no_bias = bool(d.get("no_bias", True))
        eod = REAL_EOD_ID if vocab > REAL_EOD_ID else None
        text = TextConfig(
            vocab_size=vocab, hidden_size=h, intermediate_size=int(d["intermediate_size"]) // 2,
            num_layers=int(d["num_hidden_layers"]), num_heads=heads, num_kv_heads=heads, head_dim=kv,
            rms_norm_eps=float(d.get("layer_norm_epsilon", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
            rope=RopeConfig(theta=float(d.get("rotary_emb_base", 10000))), attention_bias=True,
            o_proj_bias=not no_bias, mlp_bias=not no_bias, hidden_act="silu", bos_token_id=None,
            eos_token_id=(eod,) if eod is not None else (), pad_token_id=eod)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"config.json is not a valid Qwen-VL config: {type(e).__name__}: {e}") from e
    if float(d.get("rotary_pct", 1.0)) != 1.0:
        raise ConfigError(f"rotary_pct {d['rotary_pct']} is not supported (Qwen-VL rotates the whole head, 1.0)")
    if heads * kv != h:
        raise ConfigError(f"num_attention_heads * kv_channels = {heads * kv} must equal hidden_size {h}")
    if vision.output_dim != h:
        raise ConfigError(f"visual.output_dim {vision.output_dim} must equal hidden_size {h}")
    if vision.output_dim % 128:
        raise ConfigError(f"visual.output_dim {vision.output_dim} must be a multiple of 128 (the resampler's heads)")
    if vision.query_side ** 2 != vision.n_queries:
        raise ConfigError(f"visual.n_queries {vision.n_queries} must be a perfect square")
    if vision.width % vision.heads:
        raise ConfigError(f"visual.width {vision.width} is not divisible by visual.heads {vision.heads}")
    if vision.image_size % vision.patch_size:
        raise ConfigError(f"visual.image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}")
    if vision.image_start_id + 2 >= vocab:
        raise ConfigError(f"visual.image_start_id {vision.image_start_id} (+2 for <imgpad>) lies outside the "
                          f"vocabulary of {vocab}")
    extra = tuple(sorted((k, v) for k, v in d.items() if k not in _PARSED and _jsonable(v)))
    return QwenVLConfig(vision=vision, text=text, seq_length=int(d.get("seq_length", 2048)),
                        use_dynamic_ntk=bool(d.get("use_dynamic_ntk", True)),
                        use_logn_attn=bool(d.get("use_logn_attn", True)),
                        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), extra=_freeze(extra))


def _jsonable(v) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, dict))


def _freeze(items):
    """(key, value) pairs -> (key, JSON text) pairs, so the config stays frozen and hashable."""
    return tuple((k, json.dumps(v, sort_keys=True)) for k, v in items)


# --------------------------------------------------------------------------- NTK, logn, bicubic


def ntk_alpha(context_len: int, seq_length: int) -> float:
    """The official dynamic-NTK factor for a prompt of `context_len` positions (padding included)."""
    value = math.log(context_len / seq_length, 2) + 1
    return max(2 ** math.ceil(value) - 1, 1)


def logn_scale(positions, seq_length: int):
    """(...) int positions -> (...) float32: log(p + 1) / log(seq_length) where p + 1 > seq_length, else 1."""
    p1 = positions.astype(jnp.float32) + 1.0
    return jnp.where(p1 > seq_length, jnp.log(p1) / np.float32(math.log(seq_length)), 1.0).astype(jnp.float32)


def _cubic(x, a: float = -0.75):
    """torch's cubic convolution weights for the 4 taps around a fractional offset x in [0, 1)."""
    def near(t):  # |t| <= 1
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def far(t):  # 1 < |t| < 2
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    return np.array([far(x + 1), near(x), near(1 - x), far(2 - x)])


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32: torch `F.interpolate(mode="bicubic", align_corners=False)` along one axis
    (no antialias, source index not clamped, taps clamped to the border) as a matrix."""
    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = scale * (i + 0.5) - 0.5
        base = math.floor(src)
        w = _cubic(src - base)
        for k in range(4):
            m[i, min(max(base - 1 + k, 0), n_in - 1)] += w[k]
    return m.astype(np.float32)


def resize_table(table, side_out: int):
    """A (side_in^2, C) table on a side_in x side_in grid -> (side_out^2, C), bicubic as torch does;
    unchanged when the sides agree (as the official `get_abs_pos`)."""
    side_in = math.isqrt(table.shape[0])
    if side_in == side_out:
        return table
    r = jnp.asarray(bicubic_matrix(side_in, side_out))  # (out, in)
    grid = table.astype(jnp.float32).reshape(side_in, side_in, -1)
    out = jnp.einsum("ai,ijc,bj->abc", r, grid, r)
    return out.reshape(side_out * side_out, -1).astype(table.dtype)


def sincos_2d(dim: int, side: int) -> np.ndarray:
    """The resampler's fixed (side^2, dim) 2-D sin-cos table (MAE's layout: half for h, half for w)."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float32) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1).astype(np.float32)


# --------------------------------------------------------------------------- the vision tower


class VisualAttention(nnx.Module):
    """Self-attention of the ViT blocks; the official `in_proj` is split per head into q, k, v here."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, dtype):
        self.q_proj = Linear(width, width, bias=True, rngs=rngs, dtype=dtype, axes=("embed", "heads"))
        self.k_proj = Linear(width, width, bias=True, rngs=rngs, dtype=dtype, axes=("embed", "heads"))
        self.v_proj = Linear(width, width, bias=True, rngs=rngs, dtype=dtype, axes=("embed", "heads"))
        self.out_proj = Linear(width, width, bias=True, rngs=rngs, dtype=dtype, axes=("heads", "embed"))
        self.heads = heads

    def __call__(self, x, impl: str):  # (B, N, W) -> (B, N, W)
        b, n, w = x.shape
        split = lambda t: t.reshape(b, n, self.heads, w // self.heads)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        o = attend(q, k, v, jnp.ones((b, n, n), bool), impl=impl, scale=(w // self.heads) ** -0.5)
        return self.out_proj(o.reshape(b, n, w))


class VisualMLP(nnx.Module):
    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, dtype):
        self.c_fc = Linear(width, hidden, bias=True, rngs=rngs, dtype=dtype, axes=("embed", "mlp"))
        self.c_proj = Linear(hidden, width, bias=True, rngs=rngs, dtype=dtype, axes=("mlp", "embed"))

    def __call__(self, x):
        return self.c_proj(activation("gelu")(self.c_fc(x)))


class VisualBlock(nnx.Module):
    def __init__(self, cfg: QwenVLVisionConfig, *, rngs: nnx.Rngs, dtype):
        self.ln_1 = LayerNorm(cfg.width, LN_EPS, dtype)
        self.attn = VisualAttention(cfg.width, cfg.heads, rngs=rngs, dtype=dtype)
        self.ln_2 = LayerNorm(cfg.width, LN_EPS, dtype)
        self.mlp = VisualMLP(cfg.width, cfg.mlp_width, rngs=rngs, dtype=dtype)

    def __call__(self, x, impl: str):  # (B, N, W)
        x = x + self.attn(self.ln_1(x), impl)
        return x + self.mlp(self.ln_2(x))


class Resampler(nnx.Module):
    """One cross-attention of `n_queries` learned queries over the patch features (nn.MultiheadAttention)."""

    def __init__(self, cfg: QwenVLVisionConfig, *, rngs: nnx.Rngs, dtype):
        d = cfg.output_dim
        self.query = nnx.Param(normal_init(rngs, (cfg.n_queries, d), dtype))
        self.pos_embed = nnx.Param(jnp.asarray(sincos_2d(d, cfg.query_side), dtype))
        self.kv_proj = Linear(cfg.width, d, bias=False, rngs=rngs, dtype=dtype) if cfg.width != d else None
        self.q_proj = Linear(d, d, bias=True, rngs=rngs, dtype=dtype)
        self.k_proj = Linear(d, d, bias=True, rngs=rngs, dtype=dtype)
        self.v_proj = Linear(d, d, bias=True, rngs=rngs, dtype=dtype)
        self.out_proj = Linear(d, d, bias=True, rngs=rngs, dtype=dtype)
        self.ln_q = LayerNorm(d, LN_EPS, dtype)
        self.ln_kv = LayerNorm(d, LN_EPS, dtype)
        self.heads = cfg.pool_heads

    def __call__(self, x, grid: int, impl: str):  # (B, N, W) -> (B, n_queries, D)
        b, n, _ = x.shape
        kv = self.ln_kv(x if self.kv_proj is None else self.kv_proj(x))  # (B, N, D)
        pos = self.pos_embed[...]
        q_in = jnp.broadcast_to(self.ln_q(self.query[...]) + pos, (b,) + pos.shape)  # (B, Q, D)
        k_in = kv + resize_table(pos, grid)[None].astype(kv.dtype)
        d = kv.shape[-1]
        hd = d // self.heads
        q = self.q_proj(q_in).reshape(b, -1, self.heads, hd)
        k = self.k_proj(k_in).reshape(b, n, self.heads, hd)
        v = self.v_proj(kv).reshape(b, n, self.heads, hd)
        o = attend(q, k, v, jnp.ones((b, q.shape[1], n), bool), impl=impl, scale=hd ** -0.5)
        return self.out_proj(o.reshape(b, -1, d))


class QwenVisionTransformer(nnx.Module):
    """pixel_values (B, 3, S, S) -> (B, n_queries, output_dim): ViT, resampler, ln_post, @ proj."""

    def __init__(self, cfg: QwenVLVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        p, w = cfg.patch_size, cfg.width
        self.conv1 = nnx.Param(normal_init(rngs, (3 * p * p, w), dtype))  # conv (W, 3, P, P) as a matmul
        self.positional_embedding = nnx.Param(normal_init(rngs, (POS_TABLE_SIDE ** 2, w), dtype))
        self.ln_pre = LayerNorm(w, LN_EPS, dtype)

        @nnx.split_rngs(splits=cfg.layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return VisualBlock(cfg, rngs=rngs, dtype=dtype)

        self.blocks = make_blocks(rngs)
        self.attn_pool = Resampler(cfg, rngs=rngs, dtype=dtype)
        self.ln_post = LayerNorm(cfg.output_dim, LN_EPS, dtype)
        self.proj = nnx.Param(normal_init(rngs, (cfg.output_dim, cfg.output_dim), dtype))

    def __call__(self, pixel_values, impl: str = "fused"):
        cfg = self.cfg
        b, c, h, w = pixel_values.shape
        if (c, h, w) != (3, cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values must be (B, 3, {cfg.image_size}, {cfg.image_size}), "
                             f"got {tuple(pixel_values.shape)}")
        p, g = cfg.patch_size, cfg.grid
        kernel = self.conv1[...]
        x = pixel_values.astype(kernel.dtype).reshape(b, 3, g, p, g, p)
        x = x.transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p) @ kernel  # (B, N, W)
        x = x + resize_table(self.positional_embedding[...], g)[None].astype(x.dtype)
        x = self.ln_pre(x)
        graphdef, state = nnx.split(self.blocks)

        def body(hid, block_state):
            return nnx.merge(graphdef, block_state)(hid, impl), None

        x, _ = jax.lax.scan(body, x, state)
        x = self.attn_pool(x, g, impl)  # (B, Q, D)
        return self.ln_post(x) @ self.proj[...]


# --------------------------------------------------------------------------- the model


class QwenVL(DecoderVLM, nnx.Module):
    """Parameters of a Qwen-VL model; implements `jaxflow.models.family.VisionLanguageModel`."""

    family = "qwen_vl"
    left_padding_invariant = False  # RoPE at the padded index, the NTK factor from the padded length

    def __init__(self, cfg: QwenVLConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = cfg
        self.visual = QwenVisionTransformer(cfg.vision, rngs=rngs, dtype=dtype)
        self.language_model = LlamaModel(cfg.text, tie_word_embeddings=cfg.tie_word_embeddings, rngs=rngs,
                                         dtype=dtype)

    def image_features(self, pixel_values, impl: str = "fused"):
        """pixel_values (n_images, 3, S, S) -> (n_images, n_queries, D)."""
        return self.visual(pixel_values, impl)

    def positions(self, input_ids, attention_mask, images=None):  # (B, T) -> (B, T) int32
        """The absolute index in the padded sequence, pads included, as the official forward uses."""
        b, t = input_ids.shape
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def rope_tables(self, positions, dtype, context_len=None):
        """positions (B, T) -> cos, sin: (B, T, hd), or (B, T, 2, hd) (key tables, query tables) with logn.

        context_len: the padded prompt length whose NTK alpha applies (static); None: max(positions) + 1."""
        cfg = self.config
        hd = cfg.text.head_dim
        exponent = jnp.arange(0, hd, 2, dtype=jnp.float32) / hd
        if not cfg.use_dynamic_ntk:
            base = jnp.float32(cfg.text.rope.theta)
        elif context_len is not None:
            base = jnp.float32(cfg.text.rope.theta * ntk_alpha(int(context_len), cfg.seq_length) ** (hd / (hd - 2)))
        else:  # traced: the same formula on the longest position of the call
            n = (jnp.max(positions) + 1).astype(jnp.float32)
            alpha = jnp.maximum(2.0 ** jnp.ceil(jnp.log2(n / cfg.seq_length) + 1) - 1, 1.0)
            base = jnp.float32(cfg.text.rope.theta) * alpha ** (hd / (hd - 2))
        cos, sin = rope_cos_sin(positions, 1.0 / (base ** exponent), dtype)
        if not cfg.use_logn_attn:
            return cos, sin
        s = logn_scale(positions, cfg.seq_length)[..., None].astype(dtype)  # (B, T, 1)
        return jnp.stack([cos, cos * s], axis=-2), jnp.stack([sin, sin * s], axis=-2)

    # host side ------------------------------------------------------------------------------

    def check_pixels(self, pixel_values, **_) -> int:
        """Validates the image shape; returns how many image tokens the images give."""
        s = self.config.vision.image_size
        pv = np.shape(pixel_values)
        if len(pv) != 4 or tuple(pv[1:]) != (3, s, s):
            raise ValueError(f"pixel_values must be (n, 3, {s}, {s}) float32, got {tuple(pv)}")
        return pv[0] * self.config.num_image_tokens

    def image_geometries(self, input_ids, attention_mask, pixel_values, **_) -> list:
        """One geometry per image: the resampler's queries on their 16 x 16 sin-cos grid, row-major."""
        n = np.shape(pixel_values)[0]
        return [square_geometry(self.config.vision.query_side)] * n


# --------------------------------------------------------------------------- the official key table

_T = lambda a: np.ascontiguousarray(np.asarray(a).T)  # noqa: E731  torch Linear (out, in) -> (in, out)


def _rows(i: int, n: int, k: int = 3):
    """The i-th of k equal row blocks of a fused (k*n, ...) tensor, transposed for 2-D weights."""
    return lambda a: _T(np.asarray(a)[i * n:(i + 1) * n]) if np.ndim(a) == 2 else np.asarray(a)[i * n:(i + 1) * n]


def _head_rows(i: int, heads: int):
    """Rows of q (i=0), k (1) or v (2) from the ViT's per-head [q_h | k_h | v_h] in_proj."""
    def f(a):
        a = np.asarray(a)
        per = a.reshape((heads, 3, a.shape[0] // (3 * heads)) + a.shape[1:])[:, i]
        per = per.reshape((a.shape[0] // 3,) + a.shape[1:])
        return _T(per) if per.ndim == 2 else per
    return f


def hf_source(path: tuple, cfg: QwenVLConfig):
    """Our parameter path -> (official keys, transform, stacked) for Qwen-VL."""
    t, v = cfg.text, cfg.vision
    leaf = path[-1]
    if path[0] == "language_model":
        if path[1] == "embed_tokens":
            return ("transformer.wte.weight",), np.asarray, False
        if path[1] == "lm_head":
            return ("lm_head.weight",), _T, False
        if path[1] == "norm":
            return ("transformer.ln_f.weight",), np.asarray, False
        sub = path[2:-1]
        name = {"kernel": "weight", "bias": "bias", "scale": "weight"}[leaf]
        keys = lambda mid: tuple(f"transformer.h.{i}.{mid}.{name}" for i in range(t.num_layers))  # noqa: E731
        if sub[0] in ("input_layernorm", "post_attention_layernorm"):
            return keys("ln_1" if sub[0] == "input_layernorm" else "ln_2"), np.asarray, True
        if sub[0] == "self_attn":
            if sub[1] == "o_proj":
                return keys("attn.c_proj"), (_T if leaf == "kernel" else np.asarray), True
            return keys("attn.c_attn"), _rows("qkv".index(sub[1][0]), t.num_heads * t.head_dim), True
        mlp = {"gate_proj": "w2", "up_proj": "w1", "down_proj": "c_proj"}[sub[1]]
        return keys(f"mlp.{mlp}"), (_T if leaf == "kernel" else np.asarray), True
    # the vision tower
    pre = "transformer.visual"
    rest = path[1:]
    if rest == ("conv1",):
        return (f"{pre}.conv1.weight",), lambda a: _T(np.asarray(a).reshape(a.shape[0], -1)), False
    if rest in (("positional_embedding",), ("proj",)):
        return (f"{pre}.{rest[0]}",), np.asarray, False
    name = {"kernel": "weight", "bias": "bias", "scale": "weight"}.get(leaf, leaf)
    if rest[0] == "blocks":
        sub = rest[1:-1]
        keys = lambda mid: tuple(f"{pre}.transformer.resblocks.{j}.{mid}" for j in range(v.layers))  # noqa: E731
        if sub[0] == "attn" and sub[1] in ("q_proj", "k_proj", "v_proj"):
            return keys(f"attn.in_proj.{name}"), _head_rows("qkv".index(sub[1][0]), v.heads), True
        return keys(".".join(sub) + "." + name), (_T if leaf == "kernel" else np.asarray), True
    if rest[0] == "attn_pool":
        sub = rest[1:]
        if sub in (("query",), ("pos_embed",)):
            return (f"{pre}.attn_pool.{sub[0]}",), np.asarray, False
        if sub[0] in ("q_proj", "k_proj", "v_proj"):
            key = f"{pre}.attn_pool.attn.in_proj_{name}"
            return (key,), _rows("qkv".index(sub[0][0]), v.output_dim), False
        mid = "attn.out_proj" if sub[0] == "out_proj" else sub[0]
        return (f"{pre}.attn_pool.{mid}.{name}",), (_T if leaf == "kernel" else np.asarray), False
    return (f"{pre}.{'.'.join(rest[:-1])}.{name}",), (_T if leaf == "kernel" else np.asarray), False


__all__ = ["QwenVL", "QwenVLConfig", "QwenVLVisionConfig", "qwen_vl_config_from_hf", "ntk_alpha", "logn_scale",
           "bicubic_matrix", "hf_source"]
