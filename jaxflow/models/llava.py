"""LLaVA: CLIP vision tower -> 2-layer MLP projector -> features scattered into a Llama decoder."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxflow.models.clip import ClipVisionTower
from jaxflow.models.config import LlavaConfig
from jaxflow.models.family import DecoderVLM, scatter_image_features
from jaxflow.models.image_layout import square_geometry
from jaxflow.models.layers import Linear, activation
from jaxflow.models.llama import LlamaModel


class Projector(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs, dtype):
        din = cfg.vision.hidden_size * len(cfg.feature_layers)
        d = cfg.text.hidden_size
        self.linear_1 = Linear(din, d, bias=cfg.projector_bias, rngs=rngs, dtype=dtype, axes=(None, "mlp"))
        self.linear_2 = Linear(d, d, bias=cfg.projector_bias, rngs=rngs, dtype=dtype, axes=("mlp", "embed"))
        self.act_name = cfg.projector_hidden_act

    def __call__(self, x):  # (B, N, Dv * n_layers) -> (B, N, D)
        return self.linear_2(activation(self.act_name)(self.linear_1(x)))


class Llava(DecoderVLM, nnx.Module):
    """Parameters of a LLaVA model. Build with random weights (`Llava(cfg, rngs=nnx.Rngs(0))`) or
    restore converted ones with `jaxflow.load`. The computation lives in `jaxflow.forward` & co.
    Implements `jaxflow.models.family.VisionLanguageModel`."""

    family = "llava"

    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = cfg
        self.vision_tower = ClipVisionTower(cfg.vision, rngs=rngs, dtype=dtype)
        self.multi_modal_projector = Projector(cfg, rngs=rngs, dtype=dtype)
        self.language_model = LlamaModel(cfg.text, tie_word_embeddings=cfg.tie_word_embeddings, rngs=rngs,
                                         dtype=dtype)

    def image_features(self, pixel_values, impl: str = "fused"):
        """pixel_values (B, C, H, W) -> projected image features (B, N, D)."""
        cfg = self.config
        layers = cfg.feature_layers
        hs = self.vision_tower(pixel_values, num_layers=max(layers), impl=impl)  # (n+1, B, 1+N, Dv)
        feats = [hs[l] for l in layers]
        if cfg.vision_feature_select_strategy == "default":
            feats = [f[:, 1:] for f in feats]
        return self.multi_modal_projector(jnp.concatenate(feats, axis=-1))

    # host side ------------------------------------------------------------------------------

    def check_pixels(self, pixel_values) -> int:
        """Validates the pixel shape; returns how many image tokens the images give."""
        cfg = self.config
        pv = np.shape(pixel_values)
        v = cfg.vision
        want = (v.num_channels, v.image_size, v.image_size)
        if len(pv) != 4 or tuple(pv[1:]) != want:
            raise ValueError(f"pixel_values must be (B, {want[0]}, {want[1]}, {want[2]}) float32, got {tuple(pv)}")
        return pv[0] * cfg.num_image_tokens

    def image_geometries(self, input_ids, attention_mask, pixel_values) -> list:
        """One square geometry per image (the CLS feature of strategy "full" is not spatial)."""
        cfg = self.config
        lead = 1 if cfg.vision_feature_select_strategy == "full" else 0
        return [square_geometry(cfg.vision.grid, lead)] * int(np.shape(pixel_values)[0])

    def embed_with_features(self, input_ids, feats):
        """`embed` with the projected image features given ((B_img, N, D) or packed (n, D)):
        input_ids (B, T) -> (B, T, D)."""
        return scatter_image_features(self.language_model.embed(input_ids), input_ids, self.config.image_token_id,
                                      feats)
