"""Llama decoder: RMSNorm, SwiGLU, RoPE, grouped-query attention; layers stacked and scanned.

`LlamaModel.run_layers` is the one place the decoder stack runs. Everything an analysis needs is
an explicit argument, so `jax.grad`, `jax.vmap` and `jax.jit` compose over it:
- `truncate_at` (scalar, may be traced): layers l >= K see no image-token key;
- `mlp_in_delta` (L, B, T, D): added to each layer's MLP input (post-attention RMSNorm output);
- `attn_rows` (B, Q) + optional `attn_row_delta` (L, B, H, Q, S): reference-path probabilities for a
  few query rows (and an additive delta on them whose gradient is dS/dA);
- `capture`: which per-layer intermediates to return ("residual", "mlp_in", "kv").
A KV cache (L, B, S, KVH, hd) is carried through the scan and updated in place.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxflow.models.config import TextConfig
from jaxflow.sharding import constrain_rows
from jaxflow.models.layers import (CAUSAL_BLOCK, Linear, RMSNorm, apply_rope, attend, attention_probs, normal_init,
                                   repeat_kv)

CAPTURES = ("residual", "mlp_in", "kv")


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype):
        d, h, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(d, h * hd, bias=cfg.attention_bias, rngs=rngs, dtype=dtype, axes=("embed", "heads"))
        self.k_proj = Linear(d, kvh * hd, bias=cfg.attention_bias, rngs=rngs, dtype=dtype, axes=("embed", "kv_heads"))
        self.v_proj = Linear(d, kvh * hd, bias=cfg.attention_bias, rngs=rngs, dtype=dtype, axes=("embed", "kv_heads"))
        self.o_proj = Linear(h * hd, d, bias=cfg.attention_bias if cfg.o_proj_bias is None else cfg.o_proj_bias,
                             rngs=rngs, dtype=dtype, axes=("heads", "embed"))
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, hd

    def qkv(self, x, cos, sin):
        """x (B, T, D) -> q (B, T, H, hd), k, v (B, T, KVH, hd); RoPE applied to q and k.

        cos/sin (B, T, hd), or (B, T, 2, hd): key tables, then query tables (Qwen-VL's logn scaling
        of the queries rides on its query tables)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if cos.ndim == 4:
            return apply_rope(q, cos[:, :, 1], sin[:, :, 1]), apply_rope(k, cos[:, :, 0], sin[:, :, 0]), v
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, bias=cfg.mlp_bias, rngs=rngs, dtype=dtype, axes=("embed", "mlp"))
        self.up_proj = Linear(d, f, bias=cfg.mlp_bias, rngs=rngs, dtype=dtype, axes=("embed", "mlp"))
        self.down_proj = Linear(f, d, bias=cfg.mlp_bias, rngs=rngs, dtype=dtype, axes=("mlp", "embed"))

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, rngs=rngs, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(cfg, rngs=rngs, dtype=dtype)


def decoder_layer(layer: LlamaLayer, h, cos, sin, attention, mlp_in_delta=None):
    """The one decoder-layer body, used by the full stack, cached decoding and the truncation sweep.

    h (B, T, D); cos/sin (B, T, hd); attention(q (B, T, H, hd), k, v (B, T, KVH, hd)) -> o (B, T, H, hd)
    decides which keys each query reads (causal mask, cache, shared prefix, knockout);
    mlp_in_delta (B, T, D) is added to the MLP input. Returns h_out (B, T, D), the MLP input m
    (B, T, D) and this layer's new keys and values (k, v) (B, T, KVH, hd).
    """
    b, t = h.shape[:2]
    q, k, v = layer.self_attn.qkv(layer.input_layernorm(h), cos, sin)
    o = attention(q, k, v)
    h_mid = h + layer.self_attn.o_proj(o.reshape(b, t, -1))
    m = layer.post_attention_layernorm(h_mid)
    if mlp_in_delta is not None:
        m = m + mlp_in_delta.astype(m.dtype)
    return h_mid + layer.mlp(m), m, (k, v)


@dataclasses.dataclass
class LayerStackOutput:
    hidden: jax.Array  # (B, T, D) output of the last layer, before the final norm
    captures: dict  # name -> (L, ...) per-layer arrays
    attn_rows: jax.Array | None  # (L, B, H, Q, S) float32 probabilities of the requested rows
    cache: dict | None  # {"k", "v"}: (L, B, S, KVH, hd)


jax.tree_util.register_dataclass(LayerStackOutput, data_fields=["hidden", "captures", "attn_rows", "cache"],
                                 meta_fields=[])


