"""A tiny, deterministic, randomly initialised LLaVA and its word-level tokenizer (for tests and
pipeline checks), and the bundled demo image. The embedded default model is the trained toy LLaVA
(`jaxflow.pipeline.load_bundle(None)`, jaxflow/assets/toy_llava), which shares this tokenizer.

Nothing is downloaded. The architecture is LLaVA-1.5's (CLIP tower, 2-layer GELU projector, Llama
decoder with GQA) at toy sizes: a 112 px image gives an 8x8 grid of 64 image tokens.
"""
from __future__ import annotations

import functools
import os

import jax.numpy as jnp
from flax import nnx

from jaxflow.data.tiny_tokenizer import (TINY_BOS, TINY_EOS, TINY_IMAGE_TOKEN_ID, TINY_PAD, TINY_VOCAB_SIZE,
                                         build_tiny_tokenizer)
from jaxflow.models.config import RopeConfig, TextConfig, VisionConfig
from jaxflow.models.config import LlavaConfig
from jaxflow.models.llava import Llava

TINY_IMAGE_SIZE = 112
DEMO_IMAGE = os.path.join(os.path.dirname(__file__), "assets", "demo.png")
DEMO_QUESTION = "Is there a red circle in the image?"
# the demo image's objects: (colour, shape, box (x0, y0, x1, y1) in its 112 x 112 pixels)
DEMO_OBJECTS = (("red", "circle", (10, 12, 44, 46)), ("blue", "square", (68, 10, 100, 42)),
                ("green", "triangle", (40, 64, 76, 100)))


def make_demo_image():
    """The bundled demo image (scripts/make_demo_image.py writes it): DEMO_OBJECTS drawn by the toy
    renderer with a fixed seed."""
    import numpy as np

    from jaxflow.toy.data import ToyObject, render

    objs = [ToyObject(c, s, box) for c, s, box in DEMO_OBJECTS]
    return render(objs, np.random.default_rng(2024), TINY_IMAGE_SIZE)


def tiny_config() -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                            image_size=TINY_IMAGE_SIZE, patch_size=14),
        text=TextConfig(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_layers=4,
                        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=512,
                        rope=RopeConfig(theta=10000.0, original_max_position_embeddings=512),
                        bos_token_id=TINY_BOS, eos_token_id=(TINY_EOS,), pad_token_id=TINY_PAD),
        image_token_id=TINY_IMAGE_TOKEN_ID, vision_feature_layer=-2, vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


@functools.lru_cache(maxsize=4)
def tiny_model(seed: int = 0, dtype=jnp.float32) -> Llava:
    """The tiny random model; the same seed gives the same weights on every machine. Built once per
    process (jaxflow's functions never modify a model)."""
    return Llava(tiny_config(), rngs=nnx.Rngs(seed), dtype=dtype)


def tiny_tokenizer():
    return build_tiny_tokenizer()


def save_tiny_checkpoint(path: str, seed: int = 0, *, overwrite: bool = False) -> str:
    """Writes the tiny random model and its tokenizer as a jaxflow checkpoint (a random model for
    checking pipelines: its outputs vary with the image and the cut layer, but mean nothing)."""
    import tempfile

    from jaxflow.convert.checkpoint import save_model

    with tempfile.TemporaryDirectory() as tmp:
        tiny_tokenizer().save_pretrained(tmp)
        return save_model(tiny_model(seed), path, overwrite=overwrite, sidecar_dir=tmp)


# --------------------------------------------------------------------------- a tiny random InternVL

TINY_INTERNVL_TILE = 56  # px tiles: a 4x4 patch grid, pixel-shuffled to 2x2 = 4 tokens per tile
TINY_INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>")  # ids TINY_VOCAB_SIZE + 0, 1, 2
# the tiny tokenizer's chat template: one user turn, the image's context token before the text
TINY_INTERNVL_CHAT_TEMPLATE = (
    "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}")


