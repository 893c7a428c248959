"""InternVL (transformers' `InternVLForConditionalGeneration`, the -hf checkpoints): InternViT tiles ->
pixel shuffle -> LayerNorm + 2-layer projector -> features scattered into a Qwen2 decoder.

An image is cut into tiles (plus a thumbnail when there is more than one tile, see
`jaxflow.data.internvl_image`); every tile gives the same number of tokens ((S / patch * ratio)^2,
256 for 448 px tiles), and an image's tokens are one contiguous block of context tokens between
`<img>` and `</img>` (those markers are text). pixel_values are the tiles of all images in order,
(total_tiles, 3, S, S), as transformers' processor returns them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxflow.models.config import ConfigError, TextConfig, text_config_from_hf, text_config_to_hf
from jaxflow.models.family import DecoderVLM
from jaxflow.models.image_layout import tiled_geometry
from jaxflow.models.internvit import (InternVisionConfig, InternVisionModel, InternVLProjector,
                                      internvl_image_features, vision_config_from_hf)
from jaxflow.models.llama import LlamaModel


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
    vision: InternVisionConfig
    text: TextConfig
    image_token_id: int = 151667  # the <IMG_CONTEXT> token
    downsample_ratio: float = 0.5
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "default"
    tie_word_embeddings: bool = True
    family = "internvl"

    @property
    def tile_side(self) -> int:
        """Tokens per tile side after the pixel shuffle (16 for 448 px tiles of patch 14, ratio 0.5)."""
        return int(round(self.vision.grid * self.downsample_ratio))

    @property
    def tokens_per_tile(self) -> int:
        return self.tile_side ** 2

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-5 InternVL config.json dict for this config."""
        return {
            "architectures": ["InternVLForConditionalGeneration"],
            "model_type": "internvl",
            "image_token_id": self.image_token_id,
            "image_seq_length": self.tokens_per_tile,
            "downsample_ratio": self.downsample_ratio,
            "projector_hidden_act": self.projector_hidden_act,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vision_config": self.vision.to_hf_dict(),
            "text_config": text_config_to_hf(self.text, "qwen2", self.tie_word_embeddings),
        }


def internvl_config_from_hf(d: dict[str, Any]) -> InternVLConfig:
    """A transformers InternVL config.json dict -> InternVLConfig (parsed by transformers' own classes,
    so every default is transformers')."""
    from transformers import InternVLConfig as HFInternVLConfig

    tt = (d.get("text_config") or {}).get("model_type", "qwen2")
    if tt not in ("qwen2", "llama"):
        raise ConfigError(f"InternVL language model {tt!r} is not supported; jaxflow supports Qwen2 and Llama "
                          "decoders")
    try:
        hf = HFInternVLConfig.from_dict(dict(d))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ConfigError(f"config.json is not a valid InternVL config: {e}") from e
    t = hf.text_config
    if t.hidden_act != "silu":
        raise ConfigError(f"text hidden_act {t.hidden_act!r} not supported (silu)")
    vfl = hf.vision_feature_layer
    if not isinstance(vfl, int):
        raise ConfigError(f"vision_feature_layer {vfl!r}: InternVL takes one layer")
    try:
        vision = vision_config_from_hf(dict(d.get("vision_config") or {}))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if not -(vision.num_layers + 1) <= vfl <= vision.num_layers:
        raise ConfigError(f"vision_feature_layer {vfl} is outside the {vision.num_layers + 1} hidden states")
    if hf.vision_feature_select_strategy not in ("default", "full"):
        raise ConfigError(f"vision_feature_select_strategy {hf.vision_feature_select_strategy!r} not supported")
    ratio = float(hf.downsample_ratio)
    side = vision.grid * ratio
    if abs(side - round(side)) > 1e-9 or (hf.vision_feature_select_strategy == "full"):
        raise ConfigError(f"the {vision.grid}x{vision.grid} feature grid does not pixel-shuffle by "
                          f"{ratio} (strategy {hf.vision_feature_select_strategy!r})")
    tie = bool(getattr(t, "tie_word_embeddings", getattr(hf, "tie_word_embeddings", True)))
    return InternVLConfig(vision=vision, text=text_config_from_hf(t), image_token_id=int(hf.image_token_id),
                          downsample_ratio=ratio, projector_hidden_act=hf.projector_hidden_act,
                          vision_feature_layer=int(vfl),
                          vision_feature_select_strategy=hf.vision_feature_select_strategy,
                          tie_word_embeddings=tie)