class LlamaModel(nnx.Module):
    mesh = None  # a jax.sharding.Mesh when sharded (`jaxflow.sharding.shard`): rows are constrained to "data"

    def __init__(self, cfg: TextConfig, *, tie_word_embeddings: bool, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        self.embed_tokens = nnx.Param(normal_init(rngs, (cfg.vocab_size, cfg.hidden_size), dtype),
                                       logical_axes=("vocab", "embed"))

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs):
            return LlamaLayer(cfg, rngs=rngs, dtype=dtype)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = None if tie_word_embeddings else nnx.Param(
            normal_init(rngs, (cfg.hidden_size, cfg.vocab_size), dtype), logical_axes=("embed", "vocab"))

    def embed(self, input_ids):  # (B, T) -> (B, T, D)
        return jnp.take(self.embed_tokens[...], input_ids, axis=0)

    def logits(self, h):  # (B, T, D) -> (B, T, V) float32, final norm included
        h = self.norm(h)
        w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.matmul(h, w, preferred_element_type=jnp.float32)  # bf16 weights: float32 sums and logits

    def run_layers(self, x, cos, sin, allowed, *, impl: str = "fused", image_keys=None, truncate_at=None,
                   cache=None, write_index=None, attn_rows=None, attn_row_delta=None, mlp_in_delta=None,
                   capture=(), capture_rows=None, capture_kv_len=None, layers=None,
                   knockout=None) -> LayerStackOutput:
        """Runs the decoder layers.

        x (B, T, D) input embeddings; cos/sin (B, T, hd); allowed (B, T, S) bool: query t may see key
        slot s (causality and padding; S = T without a cache, the cache length with one).
        image_keys (B, S) bool marks image-token keys, used with truncate_at (scalar int: layers
        l >= truncate_at mask them). cache {"k","v"}: (L, B, S, KVH, hd), the new keys are written at
        slot `write_index` (scalar) onward. `layers` (start, stop) runs only that slice of the stack.
        capture_rows (B, R) int gathers the "residual"/"mlp_in" captures at those rows only;
        capture_kv_len (static int) keeps only the first that many slots of the "kv" capture.
        knockout (queries (B, T) bool, keys (B, S) bool, layers (L,) bool): in every selected layer no
        query row in `queries` attends to a key slot in `keys` (attention knockout; positions unchanged).
        """
        unknown = set(capture) - set(CAPTURES)
        if unknown:
            raise ValueError(f"unknown capture {sorted(unknown)}; choose from {CAPTURES}")
        cfg = self.cfg
        start, stop = (0, cfg.num_layers) if layers is None else layers
        graphdef, state = nnx.split(self.layers)
        if (start, stop) != (0, cfg.num_layers):
            state = jax.tree.map(lambda a: a[start:stop], state)
        scale = cfg.head_dim ** -0.5
        n_rep = cfg.num_heads // cfg.num_kv_heads
        xs = {"layer": state, "index": jnp.arange(start, stop)}
        if mlp_in_delta is not None:
            xs["mlp_in_delta"] = mlp_in_delta
        if attn_row_delta is not None:
            xs["attn_row_delta"] = attn_row_delta
        truncating = image_keys is not None and truncate_at is not None
        # queries at slots 0..T-1 (no cache, or a prefill written at slot 0): attention is causal in
        # slot order, so query blocks need only the keys up to their end
        block = CAUSAL_BLOCK if (cache is None or (isinstance(write_index, int) and write_index == 0)) else None
        bidx_all = jnp.arange(x.shape[0])[:, None]

        def body(carry, xs_l):
            h, kv = carry
            layer = nnx.merge(graphdef, xs_l["layer"])
            l = xs_l["index"]
            ok = allowed
            if truncating:
                ok = ok & ~(image_keys[:, None, :] & (l >= truncate_at))
            if knockout is not None:
                ko_q, ko_k, ko_layers = knockout
                ok = ok & ~(ko_q[:, :, None] & ko_k[:, None, :] & ko_layers[l])
            ys = {}

            def attention(q, k, v):
                nonlocal kv
                if kv is not None:  # write this step's keys into the cache, attend over the whole cache
                    li = l - start
                    ck = jax.lax.dynamic_index_in_dim(kv["k"], li, keepdims=False)
                    cv = jax.lax.dynamic_index_in_dim(kv["v"], li, keepdims=False)
                    ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), write_index, axis=1)
                    cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), write_index, axis=1)
                    kv = {"k": jax.lax.dynamic_update_index_in_dim(kv["k"], ck, li, 0),
                          "v": jax.lax.dynamic_update_index_in_dim(kv["v"], cv, li, 0)}
                    k, v = ck, cv
                o = attend(q, k, v, ok, impl=impl, scale=scale, causal_block=block)  # (B, T, H, hd)
                if attn_rows is not None:
                    bidx = jnp.arange(q.shape[0])[:, None]
                    q_rows = q[bidx, attn_rows]  # (B, Q, H, hd)
                    ok_rows = ok[bidx, attn_rows]  # (B, Q, S)
                    probs = attention_probs(q_rows, k, ok_rows, scale)  # (B, H, Q, S)
                    ys["attn_rows"] = probs
                    if "attn_row_delta" in xs_l:
                        p = (probs + xs_l["attn_row_delta"]).astype(v.dtype)
                        o_rows = jnp.einsum("bhqs,bshd->bqhd", p, repeat_kv(v, n_rep))
                        o = o.at[bidx, attn_rows].set(o_rows)
                return o

            h_out, m, (k_new, v_new) = decoder_layer(layer, h, cos, sin, attention, xs_l.get("mlp_in_delta"))
            pick = (lambda a: a) if capture_rows is None else (lambda a: a[bidx_all, capture_rows])
            if "residual" in capture:
                ys["residual"] = pick(h)
            if "mlp_in" in capture:
                ys["mlp_in"] = pick(m)
            if "kv" in capture:
                ys["k"], ys["v"] = k_new[:, :capture_kv_len], v_new[:, :capture_kv_len]
            return (h_out, kv), ys

        x = constrain_rows(x, self.mesh)  # the stack's boundaries: batch rows on "data"
        (h, kv), ys = jax.lax.scan(body, (x, cache), xs)
        h = constrain_rows(h, self.mesh)
        rows = ys.pop("attn_rows", None)
        return LayerStackOutput(hidden=h, captures=ys, attn_rows=rows, cache=kv)
