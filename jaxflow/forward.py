"""The forward pass: `jaxflow.forward` and the pure, jit-compiled functions behind it."""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxflow.models.family import VisionLanguageModel
from jaxflow.models.layers import ATTN_IMPLS


@dataclasses.dataclass
class ForwardOutput:
    logits: jax.Array  # (B, T, V) float32
    hidden: jax.Array  # (B, T, D) last layer output, before the final norm
    captures: dict  # per-layer intermediates asked for with `capture`, each (L, B, ...)
    attn_rows: jax.Array | None  # (L, B, H, Q, T) float32, when attn_rows was given


jax.tree_util.register_dataclass(ForwardOutput, data_fields=["logits", "hidden", "captures", "attn_rows"],
                                 meta_fields=[])


# --------------------------------------------------------------------------- masks and positions


def causal_allowed(key_valid, q_slots, num_keys: int):
    """key_valid (B, S) bool, q_slots (B, Q) int -> allowed (B, Q, S): key s is real and s <= slot."""
    s = jnp.arange(num_keys)
    return key_valid[:, None, :] & (s[None, None, :] <= q_slots[:, :, None])


# --------------------------------------------------------------------------- host-side validation


def _as_int_array(name, x, ndim=2):
    a = np.asarray(x)
    if a.ndim != ndim or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be a {ndim}-D integer array, got shape {a.shape} dtype {a.dtype}")
    return a


def validate_inputs(model: VisionLanguageModel, input_ids, pixel_values, attention_mask=None, truncate_at=None,
                    new_tokens: int = 0, **image_kw):
    """Checks shapes, image-token counts and that the sequence (plus `new_tokens` to generate) fits the
    model's positions; returns numpy (input_ids, attention_mask) int32."""
    cfg = model.config
    ids = _as_int_array("input_ids", input_ids)
    limit = max_positions(cfg)
    if ids.shape[1] + new_tokens > limit:
        extra = f" plus {new_tokens} tokens to generate" if new_tokens else ""
        raise ValueError(f"the prompt has {ids.shape[1]} tokens{extra}, more than the model's {limit} positions: "
                         "shorten the question (or generate fewer tokens)")
    if attention_mask is None:
        mask = np.ones_like(ids, dtype=np.int32)
    else:
        mask = _as_int_array("attention_mask", np.asarray(attention_mask).astype(np.int32))
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    if not mask.any(axis=1).all():
        raise ValueError("a row of attention_mask has no real token")
    if ids.min() < 0 or ids.max() >= cfg.text.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {cfg.text.vocab_size}); got range [{ids.min()}, {ids.max()}]")
    n_img_tokens = int(((ids == cfg.image_token_id) & (mask > 0)).sum())
    if pixel_values is not None:
        expected = model.check_pixels(pixel_values, **image_kw)
        if n_img_tokens != expected:
            raise ValueError(f"input_ids hold {n_img_tokens} image tokens (id {cfg.image_token_id}) but "
                             f"the {np.shape(pixel_values)[0]} image(s) of pixel_values give {expected} features: "
                             "expand each image placeholder to its tokens (jaxflow.data.prompts.encode_batch does)")
    if truncate_at is not None:
        L = cfg.text.num_layers
        if not (isinstance(truncate_at, (int, np.integer)) and 0 <= int(truncate_at) <= L):
            raise ValueError(f"truncate_at must be an integer in 0..{L} (layers >= K lose image keys; "
                             f"{L} = untruncated), got {truncate_at!r}")
    return ids.astype(np.int32), mask.astype(np.int32)


def max_positions(cfg) -> int:
    """The longest sequence the model takes: its config's `max_positions` where the family defines one
    (Qwen-VL: the official logn table), else the decoder's max_position_embeddings, except under dynamic
    RoPE scaling, which exists to run beyond it (no limit then)."""
    if getattr(cfg, "max_positions", None):
        return int(cfg.max_positions)
    if cfg.text.rope.rope_type == "dynamic":
        return 2 ** 31 - 1
    return int(cfg.text.max_position_embeddings)


def _check_impl(attn_impl):
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")


# --------------------------------------------------------------------------- pure jitted core


