"""Model families: one interface every analysis runs on, and the registry keyed by `model_type`.

A family provides config parsing (a transformers config.json dict -> a frozen config), the model
class, the converter's key map (a data table from our parameter paths to the safetensors keys) and,
through the model, the host-side image geometry. Every model has this interface (`VisionLanguageModel`):

- `family` (str) and `config` (with `.text`, the decoder's `TextConfig`, and `.image_token_id`);
- host side, `image_inputs(input_ids, attention_mask, pixel_values, **image_kw)` -> the pytree of
  arrays ("images") that the jitted functions below take: the processor's pixel_values (float32),
  plus whatever the family derives from the image arguments on the host (Qwen2-VL: the vision
  tower's packing layout and the M-RoPE positions); None without images;
- `encode_images(images, impl)` -> packed features (n_image_tokens, D): the rows that `embed`
  writes, in order, at the image-token positions of the batch (row-major);
- `embed(input_ids, images, impl)` -> (B, T, D);
- `positions(input_ids, attention_mask, images)` -> RoPE positions, (B, T) int32 or (B, T, R) for
  R-axis rotary embeddings (M-RoPE: R = 3); `rope_tables(positions, dtype, context_len)` -> cos, sin
  (B, T, hd), for either shape (a (B, T) position is the same on every axis), or (B, T, 2, hd): key
  then query tables where queries are scaled by position (Qwen-VL's logn attention); context_len is
  the call's padded prompt length (static), which Qwen-VL's dynamic NTK reads and decoding keeps;
- `noisy_images(key, images, n, sigma, mean, std)` -> n copies of `images` (leading axis n) with
  Gaussian noise of std sigma added to the [0, 1] image (SmoothGrad);
- `language_model`: the decoder, whose `run_layers` runs the one decoder-layer function
  (`jaxflow.models.llama.decoder_layer`) over the stack, with a KV cache and every intervention as an
  explicit argument, and whose `logits` applies the final norm and the unembedding;
- host side: `check_pixels(pixel_values, **image_kw)` -> number of image tokens the pixels give
  (raises ValueError on a bad shape) and `image_geometries(input_ids, attention_mask, pixel_values,
  **image_kw)` -> one `ImageGeometry` per image.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp

from jaxflow.models.config import ConfigError


class VisionLanguageModel(Protocol):
    family: str
    config: Any
    language_model: Any
    # Whether left padding leaves every real row's result unchanged (positions count real tokens).
    # Optional: absent means True. Qwen-VL sets False (RoPE at the padded index, NTK from the padded length).
    left_padding_invariant: bool

    def image_inputs(self, input_ids, attention_mask, pixel_values, **image_kw): ...

    def encode_images(self, images, impl: str = "fused"): ...

    def embed(self, input_ids, images, impl: str = "fused"): ...

    def positions(self, input_ids, attention_mask, images=None): ...

    def noisy_images(self, key, images, n: int, sigma, mean, std): ...

    def rope_tables(self, positions, dtype, context_len=None): ...

    def check_pixels(self, pixel_values, **image_kw) -> int: ...

    def image_geometries(self, input_ids, attention_mask, pixel_values, **image_kw) -> list: ...


def position_ids(attention_mask):
    """(B, T) 0/1 -> (B, T) int32 positions counting real tokens only (0 at padding), as transformers'
    generate computes them, so left and right padding give every real token its unpadded position."""
    m = attention_mask.astype(jnp.int32)
    return jnp.where(m > 0, jnp.cumsum(m, axis=-1) - 1, 0)


def next_positions(positions, attention_mask):
    """(B,) int32: the position of the first generated token, one past the largest position of a real
    token (for 1-D positions the count of real tokens). positions (B, T) or (B, T, R)."""
    p = positions if positions.ndim == 2 else positions.max(-1)
    return (jnp.where(attention_mask > 0, p, -1).max(-1) + 1).astype(jnp.int32)


def noisy_copies(key, pixel_values, n: int, sigma, image_mean, image_std, channel_axis: int = 1):
    """n noisy copies (n, ...) of normalised pixels: Gaussian noise of std sigma on the [0, 1] image.
    image_mean/std (C,) broadcast along `channel_axis` of pixel_values (or are given per element)."""
    mean, std = jnp.asarray(image_mean, jnp.float32), jnp.asarray(image_std, jnp.float32)
    if mean.ndim == 1:
        shape = [1] * pixel_values.ndim
        shape[channel_axis] = -1
        mean, std = mean.reshape(shape), std.reshape(shape)
    x01 = pixel_values * std + mean
    eps = jax.random.normal(key, (n,) + pixel_values.shape, jnp.float32)
    return (x01[None] + sigma * eps - mean) / std


def scatter_image_features(x, input_ids, image_token_id: int, feats):
    """Writes packed image features into token embeddings, as transformers' masked_scatter: the i-th
    image token of the batch (row-major) gets the i-th feature row. x (B, T, D); input_ids (B, T);
    feats (n, D) (or (n_img, N, D), flattened) -> (B, T, D)."""
    flat = feats.astype(x.dtype).reshape(-1, feats.shape[-1])  # (n, D)
    is_img = input_ids == image_token_id
    idx = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, flat.shape[0] - 1).reshape(is_img.shape)
    return jnp.where(is_img[..., None], flat[idx], x)


class DecoderVLM:
    """What LLaVA and InternVL share: image features scattered into a Llama-like decoder's embeddings
    at the image-token positions, 1-D positions counting real tokens and the decoder's RoPE tables.
    A subclass provides `config`, `language_model` and `image_features(pixel_values, impl)`."""

    @property
    def dtype(self):
        return self.language_model.embed_tokens[...].dtype

    def image_inputs(self, input_ids, attention_mask, pixel_values, **image_kw):
        """Host side: the jitted functions' image input, the pixel array as float32 (None: no image).
        Image arguments (InternVL's tile_grids) only place maps on the host, so they are not needed."""
        return None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32)

    def encode_images(self, images, impl: str = "fused"):
        """pixel_values -> packed features (n_image_tokens, D), image (tile) after image."""
        f = self.image_features(images, impl)
        return f.reshape(-1, f.shape[-1])

    def embed(self, input_ids, images, impl: str = "fused"):
        """input_ids (B, T); images (`image_inputs`) or None -> (B, T, D): the i-th image token of the
        batch (row-major) gets the i-th packed feature row."""
        x = self.language_model.embed(input_ids)
        if images is None:
            return x
        return scatter_image_features(x, input_ids, self.config.image_token_id, self.encode_images(images, impl))

    def positions(self, input_ids, attention_mask, images=None):  # (B, T) -> (B, T) int32
        return position_ids(attention_mask)

    def noisy_images(self, key, images, n: int, sigma, mean, std):  # (B, C, H, W) -> (n, B, C, H, W)
        return noisy_copies(key, images, n, sigma, mean, std, channel_axis=-3)

    def rope_tables(self, positions, dtype, context_len=None):  # (B, T) -> cos, sin (B, T, hd)
        from jaxflow.models.layers import rope_cos_sin, rope_inv_freq

        inv = rope_inv_freq(self.config.text, jnp.max(positions) + 1)
        return rope_cos_sin(positions, inv, dtype)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # model.family
    model_types: tuple[str, ...]  # config.json "model_type" values
    config_from_hf: Callable[[dict], Any]  # config.json dict -> frozen config
    model_class: Callable[..., Any]  # (cfg, *, rngs, dtype) -> nnx.Module
    param_source: Callable[[tuple, Any], Any]  # (param path, cfg) -> convert.hf.Source
    description: str