def tiny_internvl_config():
    """InternViT (rms norm, QK-norm) -> pixel shuffle 0.5 -> projector -> Qwen2 decoder, toy sizes."""
    from jaxflow.models.internvit import InternVisionConfig
    from jaxflow.models.internvl import InternVLConfig

    text = tiny_config().text
    return InternVLConfig(
        vision=InternVisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                  image_size=TINY_INTERNVL_TILE, patch_size=14, norm_type="rms_norm",
                                  use_qk_norm=True, attention_bias=True),
        text=TextConfig(**{**text.__dict__, "vocab_size": TINY_VOCAB_SIZE + len(TINY_INTERNVL_TOKENS),
                           "attention_bias": True, "o_proj_bias": False}),
        image_token_id=TINY_VOCAB_SIZE + 2, downsample_ratio=0.5, tie_word_embeddings=False)


def tiny_internvl_tokenizer():
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(TINY_INTERNVL_TOKENS)})
    tok.chat_template = TINY_INTERNVL_CHAT_TEMPLATE
    return tok


def save_tiny_internvl_checkpoint(path: str, seed: int = 0, *, overwrite: bool = False) -> str:
    """A tiny random InternVL with its tokenizer and a tiling image processor (56 px tiles, 1..4
    tiles) as a jaxflow checkpoint, for checking every pipeline on a second family."""
    import json
    import tempfile

    from jaxflow.convert.checkpoint import save_model
    from jaxflow.models.internvl import InternVL

    model = InternVL(tiny_internvl_config(), rngs=nnx.Rngs(seed))
    with tempfile.TemporaryDirectory() as tmp:
        tiny_internvl_tokenizer().save_pretrained(tmp)
        with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
            json.dump({"image_processor_type": "GotOcr2ImageProcessor", "size": {"height": TINY_INTERNVL_TILE,
                       "width": TINY_INTERNVL_TILE}, "min_patches": 1, "max_patches": 4, "crop_to_patches": True,
                       "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                       "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255, "resample": 3}, f)
        return save_model(model, path, overwrite=overwrite, sidecar_dir=tmp)


# --------------------------------------------------------------------------- a tiny random Qwen2-VL / Qwen2.5-VL

TINY_QWEN2_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")  # TINY_VOCAB_SIZE + i
# one user turn: the image (its start, pad and end tokens) before the text, as Qwen2-VL's template renders it
TINY_QWEN2_VL_CHAT_TEMPLATE = (
    "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}")
# the image processor: patch 14, merge 2 (28 px per token), 4 to 36 tokens per image
TINY_QWEN2_VL_PIXELS = (4 * 28 * 28, 36 * 28 * 28)


def tiny_qwen2_vl_config(version: str = "qwen2_vl"):
    """A Qwen2-VL (or, version "qwen2_5_vl", Qwen2.5-VL with 2 x 2-token windows and one full block)
    vision tower -> patch merger -> Qwen2 decoder with M-RoPE, toy sizes."""
    from jaxflow.models.qwen2_vit import Qwen2VisionConfig
    from jaxflow.models.qwen2_vl import Qwen2VLConfig

    text = tiny_config().text
    base = TINY_VOCAB_SIZE
    if version == "qwen2_vl":
        vision = Qwen2VisionConfig(version="qwen2_vl", depth=2, hidden_size=32, num_heads=2, intermediate_size=64,
                                   hidden_act="quick_gelu", out_hidden_size=text.hidden_size)
    elif version == "qwen2_5_vl":
        vision = Qwen2VisionConfig(version="qwen2_5_vl", depth=3, hidden_size=32, num_heads=2, intermediate_size=48,
                                   hidden_act="silu", out_hidden_size=text.hidden_size, window_size=56,
                                   fullatt_block_indexes=(1,))
    else:
        raise ValueError(f"version must be qwen2_vl or qwen2_5_vl, got {version!r}")
    return Qwen2VLConfig(
        vision=vision,
        text=TextConfig(**{**text.__dict__, "vocab_size": base + len(TINY_QWEN2_VL_TOKENS), "attention_bias": True,
                           "o_proj_bias": False}),
        mrope_section=(2, 3, 3), image_token_id=base + 2, video_token_id=base + 3, vision_start_token_id=base,
        vision_end_token_id=base + 1, tie_word_embeddings=False, family=version)