def forward_core(model: VisionLanguageModel, input_ids, images, attention_mask, *, impl="fused",
                 truncate_at=None, keep_image_mask=None, mlp_in_delta=None, attn_rows=None, attn_row_delta=None,
                 capture=(), input_embeds=None, knockout=None):
    """Pure forward, any family. input_ids/attention_mask (B, T) int32; images: the model's
    `image_inputs` (the processor's pixel_values and what the family derives from them), or None.

    `input_embeds` (B, T, D), when given, replaces the embedding step (used to differentiate with
    respect to the embedded sequence). `keep_image_mask` (B, T) bool marks image tokens that
    truncation keeps (FastV-style partial truncation). `knockout` (queries (B, T), keys (B, T), layers
    (L,)) bool: attention knockout (`LlamaModel.run_layers`). Returns ForwardOutput.
    """
    lm = model.language_model
    x = model.embed(input_ids, images, impl) if input_embeds is None else input_embeds
    positions = model.positions(input_ids, attention_mask, images)
    t = input_ids.shape[1]
    cos, sin = model.rope_tables(positions, x.dtype, context_len=t)
    allowed = causal_allowed(attention_mask > 0, jnp.broadcast_to(jnp.arange(t), input_ids.shape), t)
    image_keys = input_ids == model.config.image_token_id
    if keep_image_mask is not None:
        image_keys = image_keys & ~keep_image_mask
    out = lm.run_layers(x, cos, sin, allowed, impl=impl, image_keys=image_keys, truncate_at=truncate_at,
                        attn_rows=attn_rows, attn_row_delta=attn_row_delta, mlp_in_delta=mlp_in_delta,
                        capture=capture, knockout=knockout)
    return ForwardOutput(logits=lm.logits(out.hidden), hidden=out.hidden, captures=out.captures,
                         attn_rows=out.attn_rows)


@partial(jax.jit, static_argnames=("impl", "capture"))
def _forward_jit(model, input_ids, images, attention_mask, truncate_at, keep_image_mask, impl, capture):
    return forward_core(model, input_ids, images, attention_mask, impl=impl, truncate_at=truncate_at,
                        keep_image_mask=keep_image_mask, capture=capture)


def forward(model: VisionLanguageModel, input_ids, pixel_values, attention_mask=None, *, attn_impl: str = "fused",
            truncate_at: int | None = None, keep_image_mask=None, capture: tuple[str, ...] = (),
            **image_kw) -> ForwardOutput:
    """Logits of a model of any family, jit-compiled.

    input_ids (B, T) with the image token id at every image-feature position (576 per image for
    LLaVA-1.5); pixel_values as the family's transformers processor returns them (LLaVA
    (B_img, 3, H, W); InternVL (total_tiles, 3, S, S)), float32 preprocessed, or None for text only;
    attention_mask (B, T) 1 = real token (left or right padding; positions count real tokens).
    truncate_at=K masks every image-token key in layers >= K (the reference truncation path);
    keep_image_mask (B, T) bool exempts those image tokens (FastV-style partial truncation).
    capture: per-layer intermediates to return ("residual", "mlp_in", "kv").
    image_kw: the family's image arguments (Qwen2-VL: image_grid_thw).
    Returns ForwardOutput with logits (B, T, V) float32.
    """
    _check_impl(attn_impl)
    ids, mask = validate_inputs(model, input_ids, pixel_values, attention_mask, truncate_at, **image_kw)
    images = model.image_inputs(ids, mask, pixel_values, **image_kw)
    k = None if truncate_at is None else jnp.int32(truncate_at)
    keep = _keep_mask(keep_image_mask, ids.shape)
    return _forward_jit(model, jnp.asarray(ids), images, jnp.asarray(mask), k, keep, attn_impl, tuple(capture))


def _keep_mask(keep_image_mask, shape):
    if keep_image_mask is None:
        return None
    keep = np.asarray(keep_image_mask)
    if keep.shape != shape or keep.dtype != bool:
        raise ValueError(f"keep_image_mask must be a bool array of shape {shape}, got {keep.shape} {keep.dtype}")
    return jnp.asarray(keep)


@partial(jax.jit, static_argnames=("impl",))
def _image_features_jit(model, images, impl):
    return model.image_features(images, impl)


def image_features(model: VisionLanguageModel, pixel_values, *, attn_impl: str = "fused", **image_kw):
    """Projected image features float32 — what the model scatters at the image tokens: LLaVA
    (B, N, D); InternVL (tiles, tokens per tile, D); Qwen2-VL (tokens of all images, D)."""
    _check_impl(attn_impl)
    images = model.image_inputs(None, None, pixel_values, **image_kw)
    return _image_features_jit(model, images, attn_impl).astype(jnp.float32)
