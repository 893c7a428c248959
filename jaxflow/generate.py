"""Greedy decoding with an explicit KV cache, jit-compiled end to end (prefill + while loop)."""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxflow.forward import _check_impl, _keep_mask, causal_allowed, validate_inputs
from jaxflow.models.family import VisionLanguageModel, next_positions


@dataclasses.dataclass
class GenerateOutput:
    tokens: np.ndarray  # (B, max_new_tokens) int32, pad_token_id after a row's EOS
    lengths: np.ndarray  # (B,) generated tokens per row, EOS included


def init_cache(model: VisionLanguageModel, batch: int, length: int, dtype) -> dict:
    """Empty KV cache {"k", "v"}: (L, B, S, KVH, hd)."""
    t = model.config.text
    shape = (t.num_layers, batch, length, t.num_kv_heads, t.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def left_align(input_ids, attention_mask, *companions):
    """Moves right padding to the left (row by row, order kept): generation appends at the end.
    Companion (B, T) arrays (e.g. a keep mask) move with the ids. Returns (ids, mask, *companions)."""
    arrays = [np.array(a) for a in (input_ids, attention_mask, *companions)]
    mask = arrays[1]
    for b in range(mask.shape[0]):
        trailing = int(np.argmax(mask[b, ::-1] > 0))
        if trailing:
            for a in arrays:
                a[b] = np.roll(a[b], trailing)
    return tuple(arrays)


def stop_tokens(cfg, eos_token_id=None, pad_token_id=None) -> tuple[np.ndarray, int]:
    """(EOS ids (n,) int32, pad id): the given ones, else the config's; no EOS -> [-1] (never matches),
    pad falls back to the config's pad, then the first EOS, then 0."""
    eos = cfg.text.eos_token_id if eos_token_id is None else eos_token_id
    eos = np.atleast_1d(np.asarray(eos if eos is not None and np.size(eos) else [-1], np.int32))
    if pad_token_id is not None:
        return eos, int(pad_token_id)
    pad = cfg.text.pad_token_id if cfg.text.pad_token_id is not None else int(eos[0]) if eos[0] >= 0 else 0
    return eos, int(pad)


def decode_step(model: VisionLanguageModel, cache, tokens, positions, key_valid, write_index, *, impl, image_keys=None,
                truncate_at=None, context_len=None):
    """One cached step: tokens (B, 1) at positions (B, 1) (a generated token's position is the same on
    every rotary axis), keys valid (B, S) -> logits (B, V), cache. context_len: the prompt's padded
    length (static), whose RoPE scaling decoding keeps (Qwen-VL's dynamic NTK)."""
    lm = model.language_model
    x = lm.embed(tokens)
    cos, sin = model.rope_tables(positions, x.dtype, context_len=context_len)
    slots = jnp.broadcast_to(write_index, tokens.shape)
    allowed = causal_allowed(key_valid, slots, key_valid.shape[1])
    out = lm.run_layers(x, cos, sin, allowed, impl=impl, image_keys=image_keys, truncate_at=truncate_at,
                        cache=cache, write_index=write_index)
    return lm.logits(out.hidden)[:, -1], out.cache


@partial(jax.jit, static_argnames=("max_new_tokens", "impl"))
def _generate_jit(model, input_ids, images, attention_mask, eos_ids, pad_id, truncate_at, keep_image_mask, *,
                  max_new_tokens, impl):
    lm = model.language_model
    b, t = input_ids.shape
    total = t + max_new_tokens
    x = model.embed(input_ids, images, impl)
    positions = model.positions(input_ids, attention_mask, images)
    cos, sin = model.rope_tables(positions, x.dtype, context_len=t)
    key_valid = jnp.concatenate([attention_mask > 0, jnp.ones((b, max_new_tokens), bool)], axis=1)
    allowed = causal_allowed(key_valid, jnp.broadcast_to(jnp.arange(t), (b, t)), total)
    image_keys = input_ids == model.config.image_token_id
    if keep_image_mask is not None:
        image_keys = image_keys & ~keep_image_mask
    image_keys = jnp.concatenate([image_keys, jnp.zeros((b, max_new_tokens), bool)], axis=1)
    cache = init_cache(model, b, total, x.dtype)
    out = lm.run_layers(x, cos, sin, allowed, impl=impl, image_keys=image_keys, truncate_at=truncate_at,
                        cache=cache, write_index=0)
    logits0 = lm.logits(out.hidden[:, -1:])[:, -1]  # (B, V)
    finite = jnp.isfinite(logits0).all()
    first = jnp.argmax(logits0, axis=-1).astype(jnp.int32)
    next_pos = next_positions(positions, attention_mask)  # (B,) position of the first new token
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos_ids)

    def cond(state):
        step, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tokens, done, cache = state
        prev = tokens[:, step - 1]
        logits, cache = decode_step(model, cache, prev[:, None], (next_pos + step - 1)[:, None], key_valid,
                                    t + step - 1, impl=impl, image_keys=image_keys, truncate_at=truncate_at,
                                    context_len=t)
        tok = jnp.where(done, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        tokens = tokens.at[:, step].set(tok)
        return step + 1, tokens, done | jnp.isin(tok, eos_ids), cache

    _, tokens, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, done, out.cache))
    return tokens, finite


