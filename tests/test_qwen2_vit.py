"""The Qwen2-VL / Qwen2.5-VL vision towers (jaxflow.models.qwen2_vit) against tiny random transformers models."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import traversals

from jaxflow.models.config import ConfigError
from jaxflow.models.qwen2_vit import (
    HF_TRANSFORMS, Qwen2VisionConfig, Qwen2VisionModel, hf_source, vision_config_from_hf, vision_layout,
)

TOL = 1e-5
# text side: tiny, mrope_section sums to head_dim / 2 = 8
TEXT = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                    "rope_theta": 10000.0})
# 2-VL: width 32 (head_dim 16), mlp_ratio 2, merger out 64 = the decoder width; patch 4 -> patch_dim 96
VISION_2 = dict(depth=3, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4)
# 2.5-VL: width 64 (head_dim 16); window_size 16 px = 16 // 2 // 4 = 2 merge units = 4 x 4 patches;
# blocks 1 and 3 full, 0 and 2 windowed
VISION_25 = dict(depth=4, hidden_size=64, intermediate_size=80, out_hidden_size=64, num_heads=4, patch_size=4,
                 window_size=16, fullatt_block_indexes=[1, 3])


def _hf_model(version: str):
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    if version == "qwen2_vl":
        cfg = Qwen2VLConfig(vision_config=VISION_2, text_config=TEXT)
        cls = Qwen2VLForConditionalGeneration
    else:
        cfg = Qwen2_5_VLConfig(vision_config=VISION_25, text_config=TEXT)
        cls = Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # widen the init so that every vision parameter matters: norms 1 +- 0.3, biases
        for name, p in model.named_parameters():  # 0.3, matrices of gain 1 (features of order one, so that
            if ".visual." not in f".{name}":  # float32 rounding stays well under 1e-5 in absolute terms)
                continue
            if name.endswith("weight") and ("norm" in name or "ln_q" in name):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape))
            elif p.ndim == 1:
                p.copy_(0.3 * torch.randn(p.shape))
            else:  # Linear (out, in) / Conv3d (out, C, T, p, p): fan-in is everything after dim 0
                p.copy_(torch.randn(p.shape) / p[0].numel() ** 0.5)
    return model


def _ours(hf):
    """Our tower with the weights of `hf`, copied through hf_source / HF_TRANSFORMS; also the keys used."""
    cfg = vision_config_from_hf(hf.config.vision_config.to_dict())
    model = nnx.eval_shape(lambda: Qwen2VisionModel(cfg, rngs=nnx.Rngs(0)))
    # in memory the keys are "model.visual.*"; on disk (what hf_source names) "visual.*"
    sd = {k[len("model."):]: v.detach().numpy() for k, v in hf.state_dict().items() if k.startswith("model.visual.")}
    state = nnx.state(model, nnx.Param)
    new, used = {}, []
    for path, old in traversals.flatten_mapping(nnx.to_pure_dict(state)).items():
        keys, transform, stacked = hf_source(("visual",) + tuple(path), cfg)
        arrs = [HF_TRANSFORMS[transform](sd[k]) for k in keys]
        arr = np.stack(arrs) if stacked else arrs[0]
        assert arr.shape == old.shape, (path, arr.shape, old.shape)
        new[path] = jnp.asarray(arr)
        used += keys
    nnx.replace_by_pure_dict(state, traversals.unflatten_mapping(new))
    nnx.update(model, state)
    return cfg, model, used, set(sd)


@pytest.fixture(scope="module")
def pair():
    cache = {}

    def get(version):
        if version not in cache:
            hf = _hf_model(version)
            cache[version] = (hf,) + _ours(hf)
        return cache[version]

    return get


def _pixels(grids, cfg, seed=0):
    n = int(np.prod(np.asarray(grids), axis=1).sum())
    return np.random.default_rng(seed).standard_normal((n, cfg.patch_dim)).astype(np.float32)


def _hf_features(hf, px, grids):
    import torch

    with torch.no_grad():
        out = hf.model.get_image_features(torch.from_numpy(px), torch.tensor(grids))
    return torch.cat(out.pooler_output, dim=0).numpy()  # what the model scatters into the image tokens


_JITTED = {}


def _features(model, px, grids, impl="fused", arrays=None):
    """Through one jitted program per (model, impl): the layout (or `arrays`, to tamper with) enters as arrays."""
    key = (id(model), impl)
    if key not in _JITTED:
        graphdef, state = nnx.split(model)
        # the entry holds the model: its id stays its own while cached
        _JITTED[key] = jax.jit(lambda st, x, la: nnx.merge(graphdef, st)(x, la, impl=impl)), state, model
    fn, state, _ = _JITTED[key]
    la = vision_layout(grids, model.cfg).arrays() if arrays is None else arrays
    return np.asarray(fn(state, jnp.asarray(px), la).astype(jnp.float32))


VERSIONS = ("qwen2_vl", "qwen2_5_vl")


def test_every_checkpoint_key_is_used_once(pair):
    for version in VERSIONS:
        _, _, _, used, keys = pair(version)
        assert sorted(used) == sorted(keys)


def test_config_from_hf(pair):
    hf, cfg, *_ = pair("qwen2_vl")
    assert (cfg.hidden_size, cfg.out_hidden_size, cfg.intermediate_size, cfg.head_dim) == (32, 64, 64, 16)
    assert (cfg.patch_dim, cfg.merge_unit, cfg.full_attention) == (96, 4, (True, True, True))
    assert vision_config_from_hf(cfg.to_hf_dict()) == cfg
    hf, cfg, *_ = pair("qwen2_5_vl")
    assert (cfg.hidden_size, cfg.out_hidden_size, cfg.intermediate_size, cfg.window_units) == (64, 64, 80, 2)
    assert cfg.full_attention == (False, True, False, True)
    assert vision_config_from_hf(cfg.to_hf_dict()) == cfg
    # hub configs: no model_type (the parent's tells), legacy keys
    hub = {"depth": 2, "embed_dim": 32, "mlp_ratio": 4, "num_heads": 2, "in_chans": 3, "hidden_size": 48,
           "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2}
    c = vision_config_from_hf(hub, version="qwen2_vl")
    assert (c.hidden_size, c.intermediate_size, c.out_hidden_size, c.rope_theta) == (32, 128, 48, 10000.0)
    assert vision_config_from_hf({**hub, "model_type": "qwen2_vl"}) == c  # old checkpoints' vision model_type


@pytest.mark.parametrize("d,version,match", [
    ({"model_type": "siglip_vision_model"}, None, "model_type"),
    ({"depth": 2}, None, "no model_type"),
    ({"model_type": "qwen2_vl_vision"}, "qwen2_5_vl", "contradicts"),
    ({"model_type": "qwen2_vl_vision", "depth": "x"}, None, "not a valid"),
    ({"model_type": "qwen2_vl_vision", "embed_dim": 24, "num_heads": 4}, None, "multiple of 4"),
    ({"model_type": "qwen2_vl_vision", "hidden_act": "swish9"}, None, "unknown activation"),
    ({"model_type": "qwen2_vl_vision", "patch_size": [14, 14]}, None, "one int"),
    ({"model_type": "qwen2_5_vl_vision", "window_size": 20}, None, "window_size"),
    ({"model_type": "qwen2_5_vl_vision", "depth": 4}, None, "fullatt_block_indexes"),  # default (7, 15, 23, 31)
    ({"model_type": "qwen2_5_vl_vision", "depth": 8, "rope_parameters": {"rope_type": "linear", "factor": 2.0}},
     None, "rope_type"),
])
def test_config_errors(d, version, match):
    with pytest.raises(ConfigError, match=match):
        vision_config_from_hf(d, version=version)


@pytest.mark.parametrize("grids", [[[1, 8, 12], [1, 6, 4]], [[1, 10, 14]], [[2, 4, 6], [1, 2, 2], [1, 12, 8]]])
def test_layout_matches_transformers_helpers(pair, grids):
    import torch
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    _, cfg, *_ = pair("qwen2_5_vl")
    lay = vision_layout(grids, cfg)
    g = torch.tensor(grids)
    np.testing.assert_array_equal(lay.position_ids, get_vision_position_ids(g, cfg.spatial_merge_size).numpy())
    cu = get_vision_cu_seqlens(g).numpy()  # one segment per frame
    np.testing.assert_array_equal(lay.segment_ids, np.repeat(np.arange(len(cu) - 1), np.diff(cu)))
    index, cu_win = get_vision_window_index(g, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
    np.testing.assert_array_equal(lay.window_index, index.numpy())
    np.testing.assert_array_equal(lay.window_index[lay.window_inverse], np.arange(lay.window_index.size))
    cu_win = cu_win.numpy()
    np.testing.assert_array_equal(lay.window_segment_ids, np.repeat(np.arange(len(cu_win) - 1), np.diff(cu_win)))
    np.testing.assert_array_equal(lay.tokens_per_image, np.prod(grids, axis=1) // 4)


def test_layout_window_facts():
    cfg = Qwen2VisionConfig(version="qwen2_5_vl", depth=2, hidden_size=32, num_heads=2, window_size=16,
                            patch_size=4, fullatt_block_indexes=(1,))
    lay = vision_layout([[1, 6, 10]], cfg)  # 3 x 5 merge units, windows of 2 x 2 units
    # windows row-major: sizes 4, 4, 2 / 2, 2, 1 units, the bottom and right ones partial
    assert np.bincount(lay.window_segment_ids).tolist() == [16, 16, 8, 8, 8, 4]
    assert lay.window_index[:4].tolist() == [0, 1, 5, 6]  # the first window: units (0,0) (0,1) (1,0) (1,1)
    assert lay.position_ids[:4].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]  # a merge unit's 2 x 2 patches
    assert lay.num_patches == 60 and lay.num_tokens == 15
    plain = vision_layout([[1, 6, 10]], Qwen2VisionConfig(depth=2, hidden_size=32, num_heads=2, patch_size=4))
    assert plain.window_index is None and set(plain.arrays()) == {"position_ids", "segment_ids"}


@pytest.mark.parametrize("grids", [[[1, 7, 4]], [[1, 4, 3]], [[0, 4, 4]], [[1, 4]], [[1.0, 4.0, 4.0]], []])
def test_layout_rejects_bad_grids(grids):
    with pytest.raises(ValueError):
        vision_layout(grids, Qwen2VisionConfig())


CASES = [
    ("one image", [[1, 8, 12]]),
    ("two images", [[1, 8, 12], [1, 6, 4]]),
    ("partial windows", [[1, 10, 14], [1, 2, 6]]),  # 5 x 7 merge units: windows of 2 x 2, edges partial
    ("two frames", [[2, 6, 8]]),  # one segment per frame, as transformers
]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name,grids", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_features_match_transformers(pair, version, name, grids, impl):
    hf, cfg, model, _, _ = pair(version)
    px = _pixels(grids, cfg)
    ref = _hf_features(hf, px, grids)
    got = _features(model, px, grids, impl)
    assert got.shape == ref.shape == (int(np.prod(grids, axis=1).sum()) // 4, cfg.out_hidden_size)
    assert np.abs(ref).max() > 1.0  # the widened init gives features of order one
    assert np.abs(got - ref).max() <= TOL


@pytest.mark.parametrize("version", VERSIONS)
def test_no_leakage_between_packed_images(pair, version):
    _, cfg, model, _, _ = pair(version)
    a, b = [1, 8, 12], [1, 6, 4]
    pa, pb = _pixels([a], cfg, seed=1), _pixels([b], cfg, seed=2)
    alone = _features(model, pa, [a])
    packed = _features(model, np.concatenate([pa, pb]), [a, b])
    packed_first = _features(model, np.concatenate([pb, pa]), [b, a])
    n = alone.shape[0]
    assert np.abs(packed[:n] - alone).max() <= TOL
    assert np.abs(packed_first[-n:] - alone).max() <= TOL
    # the mask is what keeps them apart: one segment for both would mix them
    lay = vision_layout([a, b], cfg).arrays()
    lay["segment_ids"] = jnp.zeros_like(lay["segment_ids"])
    if cfg.windowed:
        lay["window_segment_ids"] = jnp.zeros_like(lay["window_segment_ids"])
    mixed = _features(model, np.concatenate([pa, pb]), [a, b], arrays=lay)
    assert np.abs(mixed[:n] - alone).max() > 1e-2


def test_one_program_serves_grids_of_equal_size(pair):
    hf, cfg, model, _, _ = pair("qwen2_5_vl")
    traces = []
    graphdef, state = nnx.split(model)

    @jax.jit
    def fn(st, x, la):
        traces.append(1)
        return nnx.merge(graphdef, st)(x, la)

    for grids in ([[1, 8, 12]], [[1, 4, 12], [1, 12, 4]], [[1, 2, 48]]):  # 96 patches each
        px = _pixels(grids, cfg, seed=3)
        got = np.asarray(fn(state, jnp.asarray(px), vision_layout(grids, cfg).arrays()))
        assert np.abs(got - _hf_features(hf, px, grids)).max() <= TOL
    assert len(traces) == 1


def test_pixel_shape_checked(pair):
    _, cfg, model, _, _ = pair("qwen2_vl")
    with pytest.raises(ValueError, match="pixel_values"):
        model(jnp.zeros((95, cfg.patch_dim)), vision_layout([[1, 8, 12]], cfg).arrays())
    _, cfg25, model25, _, _ = pair("qwen2_5_vl")
    with pytest.raises(ValueError, match="window_index"):  # a 2-VL layout handed to the 2.5-VL tower
        model25(jnp.zeros((96, cfg25.patch_dim)), vision_layout([[1, 8, 12]], cfg).arrays())


def test_hf_source_keys(pair):
    _, cfg, *_ = pair("qwen2_5_vl")
    assert hf_source(("visual", "patch_embed", "proj", "kernel"), cfg) == (("visual.patch_embed.proj.weight",),
                                                                         "conv", False)
    assert hf_source(("visual", "merger", "mlp", 2, "bias"), cfg) == (("visual.merger.mlp.2.bias",), "ident", False)
    keys, transform, stacked = hf_source(("visual", "blocks", "norm1", "scale"), cfg)
    assert keys == tuple(f"visual.blocks.{i}.norm1.weight" for i in range(4)) and stacked
    with pytest.raises(ValueError):
        hf_source(("vision_tower", "x", "kernel"), cfg)


@pytest.mark.parametrize("version", VERSIONS)
def test_layout_facts_matter(pair, version):
    """The comparisons above would catch a wrong rotary axis order or ignored windows: each changes the features."""
    _, cfg, model, _, _ = pair(version)
    grids = [[1, 10, 14]]
    px = _pixels(grids, cfg, seed=4)
    la = vision_layout(grids, cfg).arrays()
    good = _features(model, px, grids)
    swapped = _features(model, px, grids, arrays={**la, "position_ids": la["position_ids"][:, ::-1]})
    assert np.abs(swapped - good).max() > 1e-2
    if cfg.windowed:
        no_windows = {**la, "window_segment_ids": jnp.zeros_like(la["window_segment_ids"])}
        assert np.abs(_features(model, px, grids, arrays=no_windows) - good).max() > 1e-2


@pytest.mark.parametrize("version", VERSIONS)
def test_bfloat16_runs_close(pair, version):
    _, cfg, model, _, _ = pair(version)
    grids = [[1, 8, 12], [1, 6, 4]]
    px = _pixels(grids, cfg, seed=5)
    want = _features(model, px, grids)
    graphdef, state = nnx.split(model)
    half = nnx.merge(graphdef, jax.tree.map(lambda a: a.astype(jnp.bfloat16), state))
    got = _features(half, px, grids)
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()
