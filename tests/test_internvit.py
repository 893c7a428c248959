"""InternVL's vision side (jaxflow.models.internvit) against tiny random transformers InternVL models."""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import traversals

from jaxflow.models.internvit import (
    HF_TRANSFORMS, InternVisionConfig, InternVisionModel, InternVLProjector, hf_source, internvl_image_features,
    pixel_shuffle, vision_config_from_hf,
)

# (a): layer_norm, no qk norm, qkv bias, final layernorm (use_mean_pooling False), feature layer -1
# (b): rms_norm, qk norm, no qkv bias, no final layernorm, feature layer -2, 3 layers
CASES = {
    "a": dict(vision=dict(norm_type="layer_norm", use_qk_norm=False, attention_bias=True, num_hidden_layers=2,
                          use_mean_pooling=False),
              top=dict(vision_feature_layer=-1, downsample_ratio=0.5, projector_hidden_act="gelu")),
    "b": dict(vision=dict(norm_type="rms_norm", use_qk_norm=True, attention_bias=False, num_hidden_layers=3,
                          use_mean_pooling=True, layer_norm_eps=1e-5),
              top=dict(vision_feature_layer=-2, downsample_ratio=0.5, projector_hidden_act="gelu")),
}


def _hf_model(case: str):
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    spec = CASES[case]
    v = InternVLVisionConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, image_size=56,
                             patch_size=14, **spec["vision"])
    t = Qwen2Config(vocab_size=64, hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1)
    cfg = InternVLConfig(vision_config=v.to_dict(), text_config=t.to_dict(), vision_feature_select_strategy="default",
                         **spec["top"])
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # widen the init so that every parameter (norms, layer scale too) matters
        for name, p in model.named_parameters():
            if "language_model" in name or "lm_head" in name:
                continue
            noise = 0.2 * torch.randn(p.shape)
            p.copy_(1.0 + noise if name.endswith(("norm.weight", "layernorm_before.weight",
                                                  "layernorm_after.weight", "layernorm.weight")) else noise)
    return model


def _ours(hf):
    """Our vision tower + projector with the weights of `hf`, copied through hf_source / HF_TRANSFORMS."""
    cfg = vision_config_from_hf(hf.config.vision_config.to_dict())
    top = hf.config
    # abstract modules (no eager init: seconds saved), every parameter then filled from the checkpoint
    vision = nnx.eval_shape(lambda: InternVisionModel(cfg, rngs=nnx.Rngs(0)))
    projector = nnx.eval_shape(lambda: InternVLProjector(
        cfg.hidden_size, top.text_config.hidden_size, downsample_ratio=top.downsample_ratio,
        hidden_act=top.projector_hidden_act, rngs=nnx.Rngs(1)))
    sd = {k[len("model."):]: v.detach().numpy() for k, v in hf.state_dict().items() if k.startswith("model.")}
    used = []
    for root, module in (("vision_tower", vision), ("multi_modal_projector", projector)):
        state = nnx.state(module, nnx.Param)
        flat = traversals.flatten_mapping(nnx.to_pure_dict(state))
        new = {}
        for path, old in flat.items():
            keys, transform, stacked = hf_source((root,) + tuple(path), cfg)
            arrs = [HF_TRANSFORMS[transform](sd[k]) for k in keys]
            arr = np.stack(arrs) if stacked else arrs[0]
            assert arr.shape == old.shape, (path, arr.shape, old.shape)
            new[path] = jnp.asarray(arr)
            used += keys
        nnx.replace_by_pure_dict(state, traversals.unflatten_mapping(new))
        nnx.update(module, state)
    return cfg, vision, projector, used


@pytest.fixture(scope="module")
def pair():
    cache = {}

    def get(case):
        if case not in cache:
            hf = _hf_model(case)
            cache[case] = (hf,) + _ours(hf)
        return cache[case]

    return get


def _pixels(seed=0):
    return np.random.default_rng(seed).standard_normal((3, 3, 56, 56)).astype(np.float32)


def _features(vision, projector, px, **kw):
    return np.asarray(internvl_image_features(vision, projector, jnp.asarray(px), **kw))


def _hf_features(hf, px, **kw):
    import torch

    with torch.no_grad():
        out = hf.model.get_image_features(pixel_values=torch.from_numpy(px), **kw)
    return out.pooler_output.numpy()  # (N_tiles, tokens, D_text): the projected features


@pytest.mark.parametrize("case,layer", [("a", -1), ("a", 2), ("a", 0), ("b", -2), ("b", -1)])
def test_image_features_match_transformers(pair, case, layer):
    hf, cfg, vision, projector, _ = pair(case)
    px = _pixels()
    # transformers 5.24 drops hidden state 0 unless asked: select_hidden_states reads index 0 as "no"
    extra = dict(output_hidden_states=True) if layer == 0 else {}
    ref = _hf_features(hf, px, vision_feature_layer=layer, vision_feature_select_strategy="default", **extra)
    got = _features(vision, projector, px, vision_feature_layer=layer, select_strategy="default",
                    downsample_ratio=hf.config.downsample_ratio)
    assert got.shape == ref.shape == (3, 4, 24)
    assert np.abs(got - ref).max() <= 1e-5
    if case == "a" and layer == 2:  # hidden_states[2] has no final layernorm: -1 (last_hidden_state) differs
        last = _hf_features(hf, px, vision_feature_layer=-1, vision_feature_select_strategy="default")
        assert np.abs(got - last).max() > 1e-2