def tiny_qwen2_vl_tokenizer():
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(TINY_QWEN2_VL_TOKENS)})
    tok.chat_template = TINY_QWEN2_VL_CHAT_TEMPLATE
    return tok


def save_tiny_qwen2_vl_checkpoint(path: str, version: str = "qwen2_vl", seed: int = 0, *,
                                  overwrite: bool = False) -> str:
    """A tiny random Qwen2-VL / Qwen2.5-VL with its tokenizer and image processor (any image size,
    4..36 tokens) as a jaxflow checkpoint, for checking every pipeline on that family."""
    import json
    import tempfile

    from jaxflow.convert.checkpoint import save_model
    from jaxflow.models.qwen2_vl import Qwen2VL

    model = Qwen2VL(tiny_qwen2_vl_config(version), rngs=nnx.Rngs(seed))
    lo, hi = TINY_QWEN2_VL_PIXELS
    with tempfile.TemporaryDirectory() as tmp:
        tiny_qwen2_vl_tokenizer().save_pretrained(tmp)
        with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
            json.dump({"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": lo, "max_pixels": hi,
                       "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
                       "image_mean": [0.48145466, 0.4578275, 0.40821073],
                       "image_std": [0.26862954, 0.26130258, 0.27577711]}, f)
        return save_model(model, path, overwrite=overwrite, sidecar_dir=tmp)


# --------------------------------------------------------------------------- a tiny random Qwen-VL (v1)

TINY_QWEN_VL_TOKENS = ("<img>", "</img>", "<imgpad>")  # ids TINY_VOCAB_SIZE + 0, 1, 2 (<img> = image_start_id)
TINY_QWEN_VL_IMAGE_SIZE = 56  # a 4x4 patch grid: the ViT's 16x16 positional table is bicubically shrunk


def tiny_qwen_vl_config(seq_length: int = 48):
    """Qwen-VL's ViT -> a 16-query resampler (4x4 sin-cos grid) -> a Qwen decoder (fused-qkv bias, dynamic
    NTK and logn from `seq_length` on, so a demo prompt crosses it), toy sizes."""
    from jaxflow.models.qwen_vl import QwenVLConfig, QwenVLVisionConfig

    text = tiny_config().text
    vision = QwenVLVisionConfig(width=32, layers=2, heads=2, mlp_ratio=2.0, image_size=TINY_QWEN_VL_IMAGE_SIZE,
                                patch_size=14, n_queries=16, output_dim=128, image_start_id=TINY_VOCAB_SIZE)
    return QwenVLConfig(
        vision=vision,
        text=TextConfig(**{**text.__dict__, "vocab_size": TINY_VOCAB_SIZE + len(TINY_QWEN_VL_TOKENS),
                           "hidden_size": 128, "num_heads": 4, "num_kv_heads": 4, "head_dim": 32,
                           "rms_norm_eps": 1e-6, "attention_bias": True, "o_proj_bias": False}),
        seq_length=seq_length, use_dynamic_ntk=True, use_logn_attn=True, tie_word_embeddings=False)


def tiny_qwen_vl_tokenizer():
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(TINY_QWEN_VL_TOKENS)})
    return tok


def save_tiny_qwen_vl_checkpoint(path: str, seed: int = 0, *, overwrite: bool = False) -> str:
    """A tiny random Qwen-VL (v1) with its tokenizer as a jaxflow checkpoint, for checking every pipeline
    on that family (images are squashed to 56 px squares, 16 image tokens between <img> and </img>)."""
    import tempfile

    from jaxflow.convert.checkpoint import save_model
    from jaxflow.models.qwen_vl import QwenVL

    model = QwenVL(tiny_qwen_vl_config(), rngs=nnx.Rngs(seed))
    with tempfile.TemporaryDirectory() as tmp:
        tiny_qwen_vl_tokenizer().save_pretrained(tmp)
        return save_model(model, path, overwrite=overwrite, sidecar_dir=tmp)
