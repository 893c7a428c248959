"""CLIP ViT vision tower (pre-layernorm, quick_gelu), layers stacked on a leading axis and scanned."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxflow.models.config import VisionConfig
from jaxflow.models.layers import LayerNorm, Linear, activation, attend, normal_init


class ClipAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype):
        d = cfg.hidden_size
        self.q_proj = Linear(d, d, bias=True, rngs=rngs, dtype=dtype, axes=("embed", "heads"))
        self.k_proj = Linear(d, d, bias=True, rngs=rngs, dtype=dtype, axes=("embed", "heads"))
        self.v_proj = Linear(d, d, bias=True, rngs=rngs, dtype=dtype, axes=("embed", "heads"))
        self.out_proj = Linear(d, d, bias=True, rngs=rngs, dtype=dtype, axes=("heads", "embed"))
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim

    def __call__(self, x, impl: str):  # (B, N, D) -> (B, N, D)
        b, n, _ = x.shape
        split = lambda t: t.reshape(b, n, self.num_heads, self.head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        allowed = jnp.ones((b, n, n), bool)
        o = attend(q, k, v, allowed, impl=impl, scale=self.head_dim ** -0.5)
        return self.out_proj(o.reshape(b, n, -1))


class ClipMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype):
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, rngs=rngs, dtype=dtype, axes=("embed", "mlp"))
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, rngs=rngs, dtype=dtype, axes=("mlp", "embed"))
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.self_attn = ClipAttention(cfg, rngs=rngs, dtype=dtype)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.mlp = ClipMLP(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, x, impl: str):  # (B, N, D)
        x = x + self.self_attn(self.layer_norm1(x), impl)
        return x + self.mlp(self.layer_norm2(x))


class ClipVisionTower(nnx.Module):
    """pixel_values (B, C, H, W) -> hidden states (n+1, B, 1 + num_patches, D) for the first n layers."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        # patch_embedding: conv kernel (D, C, P, P) flattened to a (C*P*P, D) matmul, no bias
        self.patch_embedding = nnx.Param(normal_init(rngs, (c * p * p, d), dtype))
        self.class_embedding = nnx.Param(normal_init(rngs, (d,), dtype))
        self.position_embedding = nnx.Param(normal_init(rngs, (cfg.num_patches + 1, d), dtype))
        self.pre_layrnorm = LayerNorm(d, cfg.layer_norm_eps, dtype)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs):
            return ClipLayer(cfg, rngs=rngs, dtype=dtype)

        self.layers = make_layers(rngs)
        # unused by LLaVA (no post-layernorm on the selected features) but part of the checkpoint
        self.post_layernorm = LayerNorm(d, cfg.layer_norm_eps, dtype)

    def embed(self, pixel_values):  # (B, C, H, W) -> (B, 1 + N, D)
        cfg = self.cfg
        b, c, h, w = pixel_values.shape
        p, g = cfg.patch_size, cfg.grid
        if (h, w) != (cfg.image_size, cfg.image_size) or c != cfg.num_channels:
            raise ValueError(f"pixel_values must be (B, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}), "
                             f"got {tuple(pixel_values.shape)}")
        w_patch = self.patch_embedding[...]
        x = pixel_values.astype(w_patch.dtype).reshape(b, c, g, p, g, p)
        x = x.transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)  # (B, N, C*P*P), conv order
        patches = x @ w_patch
        cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1) + self.position_embedding[...][None]
        return self.pre_layrnorm(x)

    def __call__(self, pixel_values, num_layers: int | None = None, impl: str = "fused"):
        """Returns the hidden states 0..num_layers stacked: (num_layers + 1, B, 1 + N, D)."""
        n = self.cfg.num_layers if num_layers is None else num_layers
        x = self.embed(pixel_values)
        if n == 0:
            return x[None]
        graphdef, state = nnx.split(self.layers)
        state = jax.tree.map(lambda a: a[:n], state)

        def body(h, layer_state):
            h = nnx.merge(graphdef, layer_state)(h, impl)
            return h, h

        _, hs = jax.lax.scan(body, x, state)
        return jnp.concatenate([x[None], hs], axis=0)
