"""The vision towers of Qwen2-VL and Qwen2.5-VL (transformers' `model.visual`), matching transformers exactly.

Images of any size arrive packed: pixel_values (P, C*T*p*p), the patches of every image one after
the other, as transformers' image processor returns them, with grid_thw (N, 3) giving each image's
(t, h, w) in patches. Within an image the patches come in spatial-merge blocks: every m x m block of
neighbouring patches (m = spatial_merge_size) is m*m consecutive rows, blocks in row-major order,
so the merger just concatenates m*m consecutive rows. Everything that depends on the grids is
computed on the host by `vision_layout` (numpy); the jitted tower takes it as plain arrays, so one
compiled program serves every set of grids with the same total patch count P.

Layout mirrors transformers' module names, so a parameter path reads as its checkpoint key:

    visual/patch_embed/proj/kernel                 (C*T*p*p, D)   the bias-free Conv3d as a matmul
    visual/blocks/...                              stacked: leading axis L (transformers: blocks.{i})
        norm1, norm2                               2-VL: LayerNorm {scale, bias}; 2.5-VL: RMSNorm {scale}
        attn/qkv/{kernel (D, 3D), bias}, attn/proj/{kernel, bias}
        mlp/{fc1, fc2}/{kernel, bias}              2-VL (act: hidden_act, quick_gelu in the checkpoints)
        mlp/{gate_proj, up_proj, down_proj}/{kernel, bias}    2.5-VL (SwiGLU with biases, act: hidden_act)
    visual/merger/ln_q                             2-VL: LayerNorm {scale, bias}; 2.5-VL: RMSNorm {scale}
    visual/merger/mlp/{0, 2}/{kernel, bias}        Linear(m*m*D, m*m*D) -> exact GELU -> Linear(m*m*D, out)

What transformers does, and this file mirrors:
- every norm (block norm1/norm2, merger ln_q) has eps 1e-6, hard-coded, in both versions;
- 2-D RoPE over the whole head: inv_freq = 1 / theta^(2i / (hd/2)) for i < hd/4 (theta 10000 from
  the vision config's rope_parameters); angles [h * inv_freq, w * inv_freq] (hd/2), repeated twice
  (hd) for rotate-half; q and k rotate in float32;
- attention never crosses a segment: one frame of one image (an image of t temporal patches is t
  segments) in 2-VL and in 2.5-VL's `fullatt_block_indexes` blocks; one window in 2.5-VL's other
  blocks. A window is w x w merge units (w = window_size // m // patch_size, window_size in pixels),
  windows tile each frame from its top-left corner, the ones at the right and bottom edges partial;
- 2.5-VL permutes the merge units into window order (frame, window row, window col, then row-major
  inside the window) before the blocks, with the rotary angles alike; the merger runs in window
  order and its output is permuted back, so the features come out in the processor's order.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxflow.models.clip import ClipMLP  # transformers' Qwen2-VL VisionMlp is the same fc1 -> act -> fc2
from jaxflow.models.config import ConfigError
from jaxflow.models.layers import LayerNorm, Linear, RMSNorm, activation, apply_rope, attend

VERSIONS = ("qwen2_vl", "qwen2_5_vl")
# transformers' vision config model_type (and the parent's, which old checkpoints wrote) -> version
_MODEL_TYPES = {"qwen2_vl_vision": "qwen2_vl", "qwen2_vl": "qwen2_vl",
                "qwen2_5_vl_vision": "qwen2_5_vl", "qwen2_5_vl": "qwen2_5_vl"}
NORM_EPS = 1e-6  # norm1 / norm2 / merger.ln_q: hard-coded in transformers, not in config.json
MERGER_ACT = "gelu"  # nn.GELU(): exact


@dataclasses.dataclass(frozen=True)
class Qwen2VisionConfig:
    """Both towers. `hidden_size` is the tower width (transformers' 2-VL `embed_dim`, 2.5-VL `hidden_size`);
    `out_hidden_size` the merger's output = the decoder's width (2-VL `hidden_size`, 2.5-VL `out_hidden_size`);
    `intermediate_size` the MLP width (2-VL embed_dim * mlp_ratio)."""

    version: str = "qwen2_vl"
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 5120
    hidden_act: str = "quick_gelu"
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    out_hidden_size: int = 3584
    rope_theta: float = 10000.0
    window_size: int = 112  # 2.5-VL: window side in pixels
    fullatt_block_indexes: tuple[int, ...] = ()  # 2.5-VL: blocks with attention over the whole frame
    tokens_per_second: int = 4  # 2.5-VL: read by the decoder's video positions, not by the tower

    def __post_init__(self):
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
        if self.version not in VERSIONS:
            raise ConfigError(f"Qwen2 vision version {self.version!r} not supported ({', '.join(VERSIONS)})")
        for name in ("depth", "hidden_size", "num_heads", "intermediate_size", "patch_size", "temporal_patch_size",
                     "spatial_merge_size", "in_channels", "out_hidden_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"Qwen2 vision {name} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ConfigError(f"Qwen2 vision hidden_size {self.hidden_size} / num_heads {self.num_heads} must give "
                              "a head_dim that is a multiple of 4 (2-D rotary: a quarter of it per axis and sign)")
        try:
            activation(self.hidden_act)
        except ValueError:
            raise ConfigError(f"Qwen2 vision hidden_act {self.hidden_act!r}: unknown activation") from None
        if self.version == "qwen2_vl" and self.fullatt_block_indexes:
            raise ConfigError("Qwen2-VL has no window attention: fullatt_block_indexes must be empty")
        if self.version == "qwen2_5_vl":
            if self.window_units < 1:
                raise ConfigError(f"Qwen2.5-VL window_size {self.window_size} px holds no whole merge unit "
                                  f"({self.spatial_merge_size} x {self.patch_size} px)")
            bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
            if bad:
                raise ConfigError(f"Qwen2.5-VL fullatt_block_indexes {bad} are outside blocks 0..{self.depth - 1}")

    @property
    def windowed(self) -> bool:
        return self.version == "qwen2_5_vl"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    @property
    def window_units(self) -> int:
        """A window's side in merge units (transformers' vit_merger_window_size)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def norm_eps(self) -> float:
        return NORM_EPS

    @property
    def full_attention(self) -> tuple[bool, ...]:
        """Per block: attention over the whole frame (True) or within windows (False)."""
        return tuple(not self.windowed or i in self.fullatt_block_indexes for i in range(self.depth))

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers `vision_config` dict (Qwen2VLVisionConfig / Qwen2_5_VLVisionConfig)."""
        common = {"depth": self.depth, "hidden_act": self.hidden_act, "num_heads": self.num_heads,
                  "in_channels": self.in_channels, "patch_size": self.patch_size,
                  "spatial_merge_size": self.spatial_merge_size, "temporal_patch_size": self.temporal_patch_size,
                  "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta}}
        if self.version == "qwen2_vl":
            if self.intermediate_size % self.hidden_size:
                raise ConfigError(f"Qwen2-VL intermediate_size {self.intermediate_size} is not embed_dim "
                                  f"{self.hidden_size} times an integer mlp_ratio")
            return {"model_type": "qwen2_vl_vision", "embed_dim": self.hidden_size,
                    "hidden_size": self.out_hidden_size, "mlp_ratio": self.intermediate_size // self.hidden_size,
                    **common}
        return {"model_type": "qwen2_5_vl_vision", "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "out_hidden_size": self.out_hidden_size,
                "window_size": self.window_size, "fullatt_block_indexes": list(self.fullatt_block_indexes),
                "tokens_per_second": self.tokens_per_second, **common}


def vision_config_from_hf(d: dict[str, Any], version: str | None = None) -> Qwen2VisionConfig:
    """A Qwen2-VL / Qwen2.5-VL `vision_config` dict, parsed by transformers' own config class (its defaults).

    The version comes from d["model_type"] ("qwen2_vl_vision" / "qwen2_5_vl_vision", or the parent's
    "qwen2_vl" / "qwen2_5_vl" that old checkpoints wrote); hub configs often have none, so the caller
    passes `version` (from the top-level model_type). Ignored: initializer_range, legacy in_chans /
    spatial_patch_size (transformers ignores them too). Rejected (ConfigError): rope types other than
    axial, list patch sizes, unknown activations, head_dim not a multiple of 4, windows under one merge unit.
    """
    from transformers import Qwen2_5_VLVisionConfig, Qwen2VLVisionConfig  # configs only: no torch needed

    mt = d.get("model_type")
    if mt is not None and mt not in _MODEL_TYPES:
        raise ConfigError(f"vision_config has model_type={mt!r}; expected one of {', '.join(_MODEL_TYPES)}")
    if version is not None and version not in VERSIONS:
        raise ConfigError(f"Qwen2 vision version {version!r} not supported ({', '.join(VERSIONS)})")
    if mt is not None and version is not None and _MODEL_TYPES[mt] != version:
        raise ConfigError(f"vision_config model_type {mt!r} contradicts version {version!r}")
    version = _MODEL_TYPES[mt] if mt is not None else version
    if version is None:
        raise ConfigError("vision_config has no model_type; say which version (qwen2_vl, qwen2_5_vl) it is")
    cls = Qwen2VLVisionConfig if version == "qwen2_vl" else Qwen2_5_VLVisionConfig
    d = {**d, "model_type": cls.model_type}
    try:
        v = cls.from_dict(d)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ConfigError(f"not a valid {version} vision_config: {' '.join(str(e).split())}") from e
    rope = dict(v.rope_parameters or {})
    if rope.get("rope_type", "axial") != "axial":
        raise ConfigError(f"Qwen2 vision rope_type {rope.get('rope_type')!r} not supported (axial)")
    for name in ("patch_size", "temporal_patch_size"):
        if not isinstance(getattr(v, name), int):
            raise ConfigError(f"Qwen2 vision {name} {getattr(v, name)!r} must be one int")
    common = dict(version=version, depth=v.depth, num_heads=v.num_heads, hidden_act=v.hidden_act,
                  patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                  spatial_merge_size=v.spatial_merge_size, in_channels=v.in_channels,
                  rope_theta=float(rope.get("rope_theta", 10000.0)))
    if version == "qwen2_vl":
        return Qwen2VisionConfig(hidden_size=v.embed_dim, intermediate_size=int(v.embed_dim * v.mlp_ratio),
                                 out_hidden_size=v.hidden_size, **common)
    return Qwen2VisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                             out_hidden_size=v.out_hidden_size, window_size=v.window_size,
                             fullatt_block_indexes=tuple(v.fullatt_block_indexes),
                             tokens_per_second=v.tokens_per_second, **common)


# --------------------------------------------------------------------------- host-side layout


@dataclasses.dataclass(frozen=True, eq=False)
class VisionLayout:
    """Everything the tower needs that depends on the grids (numpy). P patches, U = P / merge_unit units.

    position_ids / segment_ids are in the processor's (packed) order; the window fields (2.5-VL only,
    else None) are at merge-unit granularity, window_segment_ids in window order."""

    grid_thw: np.ndarray  # (N, 3) int64: (t, h, w) in patches
    position_ids: np.ndarray  # (P, 2) int32: (row, col) of every patch within its frame
    segment_ids: np.ndarray  # (P,) int32: one segment per frame of every image
    tokens_per_image: np.ndarray  # (N,) int64: t*h*w / merge_unit output tokens
    window_index: np.ndarray | None = None  # (U,) int32: window order -> packed unit (transformers' window_index)
    window_inverse: np.ndarray | None = None  # (U,) int32: packed unit -> its place in window order
    window_segment_ids: np.ndarray | None = None  # (P,) int32: the window of every patch, in window order

    @property
    def num_patches(self) -> int:
        return int(self.segment_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens_per_image.sum())

    def arrays(self) -> dict[str, jax.Array]:
        """The arrays the jitted tower takes (`Qwen2VisionModel.__call__`'s layout_arrays)."""
        names = ("position_ids", "segment_ids", "window_index", "window_inverse", "window_segment_ids")
        return {n: jnp.asarray(getattr(self, n)) for n in names if getattr(self, n) is not None}


def check_grids(grid_thw, cfg: Qwen2VisionConfig) -> np.ndarray:
    """grid_thw (N, 3) -> int64 array, or ValueError: positive ints, h and w multiples of the merge size."""
    g = np.asarray(grid_thw)
    if g.ndim != 2 or g.shape[1] != 3 or g.shape[0] < 1 or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"grid_thw must be integer (N >= 1, 3) rows of (t, h, w), got {g.dtype} {g.shape}")
    g = g.astype(np.int64)
    m = cfg.spatial_merge_size
    for i, (t, h, w) in enumerate(g.tolist()):
        if min(t, h, w) < 1 or h % m or w % m:
            raise ValueError(f"image {i}: grid (t, h, w) = ({t}, {h}, {w}) must be positive with h and w "
                             f"multiples of spatial_merge_size {m}")
    return g


