"""Qwen-VL (v1) against the official remote code, through golden files made with it
(tests/golden/qwen_vl, `make_golden.py`): the tiny official-layout checkpoint converted by our
converter, logits with and without dynamic NTK + logn attention, greedy generation (also across
seq_length, where the official cache keeps the prompt's NTK alpha), image features at three image
sizes (bicubic shrink, upsample, none), the truncation sweep against the official model with image keys
masked, attention knockout against the official model with (query, key) pairs masked, LLaVA-CAM against torch autograd and attention probabilities against `output_attentions`.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import jaxflow
import qwen_vl_reference as QR
from jaxflow.convert.hf import ConversionError

TOL = 1e-4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen-vl") / "jf"
    jaxflow.convert_checkpoint(QR.model_dir(), str(out), "float32", progress=False, allow_no_tokenizer=True)
    return jaxflow.load(str(out))


@pytest.fixture(scope="module")
def g():
    return QR.golden()


def _real(mask):
    return np.asarray(mask) > 0


def test_config_and_family(model):
    cfg = model.config
    assert model.family == "qwen_vl" and cfg.seq_length == QR.SEQ_LENGTH
    assert (cfg.image_start_id, cfg.image_end_id, cfg.image_token_id) == (QR.IMG_START, QR.IMG_END, QR.IMG_PAD)
    assert cfg.use_dynamic_ntk and cfg.use_logn_attn


def test_logits_match_official_without_ntk(model, g):
    ids, mask = g["short_ids"], g["short_mask"]
    assert ids.shape[1] <= QR.SEQ_LENGTH and (mask == 0).any()  # padded, alpha 1, no logn
    got = np.asarray(jaxflow.forward(model, ids, g["short_pixels"], mask).logits)
    want = g["short_logits"]
    real = _real(mask)
    assert np.abs(got - want)[real].max() <= TOL
    assert np.abs(want[real]).max() > 1.0  # a real comparison


def test_logits_match_official_with_dynamic_ntk_and_logn(model, g):
    from jaxflow.models.qwen_vl import ntk_alpha

    ids, mask, pos = g["long_ids"], g["long_mask"], g["long_pos"]
    assert ids.shape[1] > QR.SEQ_LENGTH and ntk_alpha(ids.shape[1], QR.SEQ_LENGTH) == 3
    ok = pos >= 0  # (2, P): the shorter row's list is padded with -1
    got = np.asarray(jaxflow.forward(model, ids, g["long_pixels"], mask).logits)
    picked = got[np.arange(2)[:, None], np.maximum(pos, 0)]  # (2, P, V)
    assert np.abs(picked - g["long_logits"])[ok].max() <= TOL
    # the reference path (explicit softmax) agrees too
    ref = np.asarray(jaxflow.forward(model, ids, g["long_pixels"], mask, attn_impl="reference").logits)
    assert np.abs(ref[np.arange(2)[:, None], np.maximum(pos, 0)] - g["long_logits"])[ok].max() <= TOL


def test_ntk_and_logn_change_the_logits(model, g):
    """Without the official scaling the long batch would differ: the test above can fail."""
    import dataclasses

    ids, mask, pos = g["long_ids"], g["long_mask"], g["long_pos"]
    plain_cfg = dataclasses.replace(model.config, use_dynamic_ntk=False, use_logn_attn=False)
    object.__setattr__(model, "config", plain_cfg)
    try:
        got = np.asarray(jaxflow.forward(model, ids, g["long_pixels"], mask).logits)
    finally:
        object.__setattr__(model, "config", dataclasses.replace(plain_cfg, use_dynamic_ntk=True, use_logn_attn=True))
    ok = pos >= 0
    assert np.abs(got[np.arange(2)[:, None], np.maximum(pos, 0)] - g["long_logits"])[ok].max() > 1e-2


def test_greedy_generation_is_token_identical(model, g):
    ids, mask = g["short_ids"], g["short_mask"]
    out = jaxflow.generate(model, ids, g["short_pixels"], mask, max_new_tokens=10, eos_token_id=-1, pad_token_id=0)
    np.testing.assert_array_equal(out.tokens, g["gen_tokens"])
    # step logits: the prompt plus the generated tokens in one forward (alpha 1 throughout)
    full = np.concatenate([ids, g["gen_tokens"][:, :-1]], axis=1)
    fmask = np.concatenate([mask, np.ones((2, 9), mask.dtype)], axis=1)
    lg = np.asarray(jaxflow.forward(model, full, g["short_pixels"], fmask).logits)[:, ids.shape[1] - 1:]
    assert np.abs(lg - g["gen_step_logits"]).max() <= TOL


def test_generation_across_seq_length_keeps_the_prompts_ntk_alpha(model, g):
    ids, mask = g["genb_ids"], g["genb_mask"]
    t = ids.shape[1]
    assert t <= QR.SEQ_LENGTH < t + 10  # decoding crosses seq_length: logn turns on, alpha stays 1
    out = jaxflow.generate(model, ids, g["genb_pixels"], mask, max_new_tokens=10, eos_token_id=-1, pad_token_id=0)
    np.testing.assert_array_equal(out.tokens, g["genb_tokens"])


@pytest.mark.parametrize("size", [56, 224, 448])
def test_image_features_at_every_size(size, g):
    """56 px shrinks the 16x16 positional tables to 4x4, 448 px enlarges them to 32x32, 224 px keeps them."""
    from safetensors.numpy import load_file

    key = {56: "feat", 224: "feat224", 448: "feat448"}[size]
    pix = g["short_pixels"] if size == 56 else g[f"{key}_pixels"]
    with open(os.path.join(QR.model_dir(), "config.json")) as f:
        cfg = json.load(f)
    cfg["visual"] = {**cfg["visual"], "image_size": size}
    m = jaxflow.from_state_dict(cfg, load_file(os.path.join(QR.model_dir(), "model.safetensors")))
    got = np.asarray(m.image_features(pix))
    assert got.shape == g[key].shape
    assert np.abs(got - g[key]).max() <= TOL * max(1.0, np.abs(g[key]).max())


def test_bicubic_matrix_is_torchs_interpolation():
    torch = pytest.importorskip("torch")
    from jaxflow.models.qwen_vl import bicubic_matrix

    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    for n in (4, 7, 16, 32, 45):
        want = torch.nn.functional.interpolate(x, size=(n, n), mode="bicubic", align_corners=False).numpy()
        r = bicubic_matrix(16, n).astype(np.float64)
        got = np.einsum("ai,cij,bj->cab", r, x[0].numpy(), r)
        assert np.abs(got - want[0]).max() < 1e-6, n


def test_sweep_equals_official_model_with_image_keys_masked(model, g):
    ids, mask, pix = g["short_ids"], g["short_mask"], g["short_pixels"]
    sweep = jaxflow.truncation_sweep(model, ids, pix, mask)
    L = model.config.text.num_layers
    np.testing.assert_array_equal(sweep.layers, np.arange(L + 1))
    pos = g["trunc_pos"]
    for b in range(2):
        n = int((pos[b] >= 0).sum())  # -1 pads the shorter row's list
        slots = [int(np.flatnonzero(sweep.positions[b] == p)[0]) for p in pos[b, :n]]
        for k in range(L + 1):
            assert np.abs(sweep.logits[k, b, slots] - g["trunc_logits"][k, b, :n]).max() <= TOL, (b, k)
    assert np.abs(g["trunc_logits"][0] - g["trunc_logits"][L]).max() > 1e-2


def test_knockout_equals_official_model_with_query_key_pairs_masked(model, g):
    """jaxflow.knockout against the official forward with finfo.min added to the additive mask at
    every (query, key) pair in layer 0 (half the image keys and a text key, queries from </img> on)."""
    ids, mask, pix = g["short_ids"], g["short_mask"], g["short_pixels"]
    out = jaxflow.knockout(model, ids, pix, mask, g["ko_queries"] > 0, g["ko_keys"] > 0, g["ko_layers"] > 0)
    logits = np.asarray(out.logits)
    pos = g["trunc_pos"]
    for b in range(2):
        n = int((pos[b] >= 0).sum())
        assert np.abs(logits[b, pos[b, :n]] - g["ko_logits"][b, :n]).max() <= TOL, b
    assert np.abs(g["ko_logits"] - g["trunc_logits"][-1]).max() > 0.05  # the knockout changes the answer


def test_cam_matches_torch_autograd(model, g):
    import jaxflow.analysis.cam as C

    ids, mask, amask, pix = g["short_ids"], g["short_mask"], g["cam_answer_mask"], g["short_pixels"]
    gr, h = C.cam_site(model, ids, pix, amask, attention_mask=mask)  # (B, L, N, D)
    assert np.abs(gr.sum(axis=2) - g["cam_grad_sum"]).max() <= TOL * np.abs(g["cam_grad_sum"]).max()
    r = C.llava_cams(model, ids, pix, amask, C.METHODS, attention_mask=mask)
    for method in C.METHODS:
        want = g[f"cam_{method}"]  # (B, L, 256) raw maps from torch autograd
        got = np.asarray(r.raw[method]).reshape(want.shape)
        assert r.maps[method].shape[-2:] == (16, 16)
        assert np.abs(got - want).max() <= TOL * max(np.abs(want).max(), 1e-12), method
    assert np.abs(g["cam_paper"][:, 0]).max() > 0


def test_attention_probabilities_match_output_attentions(model, g):
    ids, mask, pix = g["short_ids"], g["short_mask"], g["short_pixels"]
    from jaxflow.forward import forward_core

    last = np.full((2, 1), ids.shape[1] - 1)
    images = model.image_inputs(ids, mask, pix)
    out = forward_core(model, ids, images, mask, impl="reference", attn_rows=last)
    got = np.asarray(out.attn_rows)[:, :, :, 0]  # (L, B, H, S)
    real = _real(mask)[None, :, None]
    assert np.abs(np.where(real, got - g["attn_last"], 0)).max() <= 1e-5


# --------------------------------------------------------------------------- the converter on the official layout


def test_sharded_official_layout_converts_to_the_same_weights(model, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = load_file(os.path.join(QR.model_dir(), "model.safetensors"))
    keys = sorted(src)
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(os.path.join(QR.model_dir(), "config.json"), d / "config.json")
    half = len(keys) // 2
    wm = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: src[k] for k in part}, str(d / name))
        wm.update({k: name for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    jaxflow.convert_checkpoint(str(d), str(tmp_path / "jf"), "float32", progress=False, allow_no_tokenizer=True)
    m2 = jaxflow.load(str(tmp_path / "jf"))
    a = jaxflow.convert.checkpoint.model_params(model)
    b = jaxflow.convert.checkpoint.model_params(m2)
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_converter_is_strict(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = load_file(os.path.join(QR.model_dir(), "model.safetensors"))
    d = tmp_path / "bad"
    d.mkdir()
    shutil.copy(os.path.join(QR.model_dir(), "config.json"), d / "config.json")
    src.pop("transformer.h.1.attn.c_attn.bias")
    src["transformer.extra.weight"] = np.zeros(3, np.float32)
    save_file(src, str(d / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"missing tensor\(s\): transformer.h.1.attn.c_attn.bias.*unused"):
        jaxflow.convert_checkpoint(str(d), str(tmp_path / "out"), progress=False, allow_no_tokenizer=True)
    assert not (tmp_path / "out").exists()


def test_text_only_qwen_config_is_refused_in_one_line():
    from jaxflow.models.config import ConfigError
    from jaxflow.models.family import config_from_hf_dict

    with open(os.path.join(QR.model_dir(), "config.json")) as f:
        cfg = json.load(f)
    with pytest.raises(ConfigError, match="no 'visual' section"):
        config_from_hf_dict({k: v for k, v in cfg.items() if k != "visual"})
    with pytest.raises(ConfigError, match="rotary_pct"):
        config_from_hf_dict({**cfg, "rotary_pct": 0.5})


def test_a_directory_without_tokenizer_is_refused_unless_allowed(tmp_path):
    with pytest.raises(ConversionError, match="holds no tokenizer.*--allow_no_tokenizer"):
        jaxflow.convert_checkpoint(QR.model_dir(), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