def generate(model: VisionLanguageModel, input_ids, pixel_values, attention_mask=None, *, max_new_tokens: int = 32,
             eos_token_id=None, pad_token_id: int | None = None, attn_impl: str = "fused",
             truncate_at: int | None = None, keep_image_mask=None, check_finite: bool = True,
             **image_kw) -> GenerateOutput:
    """Greedy decoding, batched, with a KV cache; a row stops at EOS, all stop at max_new_tokens.

    input_ids/attention_mask (B, T) (right padding is moved to the left first); pixel_values
    (B_img, 3, H, W). eos_token_id: int or list (default: the config's). truncate_at=K decodes with
    image keys masked in layers >= K, except those in keep_image_mask (B, T) bool. image_kw: the
    family's image arguments (Qwen2-VL: image_grid_thw). Returns GenerateOutput(tokens (B, max_new_tokens),
    lengths (B,)). check_finite: NaN/Inf logits of the prompt raise `jaxflow.health.NonFiniteError` naming
    the first non-finite stage (the check is one reduction inside the program).
    """
    _check_impl(attn_impl)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    cfg = model.config
    ids, mask = validate_inputs(model, input_ids, pixel_values, attention_mask, truncate_at,
                                new_tokens=int(max_new_tokens), **image_kw)
    if keep_image_mask is not None:
        _keep_mask(keep_image_mask, ids.shape)  # validates
        ids, mask, keep = left_align(ids, mask, np.asarray(keep_image_mask))
        keep = jnp.asarray(keep)
    else:
        ids, mask = left_align(ids, mask)
        keep = None
    eos, pad = stop_tokens(cfg, eos_token_id, pad_token_id)
    images = model.image_inputs(ids, mask, pixel_values, **image_kw)
    k = None if truncate_at is None else jnp.int32(truncate_at)
    tokens, finite = _generate_jit(model, jnp.asarray(ids), images, jnp.asarray(mask), jnp.asarray(eos),
                                   jnp.int32(pad), k, keep, max_new_tokens=int(max_new_tokens), impl=attn_impl)
    if check_finite and not bool(finite):
        from jaxflow.health import raise_non_finite

        raise_non_finite(model, ids, pixel_values, mask, what="the prompt's logits", **image_kw)
    tokens = np.asarray(tokens)
    is_eos = np.isin(tokens, eos)
    lengths = np.where(is_eos.any(1), is_eos.argmax(1) + 1, max_new_tokens).astype(np.int32)
    return GenerateOutput(tokens=tokens, lengths=lengths)
