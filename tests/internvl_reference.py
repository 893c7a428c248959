"""A tiny random transformers InternVL (eager attention, widened init) as the independent reference,
saved sharded once per test process and converted with the CLI, and its inputs: a left-padded batch
of two images of different aspect ratios (one tile, and 1 x 2 tiles + a thumbnail)."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

import numpy as np
from PIL import Image

import hf_reference as R

VOCAB = 96
IMAGE_TOKEN = 95  # <IMG_CONTEXT>
IMG_START, IMG_END = 93, 94  # <img>, </img>
TILE = 56  # px: a 4x4 patch grid, pixel-shuffled to 2x2 = 4 tokens per tile
TOKENS_PER_TILE = 4


def hf_config():
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    v = InternVLVisionConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, image_size=TILE,
                             patch_size=14, num_hidden_layers=2, norm_type="rms_norm", use_qk_norm=True,
                             attention_bias=True, use_mean_pooling=True)
    t = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    return InternVLConfig(vision_config=v.to_dict(), text_config=t.to_dict(), image_token_id=IMAGE_TOKEN,
                          image_seq_length=TOKENS_PER_TILE, downsample_ratio=0.5, vision_feature_layer=-1,
                          vision_feature_select_strategy="default", tie_word_embeddings=False)


def build_hf_model(seed: int = 0):
    import torch
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration._from_config(hf_config(), attn_implementation="eager").eval()
    with torch.no_grad():  # widen the init so that every parameter (norms, biases, layer scale) matters
        for name, p in model.named_parameters():
            noise = 0.15 * torch.randn(p.shape)
            p.copy_(1.0 + noise if name.endswith("norm.weight") or "layernorm" in name and name.endswith("weight")
                    else noise)
    return model


@functools.lru_cache(maxsize=1)
def pair():
    """(torch model, jaxflow model, hf dir, converted dir) with identical weights: saved sharded, converted
    with the CLI."""
    import jaxflow

    tmp = tempfile.mkdtemp(prefix="jaxflow-internvl-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    hf = build_hf_model()
    R.save_hf(hf, f"{tmp}/hf", max_shard_size="60KB")
    res = R.convert_cli(f"{tmp}/hf", f"{tmp}/jf")
    assert res.returncode == 0, res.stderr[-3000:]
    return hf, jaxflow.load(f"{tmp}/jf"), f"{tmp}/hf", f"{tmp}/jf"


def images():
    """Two images of different aspect ratios: 40x40 (one tile) and 120x50 (1x2 tiles + thumbnail)."""
    rng = np.random.RandomState(0)
    a = Image.fromarray(rng.randint(0, 256, (40, 40, 3), np.uint8))
    b = Image.fromarray(rng.randint(0, 256, (50, 120, 3), np.uint8))
    return [a, b]


def image_config():
    from jaxflow.data.internvl_image import InternVLImageConfig

    return InternVLImageConfig(tile_height=TILE, tile_width=TILE, min_patches=1, max_patches=4)


def batch_inputs(seed: int = 0, padding: str = "left", answer_lengths=None):
    """ids, mask (B, T) int64 of 2 rows [BOS, text.., <img>, ctx * n, </img>, text.. (, answer..)],
    pixel_values (tiles, 3, 56, 56), the per-image layouts and (with answers) answer_mask (B, T)."""
    from jaxflow.data.internvl_image import preprocess_internvl

    px = preprocess_internvl(images(), image_config())
    rng = np.random.RandomState(seed)
    rows, spans = [], []
    for i, (pre, post) in enumerate(((3, 5), (2, 3))):
        n = int(px.num_patches[i]) * TOKENS_PER_TILE
        prompt = [1] + list(rng.randint(5, 90, size=pre - 1)) + [IMG_START] + [IMAGE_TOKEN] * n + [IMG_END] + \
            list(rng.randint(5, 90, size=post))
        k = 0 if answer_lengths is None else answer_lengths[i]
        rows.append(prompt + list(rng.randint(5, 90, size=k)))
        spans.append((len(prompt), k))
    t = max(map(len, rows))
    ids = np.zeros((2, t), np.int64)
    mask = np.zeros((2, t), np.int64)
    amask = np.zeros((2, t), bool)
    for i, (r, (plen, k)) in enumerate(zip(rows, spans)):
        start = t - len(r) if padding == "left" else 0
        ids[i, start:start + len(r)], mask[i, start:start + len(r)] = r, 1
        amask[i, start + plen:start + plen + k] = True
    return ids, mask, px.pixel_values, px.layouts, amask