def test_hidden_states_match_transformers(pair):
    import torch

    hf, cfg, vision, _, _ = pair("b")
    px = _pixels(1)
    with torch.no_grad():
        ref = hf.model.vision_tower(pixel_values=torch.from_numpy(px), output_hidden_states=True).hidden_states
    ours = np.asarray(vision(jnp.asarray(px)))
    assert ours.shape == (cfg.num_layers + 1, 3, 1 + cfg.num_patches, cfg.hidden_size)
    for i, r in enumerate(ref):  # raw states reach |x| ~ 10: float32 summation order shows at 1e-5 relative
        r = r.numpy()
        assert np.abs(ours[i] - r).max() <= 1e-5 * max(1.0, np.abs(r).max()), i
    assert vision(jnp.asarray(px), num_layers=1).shape[0] == 2


def test_fused_and_reference_agree(pair):
    hf, cfg, vision, projector, _ = pair("b")
    px = _pixels(2)
    kw = dict(vision_feature_layer=-2, select_strategy="default", downsample_ratio=0.5)
    f = _features(vision, projector, px, impl="fused", **kw)
    r = _features(vision, projector, px, impl="reference", **kw)
    assert np.abs(f - r).max() <= 1e-5
    ref = _hf_features(hf, px, vision_feature_layer=-2, vision_feature_select_strategy="default")
    assert np.abs(r - ref).max() <= 1e-5


@pytest.mark.parametrize("shape,scale", [((2, 4, 6, 8), 0.5), ((2, 4, 4, 8), 0.5), ((1, 8, 4, 16), 0.25)])
def test_pixel_shuffle_matches_transformers(shape, scale):
    import torch
    from transformers.models.internvl.modeling_internvl import InternVLModel

    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    ref = InternVLModel.pixel_shuffle(None, torch.from_numpy(x), scale_factor=scale).numpy()
    got = np.asarray(pixel_shuffle(jnp.asarray(x), scale))
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    with pytest.raises(ValueError, match="scale_factor"):
        pixel_shuffle(jnp.zeros((1, 3, 3, 8)), 0.5)


@pytest.mark.parametrize("case", ["a", "b"])
def test_key_map_covers_saved_checkpoint_once(pair, case, tmp_path):
    from safetensors import safe_open

    hf, cfg, vision, projector, used = pair(case)
    hf.save_pretrained(str(tmp_path))
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "np") as f:
        saved = {k for k in f.keys() if k.startswith(("vision_tower.", "multi_modal_projector."))}
    assert sorted(used) == sorted(saved)  # every key exactly once, nothing else
    in_memory = {k[len("model."):] for k in hf.state_dict()
                 if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))}
    assert in_memory == saved


def test_hf_source_examples():
    cfg = InternVisionConfig(num_layers=2)
    assert hf_source(("vision_tower", "encoder", "layer", "attention", "q_proj", "kernel"), cfg) == (
        ("vision_tower.encoder.layer.0.attention.q_proj.weight",
         "vision_tower.encoder.layer.1.attention.q_proj.weight"),
        "transpose", True)
    assert hf_source(("vision_tower", "encoder", "layer", "lambda_1"), cfg)[1:] == ("ident", True)
    assert hf_source(("vision_tower", "embeddings", "patch_embeddings", "projection", "kernel"), cfg) == (
        ("vision_tower.embeddings.patch_embeddings.projection.weight",), "conv", False)
    assert hf_source(("multi_modal_projector", "layer_norm", "scale"), cfg) == (
        ("multi_modal_projector.layer_norm.weight",), "ident", False)
    with pytest.raises(ValueError):
        hf_source(("language_model", "x"), cfg)


def test_config_round_trip_and_errors(pair):
    from transformers import InternVLVisionConfig

    hf = pair("b")[0]
    cfg = vision_config_from_hf(hf.config.vision_config.to_dict())
    assert (cfg.norm_type, cfg.use_qk_norm, cfg.attention_bias, cfg.num_layers, cfg.grid, cfg.num_patches) == (
        "rms_norm", True, False, 3, 4, 16)
    assert cfg.image_size == 56 and cfg.patch_size == 14 and cfg.layer_norm_eps == 1e-5
    assert vision_config_from_hf(cfg.to_hf_dict()) == cfg
    assert InternVLVisionConfig.from_dict(cfg.to_hf_dict()).image_size == [56, 56]
    assert InternVisionConfig(image_size=[56, 56], patch_size=(14, 14)).image_size == 56
    d = vision_config_from_hf({"model_type": "internvl_vision"})  # transformers' defaults (InternVL3-1B-hf)
    assert (d.hidden_size, d.num_layers, d.image_size, d.patch_size, d.use_mean_pooling) == (1024, 24, 448, 14, True)
    for bad, msg in [({"use_mask_token": True}, "use_mask_token"), ({"image_size": [448, 224]}, "square"),
                     ({"norm_type": "batch_norm"}, "norm_type"), ({"hidden_act": "nope"}, "activation"),
                     ({"hidden_size": "x"}, "not a valid")]:
        with pytest.raises(ValueError, match=msg) as err:
            vision_config_from_hf(bad)
        assert "\n" not in str(err.value)


def test_errors(pair):
    hf, cfg, vision, projector, _ = pair("a")
    with pytest.raises(ValueError, match="pixel_values must be"):
        vision(jnp.zeros((1, 3, 28, 28)))
    with pytest.raises(ValueError, match="outside"):
        internvl_image_features(vision, projector, jnp.zeros((1, 3, 56, 56)), vision_feature_layer=3,
                                select_strategy="default", downsample_ratio=0.5)
    with pytest.raises(ValueError, match="square"):  # 1 + 16 tokens with "full"
        internvl_image_features(vision, projector, jnp.zeros((1, 3, 56, 56)), vision_feature_layer=-1,
                                select_strategy="full", downsample_ratio=0.5)
