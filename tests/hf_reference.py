"""Tiny random transformers LLaVA models as the independent reference (torch, eager attention)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each case varies what the foundation must get right; see tests/test_parity.py.
CASES = {
    # MHA, feature layer -2, "default", 2x2 grid, untied, no rope scaling
    "mha": dict(vision=dict(image_size=28, patch_size=14, num_hidden_layers=3),
                text=dict(num_attention_heads=4, num_key_value_heads=4),
                top=dict(vision_feature_layer=-2, vision_feature_select_strategy="default",
                         tie_word_embeddings=False)),
    # GQA, feature layer -1, "full", 3x3 grid, tied embeddings, linear rope scaling
    "gqa": dict(vision=dict(image_size=42, patch_size=14, num_hidden_layers=2),
                text=dict(num_attention_heads=4, num_key_value_heads=2,
                          rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
                top=dict(vision_feature_layer=-1, vision_feature_select_strategy="full",
                         tie_word_embeddings=True)),
    # llama3 rope, feature-layer list, biases everywhere, 4x4 grid (patch 8), GQA 8/2
    "llama3": dict(vision=dict(image_size=32, patch_size=8, num_hidden_layers=3),
                   text=dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, attention_bias=True,
                             mlp_bias=True,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64}),
                   top=dict(vision_feature_layer=[-3, -2], vision_feature_select_strategy="default",
                            tie_word_embeddings=False)),
    # dynamic NTK rope with a short max_position_embeddings, so sequences run past it
    "dynamic": dict(vision=dict(image_size=28, patch_size=14, num_hidden_layers=2),
                    text=dict(num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=12,
                              rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
                    top=dict(vision_feature_layer=-2, vision_feature_select_strategy="default",
                             tie_word_embeddings=False)),
}

VOCAB = 96
IMAGE_TOKEN = 95


def hf_config(case: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    spec = CASES[case]
    v = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, projection_dim=16, initializer_factor=1.0)
    v.update(spec["vision"])
    t = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             max_position_embeddings=256, initializer_range=0.15, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
    t.update(spec["text"])
    top = dict(spec["top"])
    tie = top.pop("tie_word_embeddings")
    t["tie_word_embeddings"] = tie
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**v).to_dict(), text_config=LlamaConfig(**t).to_dict(),
                      image_token_id=IMAGE_TOKEN, tie_word_embeddings=tie, **top)
    return cfg


def build_hf_model(case: str, seed: int = 0):
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(hf_config(case), attn_implementation="eager")
    model.eval()
    return model


def save_hf(model, path: str, max_shard_size=None):
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kw)
    return path


def convert_cli(hf_dir: str, out: str, dtype: str = "float32", extra=()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(REPO, "scripts", "convert_checkpoint.py"), f"--hf_dir={hf_dir}",
           f"--out={out}", f"--dtype={dtype}", "--allow_no_tokenizer", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)


def num_image_tokens(case: str) -> int:
    cfg = hf_config(case)
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    return g * g + (1 if cfg.vision_feature_select_strategy == "full" else 0)


def batch_inputs(case: str, seed: int = 0, padding: str = "left"):
    """A batch of 3 rows with different prompt lengths (padded), one image each."""
    rng = np.random.RandomState(seed)
    cfg = hf_config(case)
    n = num_image_tokens(case)
    rows = []
    for pre, post in ((3, 5), (2, 2), (4, 7)):
        body = [1] + list(rng.randint(5, VOCAB - 2, size=pre - 1)) + [IMAGE_TOKEN] * n + \
            list(rng.randint(5, VOCAB - 2, size=post))
        rows.append(body)
    t = max(map(len, rows))
    ids = np.zeros((3, t), np.int64)
    mask = np.zeros((3, t), np.int64)
    for i, r in enumerate(rows):
        if padding == "left":
            ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
        else:
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
    s = cfg.vision_config.image_size
    pixels = rng.randn(3, 3, s, s).astype(np.float32)
    return ids, mask, pixels


def positions(mask):
    """transformers generate's position ids: cumsum of the mask minus one, 0 at padding."""
    p = np.cumsum(mask, -1) - 1
    return np.where(mask > 0, p, 0)
