"""Qwen2-VL and Qwen2.5-VL (transformers' `Qwen2VLForConditionalGeneration` and
`Qwen2_5_VLForConditionalGeneration`): images of any size, packed patches, M-RoPE.

An image of (t, h, w) patches (`image_grid_thw`, from the processor) gives t * h * w / merge^2 image
tokens, laid out row-major on its own (h / merge, w / merge) grid; several images of different sizes
are packed into one `pixel_values` (total_patches, C * t * p * p) and the vision tower keeps
attention within each image (`jaxflow.models.qwen2_vit`). The `<|vision_start|>` / `<|vision_end|>`
markers around an image's tokens are text.

Positions are 3-D (M-RoPE): a text token has the same position on the temporal, height and width
axes (one more than the token before it); an image token at (row i, column j) of its grid has
(s, s + i, s + j), where s is one more than the position before the image, and the text after the
image continues from s + max(rows, cols). The rotary frequencies are split into three sections
(`mrope_section`, summing to head_dim / 2), each rotated by one axis. `mrope_positions` computes
them on the host from the ids, the mask and the grids exactly as transformers' `get_rope_index`
(left padding included); a generated token continues from the largest prompt position
(`jaxflow.models.family.next_positions`). Under truncation every token keeps its 3-D position.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxflow.models.config import ConfigError, TextConfig, text_config_from_hf, text_config_to_hf
from jaxflow.models.family import position_ids, scatter_image_features
from jaxflow.models.image_layout import ImageGeometry
from jaxflow.models.layers import rope_cos_sin, rope_inv_freq
from jaxflow.models.llama import LlamaModel
from jaxflow.models.qwen2_vit import Qwen2VisionConfig, Qwen2VisionModel, vision_config_from_hf, vision_layout

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    vision: Qwen2VisionConfig
    text: TextConfig
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    family: str = "qwen2_vl"  # or "qwen2_5_vl": the config.json model_type

    @property
    def merge(self) -> int:
        return self.vision.spatial_merge_size

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-5 config.json dict for this config."""
        text = text_config_to_hf(self.text, f"{self.family}_text", self.tie_word_embeddings)
        text["rope_parameters"]["mrope_section"] = list(self.mrope_section)
        arch = "Qwen2VLForConditionalGeneration" if self.family == "qwen2_vl" else "Qwen2_5_VLForConditionalGeneration"
        return {
            "architectures": [arch], "model_type": self.family, "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id, "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id, "tie_word_embeddings": self.tie_word_embeddings,
            "vision_config": self.vision.to_hf_dict(), "text_config": text,
        }


def qwen2_vl_config_from_hf(d: dict[str, Any]) -> Qwen2VLConfig:
    """A transformers Qwen2-VL / Qwen2.5-VL config.json dict -> Qwen2VLConfig (parsed by transformers'
    own classes, so every default is transformers'). Sliding-window decoders and rope types other
    than M-RoPE over the default frequencies are refused."""
    mt = d.get("model_type")
    if mt not in MODEL_TYPES:
        raise ConfigError(f"config.json has model_type={mt!r}; expected one of {', '.join(MODEL_TYPES)}")
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig as HFQwen2VLConfig

    cls = HFQwen2VLConfig if mt == "qwen2_vl" else Qwen2_5_VLConfig
    try:
        hf = cls.from_dict(dict(d))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ConfigError(f"config.json is not a valid {mt} config: {' '.join(str(e).split())}") from e
    t = hf.text_config
    if getattr(t, "use_sliding_window", False):
        raise ConfigError(f"{mt} decoders with use_sliding_window=True are not supported")
    if t.hidden_act != "silu":
        raise ConfigError(f"text hidden_act {t.hidden_act!r} not supported (silu)")
    if hasattr(t, "standardize_rope_params"):
        t.standardize_rope_params()
    params = dict(getattr(t, "rope_parameters", None) or {})
    section = tuple(int(x) for x in params.get("mrope_section", (16, 24, 24)))
    if params.get("rope_type", params.get("type", "default")) in ("mrope",):
        params["rope_type"] = "default"  # older configs name M-RoPE over the default frequencies "mrope"
        t.rope_parameters = params
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    if len(section) != 3 or sum(section) != head_dim // 2:
        raise ConfigError(f"mrope_section {list(section)} must be three numbers summing to head_dim / 2 = "
                          f"{head_dim // 2}")
    text = text_config_from_hf(t)
    if text.rope.rope_type != "default":
        raise ConfigError(f"{mt} with rope type {text.rope.rope_type!r} is not supported (M-RoPE over the "
                          "default frequencies only)")
    text = dataclasses.replace(text, attention_bias=True, o_proj_bias=False)  # Qwen2: q/k/v bias, no o bias
    try:
        vision = vision_config_from_hf(hf.vision_config.to_dict())
    except ValueError as e:
        raise ConfigError(str(e)) from e
    tie = bool(getattr(hf, "tie_word_embeddings", False) or getattr(t, "tie_word_embeddings", False))
    return Qwen2VLConfig(vision=vision, text=text, mrope_section=section, image_token_id=int(hf.image_token_id),
                         video_token_id=int(hf.video_token_id), vision_start_token_id=int(hf.vision_start_token_id),
                         vision_end_token_id=int(hf.vision_end_token_id), tie_word_embeddings=tie, family=mt)


