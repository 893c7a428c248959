"""Tiny random transformers Qwen2-VL and Qwen2.5-VL (eager attention, widened init) as the independent
references, saved sharded and converted with the CLI once per test process, and their inputs: a
left-padded batch of two images of different sizes, and a batch whose first row holds two images.

Qwen2.5-VL's vision tower has windows of 2 x 2 merged tokens (window_size 56 px at patch 14, merge 2)
and full attention in block 1 only, so both kinds of block occur and the larger images span several
windows, partial ones at the edges included."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

import numpy as np

import hf_reference as R

VOCAB = 128
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 124, 125, 122, 123
PATCH, MERGE, TEMPORAL = 14, 2, 2
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH
GRIDS = {"a": (1, 10, 6), "b": (1, 4, 4), "c": (1, 6, 8)}  # (t, h, w) patches: 15, 4 and 12 tokens
VERSIONS = ("qwen2_vl", "qwen2_5_vl")


def hf_config(version: str):
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1,
                eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    top = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END, tie_word_embeddings=False)
    if version == "qwen2_vl":
        from transformers import Qwen2VLConfig

        vision = dict(depth=3, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=PATCH,
                      spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, hidden_act="quick_gelu")
        return Qwen2VLConfig(text_config=text, vision_config=vision, **top)
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, window_size=56, fullatt_block_indexes=[1],
                  hidden_act="silu")
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **top)


def build_hf_model(version: str, seed: int = 0):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = Qwen2VLForConditionalGeneration if version == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls._from_config(hf_config(version), attn_implementation="eager").eval()
    with torch.no_grad():  # widen the init so that every parameter (norms, biases) matters
        for name, p in model.named_parameters():
            noise = 0.15 * torch.randn(p.shape)
            is_norm = name.endswith("weight") and any(k in name for k in ("norm", "ln_q"))
            p.copy_(1.0 + noise if is_norm else noise)
    return model


@functools.lru_cache(maxsize=2)
def pair(version: str):
    """(torch model, jaxflow model, hf dir) with identical weights: saved sharded, converted with the CLI."""
    import jaxflow

    tmp = tempfile.mkdtemp(prefix=f"jaxflow-{version}-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    hf = build_hf_model(version)
    R.save_hf(hf, f"{tmp}/hf", max_shard_size="200KB")
    res = R.convert_cli(f"{tmp}/hf", f"{tmp}/jf")
    assert res.returncode == 0, res.stderr[-3000:]
    return hf, jaxflow.load(f"{tmp}/jf"), f"{tmp}/hf"


def tokens(grid) -> int:
    t, h, w = grid
    return t * h * w // (MERGE * MERGE)


def pixels(grids, seed: int = 0) -> np.ndarray:
    """Random normalised patches (sum t*h*w, PATCH_DIM) float32 for these grids."""
    rng = np.random.RandomState(seed)
    return rng.randn(sum(int(np.prod(g)) for g in grids), PATCH_DIM).astype(np.float32)


def image_span(grid):
    return [VISION_START] + [IMAGE_TOKEN] * tokens(grid) + [VISION_END]


def batch_inputs(case: str = "two_rows", seed: int = 0, padding: str = "left", answer_lengths=None):
    """ids, mask (B, T) int64, pixel_values, image_grid_thw (n, 3) and answer_mask (B, T).

    case "two_rows": row 0 [text, image a, text], row 1 [text, image b, text].
    case "multi": row 0 [text, image a, text, image c, text], row 1 [text, image b, text]."""
    rng = np.random.RandomState(seed)
    text = lambda n: list(rng.randint(5, 120, size=n))  # noqa: E731
    if case == "two_rows":
        layout = [[("t", 3), ("i", "a"), ("t", 5)], [("t", 2), ("i", "b"), ("t", 3)]]
    elif case == "multi":
        layout = [[("t", 2), ("i", "a"), ("t", 3), ("i", "c"), ("t", 4)], [("t", 3), ("i", "b"), ("t", 2)]]
    else:
        raise ValueError(case)
    rows, grids, spans = [], [], []
    for i, parts in enumerate(layout):
        row = [1]
        for kind, v in parts:
            if kind == "t":
                row += text(v)
            else:
                row += image_span(GRIDS[v])
                grids.append(GRIDS[v])
        k = 0 if answer_lengths is None else answer_lengths[i]
        spans.append((len(row), k))
        rows.append(row + text(k))
    t = max(map(len, rows))
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    amask = np.zeros((len(rows), t), bool)
    for i, (r, (plen, k)) in enumerate(zip(rows, spans)):
        start = t - len(r) if padding == "left" else 0
        ids[i, start:start + len(r)], mask[i, start:start + len(r)] = r, 1
        amask[i, start + plen:start + plen + k] = True
    return ids, mask, pixels(grids, seed), np.asarray(grids, np.int64), amask


def torch_kwargs(ids, mask, pix, grid):
    """The keyword arguments transformers' Qwen2-VL forward / generate take for these inputs."""
    import torch

    return dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pix),
                image_grid_thw=torch.tensor(grid), mm_token_type_ids=torch.tensor((ids == IMAGE_TOKEN).astype(np.int64)))