def _families() -> dict[str, Family]:
    from jaxflow.convert.hf import (internvl_param_source, llava_param_source, qwen2_vl_param_source,
                                    qwen_vl_param_source)
    from jaxflow.models.config import from_hf_dict as llava_from_hf
    from jaxflow.models.internvl import InternVL, internvl_config_from_hf
    from jaxflow.models.llava import Llava
    from jaxflow.models.qwen2_vl import Qwen2VL, qwen2_vl_config_from_hf
    from jaxflow.models.qwen_vl import QwenVL, qwen_vl_config_from_hf

    fams = [
        Family("llava", ("llava",), llava_from_hf, Llava, llava_param_source,
               "LLaVA-1.5 (LlavaForConditionalGeneration: CLIP, MLP projector, Llama)"),
        Family("internvl", ("internvl",), internvl_config_from_hf, InternVL, internvl_param_source,
               "InternVL (InternVLForConditionalGeneration, the -hf checkpoints: InternViT, Qwen2)"),
        Family("qwen2_vl", ("qwen2_vl",), qwen2_vl_config_from_hf, Qwen2VL, qwen2_vl_param_source,
               "Qwen2-VL (Qwen2VLForConditionalGeneration: any image size, M-RoPE)"),
        Family("qwen2_5_vl", ("qwen2_5_vl",), qwen2_vl_config_from_hf, Qwen2VL, qwen2_vl_param_source,
               "Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration: windowed vision attention, M-RoPE)"),
        Family("qwen_vl", ("qwen",), qwen_vl_config_from_hf, QwenVL, qwen_vl_param_source,
               "Qwen-VL (the 2023 official QWenLMHeadModel: ViT, 256-query resampler, Qwen-7B with dynamic NTK)"),
    ]
    return {f.name: f for f in fams}


def families() -> dict[str, Family]:
    """name -> Family, for every supported family."""
    return _families()


def supported_model_types() -> tuple[str, ...]:
    return tuple(t for f in families().values() for t in f.model_types)


def family_for_model_type(model_type) -> Family:
    for f in families().values():
        if model_type in f.model_types:
            return f
    names = "; ".join(f"{', '.join(f.model_types)}: {f.description}" for f in families().values())
    raise ConfigError(f"config.json has model_type={model_type!r}, which jaxflow does not support; "
                      f"supported model_type values: {names}")


def family_of(cfg) -> Family:
    """The family of a parsed config."""
    return families()[cfg.family]


def config_from_hf_dict(d: dict):
    """Any supported transformers config.json dict -> that family's frozen config."""
    return family_for_model_type(d.get("model_type")).config_from_hf(d)


def build_model(cfg, *, rngs, dtype=jnp.float32):
    """A model of `cfg`'s family with fresh parameters."""
    return family_of(cfg).model_class(cfg, rngs=rngs, dtype=dtype)
