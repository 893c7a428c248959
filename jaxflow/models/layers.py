"""Building blocks shared by the vision tower and the decoder: parameters, norms, RoPE, attention.

Attention has three paths that compute the same thing:
- "fused": `jax.nn.dot_product_attention`: cuDNN's fused kernel where it applies (a CUDA GPU, a
  bf16/fp16 model, head_dim a multiple of 8 up to 128), else XLA's; returns no probabilities;
- "xla": the same call, always XLA's implementation;
- "cudnn": the same call, cuDNN or an error (to insist on the kernel);
- "reference": explicit scores and float32 softmax, the path that can expose probabilities.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxflow.models.config import RopeConfig, TextConfig

ATTN_IMPLS = ("fused", "xla", "cudnn", "reference")
CAUSAL_BLOCK = 128  # query block of the causal attention in full-sequence passes
_NEG = -1e30  # finite "minus infinity": fully masked rows give a uniform row, never NaN


def normal_init(rngs: nnx.Rngs, shape, dtype, std: float = 0.02):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel + bias; kernel (in, out) — transformers stores the transpose. axes: the logical
    names of (in, out) that `jaxflow.sharding` maps to mesh axes (None: replicated)."""

    def __init__(self, din: int, dout: int, *, bias: bool, rngs: nnx.Rngs, dtype=jnp.float32, axes=(None, None)):
        self.kernel = nnx.Param(normal_init(rngs, (din, dout), dtype), logical_axes=tuple(axes))
        self.bias = nnx.Param(jnp.zeros((dout,), dtype), logical_axes=(axes[1],)) if bias else None

    def __call__(self, x):  # (..., in) -> (..., out)
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x):  # (..., D)
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = ((xf - mean) ** 2).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """Llama RMSNorm: normalise in float32, cast back, then scale (as transformers does)."""

    def __init__(self, dim: int, eps: float, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):  # (..., D)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt((xf * xf).mean(-1, keepdims=True) + self.eps)
        return self.scale[...] * y.astype(x.dtype)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


# Module-level functions, not lambdas made per call: a module stores its activation as static
# pytree metadata, so a fresh function per loaded model would make every jit see a new model
# structure and compile again (the demo compiled its generate program three times).
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu_exact, "gelu_pytorch_tanh": gelu_tanh,
               "silu": jax.nn.silu, "relu": jax.nn.relu}


def activation(name: str):
    """The activation function of a config name (the same function object on every call)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# --------------------------------------------------------------------------- RoPE


def rope_inv_freq(text: TextConfig, seq_len=None):
    """Inverse frequencies (head_dim/2,) float32, as transformers' rope init functions compute them.

    `seq_len` (a scalar, may be traced) only matters for "dynamic": transformers recomputes the base
    when the longest position in the call exceeds max_position_embeddings.
    """
    rope: RopeConfig = text.rope
    dim = text.head_dim
    exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    base = jnp.float32(rope.theta)
    if rope.rope_type == "dynamic" and seq_len is not None:
        mp = text.max_position_embeddings
        s = jnp.maximum(jnp.asarray(seq_len, jnp.float32), mp)
        base = base * ((rope.factor * s / mp) - (rope.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exponent)
    inv = 1.0 / (base ** exponent)
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        low_wl, high_wl = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wl, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return jnp.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(positions, inv_freq, dtype):
    """positions (B, T) int -> cos, sin (B, T, head_dim) in `dtype` (computed in float32)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, hd/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
    """x (B, T, H, hd); cos/sin (B, T, hd)."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


# --------------------------------------------------------------------------- attention


def repeat_kv(x, n_rep: int):
    """(B, T, KVH, hd) -> (B, T, KVH * n_rep, hd); query head h reads kv head h // n_rep."""
    return x if n_rep == 1 else jnp.repeat(x, n_rep, axis=2)


def attention_probs(q, k, allowed, scale: float):
    """Reference softmax: q (B, Q, H, hd), k (B, S, KVH, hd), allowed (B, Q, S) -> (B, H, Q, S) float32."""
    k = repeat_kv(k, q.shape[2] // k.shape[2])
    scores = jnp.einsum("bqhd,bshd->bhqs", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(allowed[:, None], scores, _NEG)
    return jax.nn.softmax(scores, axis=-1)


def attend(q, k, v, allowed, *, impl: str, scale: float, causal_block: int | None = None):
    """q (B, Q, H, hd), k/v (B, S, KVH, hd), allowed (B, Q, S) bool -> (B, Q, H, hd).

    causal_block: when query t sits at key slot t and `allowed` is causal (never a key after its
    query), queries are processed in blocks of this size, each against the keys up to its end only:
    exact, and it skips the masked upper triangle of the scores.
    """
    nq = q.shape[1]
    if impl == "cudnn" and not cudnn_applies(q):
        raise ValueError(f"attn_impl='cudnn' needs a CUDA GPU, a bfloat16/float16 model and head_dim a multiple "
                         f"of 8 up to 128 (got {jax.default_backend()}, {q.dtype}, {q.shape[-1]}); use attn_impl='fused'")
    if impl == "cudnn" or (impl == "fused" and cudnn_applies(q)):
        # one kernel over the whole sequence (no query blocks); the mask enters as an additive bias
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], scale=scale, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):
            if impl == "cudnn":
                raise
            # this jax/cuDNN refuses the call: XLA's path below
    if causal_block and nq > causal_block:
        if impl == "reference":  # heads-first once, then every block is a plain batched matmul
            return _reference_blocked(q, k, v, allowed, scale, causal_block)
        outs = []
        for start in range(0, nq, causal_block):
            end = min(start + causal_block, nq)
            outs.append(attend(q[:, start:end], k[:, :end], v[:, :end], allowed[:, start:end, :end], impl=impl,
                               scale=scale))
        return jnp.concatenate(outs, axis=1)
    if impl in ("fused", "xla"):
        return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], scale=scale, implementation="xla")
    if impl != "reference":
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    probs = attention_probs(q, k, allowed, scale).astype(v.dtype)
    return jnp.einsum("bhqs,bshd->bqhd", probs, repeat_kv(v, q.shape[2] // v.shape[2]))


def cudnn_applies(q) -> bool:
    """Whether cuDNN's fused attention can take q (B, Q, H, hd): a CUDA GPU, bf16/fp16, hd % 8 == 0, hd <= 128."""
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def _reference_blocked(q, k, v, allowed, scale, block):
    """Reference attention in causal query blocks, heads-first layout (B, H, T, hd) throughout."""
    b, nq, h, hd = q.shape
    g = k.shape[2]
    qh = q.transpose(0, 2, 1, 3).reshape(b, g, h // g, nq, hd)  # head h reads kv head h // (H / KVH)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, KVH, S, hd)
    outs = []
    for start in range(0, nq, block):
        end = min(start + block, nq)
        sc = jnp.einsum("bgrqd,bgsd->bgrqs", qh[:, :, :, start:end], kh[:, :, :end],
                        preferred_element_type=jnp.float32) * scale
        sc = jnp.where(allowed[:, None, None, start:end, :end], sc, _NEG)
        p = jax.nn.softmax(sc, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bgrqs,bgsd->bgrqd", p, vh[:, :, :end]))
    o = jnp.concatenate(outs, axis=3)  # (B, KVH, R, Q, hd)
    return o.reshape(b, h, nq, hd).transpose(0, 2, 1, 3)
