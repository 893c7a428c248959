"""LLaVA: CLIP vision tower -> 2-layer MLP projector -> features scattered into a Llama decoder."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxflow.models.clip import ClipVisionTower
from jaxflow.models.config import LlavaConfig
from jaxflow.models.layers import Linear, activation
from jaxflow.models.llama import LlamaModel


class Projector(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs, dtype):
        din = cfg.vision.hidden_size * len(cfg.feature_layers)
        d = cfg.text.hidden_size
        self.linear_1 = Linear(din, d, bias=cfg.projector_bias, rngs=rngs, dtype=dtype)
        self.linear_2 = Linear(d, d, bias=cfg.projector_bias, rngs=rngs, dtype=dtype)
        self.act_name = cfg.projector_hidden_act

    def __call__(self, x):  # (B, N, Dv * n_layers) -> (B, N, D)
        return self.linear_2(activation(self.act_name)(self.linear_1(x)))


class Llava(nnx.Module):
    """Parameters of a LLaVA model. Build with random weights (`Llava(cfg, rngs=nnx.Rngs(0))`) or
    restore converted ones with `jaxflow.load`. The computation lives in `jaxflow.forward` & co."""

    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = cfg
        self.vision_tower = ClipVisionTower(cfg.vision, rngs=rngs, dtype=dtype)
        self.multi_modal_projector = Projector(cfg, rngs=rngs, dtype=dtype)
        self.language_model = LlamaModel(cfg.text, tie_word_embeddings=cfg.tie_word_embeddings, rngs=rngs,
                                         dtype=dtype)

    @property
    def dtype(self):
        return self.language_model.embed_tokens[...].dtype

    def image_features(self, pixel_values, impl: str = "fused"):
        """pixel_values (B, C, H, W) -> projected image features (B, N, D)."""
        cfg = self.config
        layers = cfg.feature_layers
        hs = self.vision_tower(pixel_values, num_layers=max(layers), impl=impl)  # (n+1, B, 1+N, Dv)
        feats = [hs[l] for l in layers]
        if cfg.vision_feature_select_strategy == "default":
            feats = [f[:, 1:] for f in feats]
        return self.multi_modal_projector(jnp.concatenate(feats, axis=-1))

    def embed(self, input_ids, pixel_values, impl: str = "fused"):
        """Token embeddings with image features written, in order, at the image-token positions.

        input_ids (B, T); pixel_values (B_img, C, H, W) or None -> (B, T, D). As transformers'
        masked_scatter: the i-th image token of the batch (row-major) gets the i-th feature row.
        """
        if pixel_values is None:
            return self.language_model.embed(input_ids)
        return self.embed_with_features(input_ids, self.image_features(pixel_values, impl))

    def embed_with_features(self, input_ids, feats):
        """`embed` with the projected image features (B_img, N, D) given: input_ids (B, T) -> (B, T, D)."""
        x = self.language_model.embed(input_ids)
        feats = feats.astype(x.dtype)
        flat = feats.reshape(-1, feats.shape[-1])  # (B_img * N, D)
        is_img = input_ids == self.config.image_token_id
        idx = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, flat.shape[0] - 1).reshape(is_img.shape)
        return jnp.where(is_img[..., None], flat[idx], x)