class InternVL(DecoderVLM, nnx.Module):
    """Parameters of an InternVL model; implements `jaxflow.models.family.VisionLanguageModel`."""

    family = "internvl"

    def __init__(self, cfg: InternVLConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = cfg
        self.vision_tower = InternVisionModel(cfg.vision, rngs=rngs, dtype=dtype)
        self.multi_modal_projector = InternVLProjector(cfg.vision.hidden_size, cfg.text.hidden_size,
                                                       downsample_ratio=cfg.downsample_ratio,
                                                       hidden_act=cfg.projector_hidden_act, rngs=rngs, dtype=dtype)
        self.language_model = LlamaModel(cfg.text, tie_word_embeddings=cfg.tie_word_embeddings, rngs=rngs,
                                         dtype=dtype)

    def image_features(self, pixel_values, impl: str = "fused"):
        """pixel_values (tiles, C, S, S) -> (tiles, tokens_per_tile, D)."""
        cfg = self.config
        return internvl_image_features(self.vision_tower, self.multi_modal_projector, pixel_values,
                                       vision_feature_layer=cfg.vision_feature_layer,
                                       select_strategy=cfg.vision_feature_select_strategy,
                                       downsample_ratio=cfg.downsample_ratio, impl=impl)

    # host side ------------------------------------------------------------------------------

    def check_pixels(self, pixel_values, **_) -> int:
        """Validates the tile shape; returns how many image tokens the tiles give."""
        v = self.config.vision
        pv = np.shape(pixel_values)
        want = (v.num_channels, v.image_size, v.image_size)
        if len(pv) != 4 or tuple(pv[1:]) != want:
            raise ValueError(f"pixel_values must be tiles (n, {want[0]}, {want[1]}, {want[2]}) float32, got {tuple(pv)}")
        return pv[0] * self.config.tokens_per_tile

    def image_geometries(self, input_ids, attention_mask, pixel_values, tile_grids=None) -> list:
        """One geometry per image: its tiles stitched into the original image's layout.

        The number of tiles of each image comes from its block of context tokens; `tile_grids`
        (one (rows, cols) per image, from `jaxflow.data.internvl_image`) says how they are arranged
        (rows * cols tiles, then a thumbnail when rows * cols > 1). Without it an image of one tile is
        1 x 1 and an image of n > 1 tiles is taken as n - 1 tiles in one row plus the thumbnail.
        """
        cfg = self.config
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
        counts = []
        for r in range(ids.shape[0]):
            n = int(((ids[r] == cfg.image_token_id) & (mask[r] > 0)).sum())
            if n % cfg.tokens_per_tile:
                raise ValueError(f"row {r} holds {n} image tokens, not a whole number of tiles of "
                                 f"{cfg.tokens_per_tile}")
            counts.append(n // cfg.tokens_per_tile)
        if tile_grids is not None and len(tile_grids) != len(counts):
            raise ValueError(f"tile_grids has {len(tile_grids)} entries for {len(counts)} images")
        out = []
        for i, n in enumerate(counts):
            if tile_grids is not None:
                rows, cols = (int(x) for x in tile_grids[i])
                thumb = rows * cols > 1
                if rows * cols + thumb != n:
                    raise ValueError(f"image {i}: tile grid {rows}x{cols} (+thumbnail) does not match its {n} tiles")
            elif n == 1:
                rows, cols, thumb = 1, 1, False
            else:
                rows, cols, thumb = 1, n - 1, True
            out.append(tiled_geometry(cfg.tile_side, rows, cols, thumb))
        return out