# --------------------------------------------------------------------------- positions (host side)


def _check_grids(image_grid_thw, merge: int) -> np.ndarray:
    g = np.asarray(image_grid_thw)
    if g.ndim != 2 or g.shape[1] != 3 or not np.issubdtype(g.dtype, np.integer) or (g <= 0).any():
        raise ValueError(f"image_grid_thw must be (num_images, 3) positive integers (t, h, w), got "
                         f"shape {g.shape} dtype {g.dtype}")
    if (g[:, 1:] % merge).any():
        raise ValueError(f"image_grid_thw: h and w must be multiples of spatial_merge_size {merge}, got "
                         f"{g.tolist()}")
    return g.astype(np.int64)


def image_token_counts(image_grid_thw, merge: int) -> np.ndarray:
    """(num_images,) image tokens per image: t * h * w / merge^2."""
    g = _check_grids(image_grid_thw, merge)
    return (g.prod(-1) // (merge * merge)).astype(np.int64)


def mrope_positions(input_ids, attention_mask, image_token_id: int, image_grid_thw, merge: int):
    """M-RoPE positions (B, T, 3) int32 (temporal, height, width) and deltas (B,) int32 (largest
    position + 1 - real tokens), as transformers' `get_rope_index`: the images of the batch are taken
    in order (row-major); padding gets position 0. A run of image tokens is split into images by the
    grids' token counts."""
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    b, t = ids.shape
    grids = _check_grids(image_grid_thw, merge) if image_grid_thw is not None else np.zeros((0, 3), np.int64)
    counts = (grids.prod(-1) // (merge * merge)).tolist()
    out = np.zeros((b, t, 3), np.int32)
    deltas = np.zeros(b, np.int32)
    nxt = 0  # next image of the batch
    for r in range(b):
        real = np.flatnonzero(mask[r] > 0)
        is_img = ids[r, real] == image_token_id
        pos = np.zeros((real.size, 3), np.int64)
        cur, i = 0, 0
        while i < real.size:
            if not is_img[i]:
                j = i
                while j < real.size and not is_img[j]:
                    j += 1
                pos[i:j] = (cur + np.arange(j - i))[:, None]
                cur += j - i
                i = j
                continue
            if nxt >= len(counts):
                raise ValueError(f"row {r} has more images than image_grid_thw lists ({len(counts)})")
            gt, gh, gw = int(grids[nxt, 0]), int(grids[nxt, 1]) // merge, int(grids[nxt, 2]) // merge
            n = counts[nxt]
            if i + n > real.size or not is_img[i:i + n].all():
                raise ValueError(f"row {r}: image {nxt} needs {n} consecutive image tokens "
                                 f"(grid {grids[nxt].tolist()}), the ids hold fewer")
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
            pos[i:i + n] = np.stack([tt.ravel() + cur, hh.ravel() + cur, ww.ravel() + cur], -1)
            cur += max(gh, gw)
            nxt += 1
            i += n
        out[r, real] = pos
        deltas[r] = (pos.max() + 1 - real.size) if real.size else 0
    if nxt != len(counts):
        raise ValueError(f"image_grid_thw lists {len(counts)} images but the ids hold {nxt}")
    return out, deltas


def mrope_tables(positions, inv_freq, section, dtype):
    """positions (B, T, 3) -> cos, sin (B, T, hd): frequency j rotates by the position on axis k of the
    section it falls in (`section` sums to hd / 2); both halves alike."""
    axis = np.repeat(np.arange(3), np.asarray(section))  # (hd/2,)
    p = jnp.take(positions.astype(jnp.float32), jnp.asarray(axis), axis=-1)  # (B, T, hd/2)
    freqs = p * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


# --------------------------------------------------------------------------- the model


class Qwen2VL(nnx.Module):
    """Parameters of a Qwen2-VL or Qwen2.5-VL model (`config.family` says which); implements
    `jaxflow.models.family.VisionLanguageModel`."""

    def __init__(self, cfg: Qwen2VLConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = cfg
        self.family = cfg.family
        self.visual = Qwen2VisionModel(cfg.vision, rngs=rngs, dtype=dtype)
        self.language_model = LlamaModel(cfg.text, tie_word_embeddings=cfg.tie_word_embeddings, rngs=rngs,
                                         dtype=dtype)

    @property
    def dtype(self):
        return self.language_model.embed_tokens[...].dtype

    # traced ---------------------------------------------------------------------------------

    def image_features(self, images, impl: str = "fused"):
        """images (`image_inputs`) -> (tokens of all images, D), images in order."""
        return self.visual(images["pixel_values"], images["vision"], impl=impl)

    def encode_images(self, images, impl: str = "fused"):
        return self.image_features(images, impl)

    def embed(self, input_ids, images, impl: str = "fused"):
        """input_ids (B, T); images or None -> (B, T, D), the i-th image token of the batch (row-major)
        getting the i-th feature row."""
        x = self.language_model.embed(input_ids)
        if images is None:
            return x
        return scatter_image_features(x, input_ids, self.config.image_token_id, self.image_features(images, impl))

    def positions(self, input_ids, attention_mask, images=None):
        """(B, T, 3) M-RoPE positions computed on the host (`image_inputs`); 1-D without images."""
        if images is not None and "positions" in images:
            return images["positions"]
        return position_ids(attention_mask)

    def rope_tables(self, positions, dtype, context_len=None):  # (B, T) or (B, T, 3) -> cos, sin (B, T, hd)
        inv = rope_inv_freq(self.config.text)
        if positions.ndim == 2:  # the same position on every axis: plain RoPE
            return rope_cos_sin(positions, inv, dtype)
        return mrope_tables(positions, inv, self.config.mrope_section, dtype)

    def noisy_images(self, key, images, n: int, sigma, mean, std):
        """n copies with noise on the [0, 1] image: one draw per pixel, shared by the temporal copies."""
        v = self.config.vision
        px = images["pixel_values"]  # (P, C * t * p * p)
        five = px.reshape(px.shape[0], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        mean = jnp.asarray(mean, jnp.float32)[:, None, None, None]
        std = jnp.asarray(std, jnp.float32)[:, None, None, None]
        eps = jax.random.normal(key, (n, px.shape[0], v.in_channels, 1, v.patch_size, v.patch_size), jnp.float32)
        noisy = ((five * std + mean)[None] + sigma * eps - mean) / std  # (n, P, C, t, p, p)
        out = jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), images)
        out["pixel_values"] = noisy.reshape((n,) + px.shape)
        return out

    # host side ------------------------------------------------------------------------------

    def image_inputs(self, input_ids, attention_mask, pixel_values, image_grid_thw=None, **_):
        """Host side: {"pixel_values" (P, C*t*p*p) float32, "vision": the tower's packing arrays,
        "positions": (B, T, 3) int32 M-RoPE positions (when input_ids are given)}; None without pixels."""
        if pixel_values is None:
            return None
        if image_grid_thw is None:
            raise ValueError(f"{self.family} needs image_grid_thw (num_images, 3) with pixel_values: pass the "
                             "processor's image_grid_thw")
        cfg = self.config
        out = {"pixel_values": jnp.asarray(pixel_values, jnp.float32),
               "vision": vision_layout(np.asarray(image_grid_thw), cfg.vision).arrays()}
        if input_ids is not None:
            pos, _ = mrope_positions(input_ids, attention_mask, cfg.image_token_id, image_grid_thw, cfg.merge)
            out["positions"] = jnp.asarray(pos)
        return out

    def check_pixels(self, pixel_values, image_grid_thw=None, **_) -> int:
        """Validates pixel_values against image_grid_thw; returns how many image tokens they give."""
        if image_grid_thw is None:
            raise ValueError(f"{self.family} needs image_grid_thw (num_images, 3) with pixel_values: pass the "
                             "processor's image_grid_thw")
        v = self.config.vision
        g = _check_grids(image_grid_thw, v.spatial_merge_size)
        shape = np.shape(pixel_values)
        if len(shape) != 2 or shape[1] != v.patch_dim or shape[0] != int(g.prod(-1).sum()):
            raise ValueError(f"pixel_values must be ({int(g.prod(-1).sum())}, {v.patch_dim}) for image_grid_thw "
                             f"{g.tolist()}, got {tuple(shape)}")
        return int(image_token_counts(g, v.spatial_merge_size).sum())

    def image_geometries(self, input_ids, attention_mask, pixel_values, image_grid_thw=None, **_) -> list:
        """One geometry per image: its (h / merge, w / merge) grid, tokens row-major (frames of a
        t > 1 grid repeat the cells)."""
        m = self.config.merge
        g = _check_grids(image_grid_thw, m)
        out = []
        for t, h, w in g.tolist():
            gh, gw = h // m, w // m
            out.append(ImageGeometry((gh, gw), np.tile(np.arange(gh * gw), t).astype(np.int32)))
        return out


__all__ = ["Qwen2VL", "Qwen2VLConfig", "qwen2_vl_config_from_hf", "mrope_positions", "mrope_tables",
           "image_token_counts"]