def patch_positions(t: int, h: int, w: int, m: int) -> np.ndarray:
    """(t*h*w, 2) (row, col) of one image's patches in spatial-merge-block order, frames repeated: the
    processor's patch order (`jaxflow.data.qwen2_vl_image.patch_positions`), once per frame."""
    from jaxflow.data.qwen2_vl_image import patch_positions as frame_positions

    return np.tile(frame_positions(h, w, m), (t, 1))


def image_windows(t: int, h: int, w: int, m: int, win: int) -> tuple[np.ndarray, np.ndarray]:
    """One image's merge units (t, h/m, w/m), row-major, cut into win x win windows per frame.

    -> order (U,): units in window order (frame, window row, window col, row, col);
       window (U,): the window of each unit in that order, numbered from 0 in the same order."""
    lh, lw = h // m, w // m
    ti, r, c = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")  # (t, lh, lw)
    nwh, nww = -(-lh // win), -(-lw // win)
    window = ((ti * nwh + r // win) * nww + c // win).reshape(-1)  # (U,) in packed order
    inner = ((r % win) * win + c % win).reshape(-1)
    order = np.lexsort((inner, window))  # window first, then row-major within it
    _, dense = np.unique(window[order], return_inverse=True)  # drop the numbers of empty windows
    return order, dense.reshape(-1)


def vision_layout(grid_thw, cfg: Qwen2VisionConfig) -> VisionLayout:
    """grid_thw (N, 3) of (t, h, w) in patches -> the VisionLayout of those images packed in order."""
    g = check_grids(grid_thw, cfg)
    m, mu = cfg.spatial_merge_size, cfg.merge_unit
    positions, segments, orders, windows = [], [], [], []
    n_frames = n_units = n_windows = 0
    for t, h, w in g.tolist():
        positions.append(patch_positions(t, h, w, m))
        segments.append(np.repeat(n_frames + np.arange(t), h * w))
        if cfg.windowed:
            order, window = image_windows(t, h, w, m, cfg.window_units)
            orders.append(order + n_units)
            windows.append(window + n_windows)
            n_windows += int(window.max()) + 1
        n_frames += t
        n_units += t * h * w // mu
    layout = dict(grid_thw=g, position_ids=np.concatenate(positions).astype(np.int32),
                  segment_ids=np.concatenate(segments).astype(np.int32),
                  tokens_per_image=g.prod(axis=1) // mu)
    if cfg.windowed:
        order = np.concatenate(orders)  # (U,)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        layout.update(window_index=order.astype(np.int32), window_inverse=inverse.astype(np.int32),
                      window_segment_ids=np.repeat(np.concatenate(windows), mu).astype(np.int32))
    return VisionLayout(**layout)


# --------------------------------------------------------------------------- tower


def permute_units(x, index, unit: int):
    """x (P, ...) -> (P, ...): the groups of `unit` consecutive rows reordered by index (P / unit,)."""
    return x.reshape(x.shape[0] // unit, unit, *x.shape[1:])[index].reshape(x.shape)


def vision_rope(position_ids, head_dim: int, theta: float):
    """position_ids (P, 2) (row, col) -> cos, sin (P, head_dim) float32 of the 2-D rotary embedding."""
    quarter = jnp.arange(0, head_dim // 2, 2, dtype=jnp.float32) / (head_dim // 2)
    inv_freq = 1.0 / (jnp.float32(theta) ** quarter)  # (hd/4,)
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # (P, 2, hd/4)
    half = freqs.reshape(freqs.shape[0], -1)  # (P, hd/2): row angles, then column angles
    emb = jnp.concatenate([half, half], axis=-1)  # (P, hd)
    return jnp.cos(emb), jnp.sin(emb)


def segment_mask(segment_ids):
    """(P,) -> (P, P) bool: query and key in the same segment."""
    return segment_ids[:, None] == segment_ids[None, :]


def _norm(cfg: Qwen2VisionConfig, dim: int, dtype):
    return RMSNorm(dim, NORM_EPS, dtype) if cfg.windowed else LayerNorm(dim, NORM_EPS, dtype)


class Qwen2VisionAttention(nnx.Module):
    def __init__(self, cfg: Qwen2VisionConfig, *, rngs: nnx.Rngs, dtype):
        d = cfg.hidden_size
        self.qkv = Linear(d, 3 * d, bias=True, rngs=rngs, dtype=dtype, axes=("embed", "heads"))
        self.proj = Linear(d, d, bias=True, rngs=rngs, dtype=dtype, axes=("heads", "embed"))
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim

    def __call__(self, x, cos, sin, allowed, impl: str):
        """x (P, D), cos/sin (P, hd) float32, allowed (1, P, P) bool -> (P, D)."""
        p = x.shape[0]
        qkv = self.qkv(x).reshape(p, 3, self.num_heads, self.head_dim)  # (P, 3, H, hd)
        q, k, v = qkv[:, 0][None], qkv[:, 1][None], qkv[:, 2][None]  # (1, P, H, hd)
        rot = lambda a: apply_rope(a.astype(jnp.float32), cos[None], sin[None]).astype(a.dtype)  # in float32
        o = attend(rot(q), rot(k), v, allowed, impl=impl, scale=self.head_dim ** -0.5)  # (1, P, H, hd)
        return self.proj(o.reshape(p, -1))


class Qwen2_5VisionMLP(nnx.Module):
    """SwiGLU with biases: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: Qwen2VisionConfig, *, rngs: nnx.Rngs, dtype):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, bias=True, rngs=rngs, dtype=dtype, axes=("embed", "mlp"))
        self.up_proj = Linear(d, f, bias=True, rngs=rngs, dtype=dtype, axes=("embed", "mlp"))
        self.down_proj = Linear(f, d, bias=True, rngs=rngs, dtype=dtype, axes=("mlp", "embed"))
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):  # (..., D) -> (..., D)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Qwen2VisionBlock(nnx.Module):
    """Pre-norm block: h = x + attn(norm1(x)); out = h + mlp(norm2(h))."""

    def __init__(self, cfg: Qwen2VisionConfig, *, rngs: nnx.Rngs, dtype):
        self.norm1 = _norm(cfg, cfg.hidden_size, dtype)
        self.norm2 = _norm(cfg, cfg.hidden_size, dtype)
        self.attn = Qwen2VisionAttention(cfg, rngs=rngs, dtype=dtype)
        self.mlp = (Qwen2_5VisionMLP if cfg.windowed else ClipMLP)(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, x, cos, sin, allowed, impl: str):  # x (P, D), allowed (1, P, P) -> (P, D)
        h = x + self.attn(self.norm1(x), cos, sin, allowed, impl)
        return h + self.mlp(self.norm2(h))


class Qwen2VisionPatchEmbed(nnx.Module):
    def __init__(self, cfg: Qwen2VisionConfig, *, rngs: nnx.Rngs, dtype):
        # the Conv3d (D, C, T, p, p), kernel = stride, no bias, as a matmul over patches flattened (C, T, p, p)
        self.proj = Linear(cfg.patch_dim, cfg.hidden_size, bias=False, rngs=rngs, dtype=dtype)

    def __call__(self, pixel_values):  # (P, C*T*p*p) -> (P, D)
        return self.proj(pixel_values.astype(self.proj.kernel.dtype))


class Qwen2VisionPatchMerger(nnx.Module):
    """ln_q per patch, then each merge unit's m*m patches concatenated -> Linear -> GELU -> Linear."""

    def __init__(self, cfg: Qwen2VisionConfig, *, rngs: nnx.Rngs, dtype):
        d = cfg.hidden_size * cfg.merge_unit
        self.ln_q = _norm(cfg, cfg.hidden_size, dtype)
        # transformers' nn.Sequential(Linear, GELU, Linear): indices 0 and 2 hold the weights
        self.mlp = nnx.List([Linear(d, d, bias=True, rngs=rngs, dtype=dtype), None,
                             Linear(d, cfg.out_hidden_size, bias=True, rngs=rngs, dtype=dtype)])
        self.unit_dim = d

    def __call__(self, x):  # (P, D) -> (P / merge_unit, out_hidden_size)
        x = self.ln_q(x).reshape(-1, self.unit_dim)  # (U, m*m*D)
        return self.mlp[2](activation(MERGER_ACT)(self.mlp[0](x)))


class Qwen2VisionModel(nnx.Module):
    """pixel_values (P, C*T*p*p) + layout arrays -> merged features (P / merge_unit, out_hidden_size)."""

    def __init__(self, cfg: Qwen2VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        self.patch_embed = Qwen2VisionPatchEmbed(cfg, rngs=rngs, dtype=dtype)

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Qwen2VisionBlock(cfg, rngs=rngs, dtype=dtype)

        self.blocks = make_blocks(rngs)
        self.merger = Qwen2VisionPatchMerger(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, pixel_values, layout_arrays: dict, impl: str = "fused"):
        """pixel_values (P, patch_dim), layout_arrays = VisionLayout.arrays() -> (U, out_hidden_size),
        the images' tokens one after the other (transformers' `visual(...).pooler_output`)."""
        cfg, la = self.cfg, layout_arrays
        need = ("position_ids", "segment_ids") + (("window_index", "window_inverse", "window_segment_ids")
                                                  if cfg.windowed else ())
        missing = [n for n in need if n not in la]
        if missing:
            raise ValueError(f"layout_arrays lacks {missing}: pass vision_layout(grid_thw, cfg).arrays() "
                             f"for this {cfg.version} tower")
        pos, seg = la["position_ids"], la["segment_ids"]  # (P, 2), (P,)
        p = pos.shape[0]
        if pixel_values.shape != (p, cfg.patch_dim):
            raise ValueError(f"pixel_values must be ({p}, {cfg.patch_dim}) for this layout, "
                             f"got {tuple(pixel_values.shape)}")
        x = self.patch_embed(pixel_values)  # (P, D)
        if cfg.windowed:  # into window order: hidden states, positions and frame segments alike
            idx = la["window_index"]  # (U,)
            x, pos, seg = (permute_units(a, idx, cfg.merge_unit) for a in (x, pos, seg))
        cos, sin = vision_rope(pos, cfg.head_dim, cfg.rope_theta)  # (P, hd) each
        full = segment_mask(seg)  # (P, P)
        window = segment_mask(la["window_segment_ids"]) if cfg.windowed else full
        x = self.run_blocks(x, cos, sin, full, window, impl)  # (P, D)
        out = self.merger(x)  # (U, out)
        return out[la["window_inverse"]] if cfg.windowed else out

    def run_blocks(self, x, cos, sin, full_mask, window_mask, impl: str):
        """x (P, D) through every block (scanned); full_mask / window_mask (P, P) bool -> (P, D).

        Each block attends within `full_mask` or `window_mask` as cfg.full_attention says."""
        graphdef, state = nnx.split(self.blocks)
        use_full = jnp.asarray(self.cfg.full_attention)  # (L,) bool

        def body(h, xs):
            block_state, is_full = xs
            allowed = jnp.where(is_full, full_mask, window_mask)[None]  # (1, P, P)
            return nnx.merge(graphdef, block_state)(h, cos, sin, allowed, impl), None

        x, _ = jax.lax.scan(body, x, (state, use_full))
        return x


# --------------------------------------------------------------------------- checkpoint key map

ROOT = "visual"
_SPECIAL_TRANSFORMS = {(ROOT, "patch_embed", "proj", "kernel"): "conv"}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight"}  # our leaf -> transformers' leaf
_STACKED = (ROOT, "blocks")


def hf_source(path: tuple, cfg: Qwen2VisionConfig) -> tuple[tuple[str, ...], str, bool]:
    """Our parameter path (rooted at "visual") -> (transformers keys as `save_pretrained` writes them,
    transform name in HF_TRANSFORMS, stacked).

    Stacked params (under visual/blocks) have one key per block: transform each, then np.stack them on
    axis 0. On disk the keys are "visual.*"; in memory transformers 5 calls them "model.visual.*"."""
    path = tuple(str(p) for p in path)  # merger/mlp/0: nnx.List indices are ints
    if len(path) < 3 or path[0] != ROOT:
        raise ValueError(f"parameter path {'/'.join(path)} is not under {ROOT}")
    transform = _SPECIAL_TRANSFORMS.get(path, "transpose" if path[-1] == "kernel" else "ident")
    leaf = _LEAF_NAMES.get(path[-1], path[-1])
    if path[:2] == _STACKED:
        rest = ".".join(path[2:-1] + (leaf,))
        return tuple(f"{ROOT}.blocks.{i}.{rest}" for i in range(cfg.depth)), transform, True
    return (".".join(path[:-1] + (leaf,)),), transform, False


HF_TRANSFORMS = {
    "ident": lambda a: np.asarray(a),
    "transpose": lambda a: np.ascontiguousarray(np.asarray(a).T),  # torch Linear (out, in) -> (in, out)
    # Conv3d weight (D, C, T, p, p) -> (C*T*p*p, D), rows in the (C, T, p, p) order of a pixel_values row
    "conv": lambda a: np.ascontiguousarray(np.asarray(a).reshape(a.shape[0], -1).T),
}
