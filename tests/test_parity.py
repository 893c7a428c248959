"""Numerical parity with transformers (torch) on tiny random LLaVA models, converted with the CLI."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jaxflow  # noqa: E402
import hf_reference as R  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(R.CASES))
def pair(request, converted_pair):
    """(case, torch model, jaxflow model) with identical weights."""
    hf, jm = converted_pair(request.param)
    return request.param, hf, jm


def _reset_dynamic_rope(hf):
    """transformers' dynamic RoPE keeps the frequencies of the longest sequence it has seen and reuses
    them on later, shorter calls (until one is shorter than max_position_embeddings); jaxflow computes
    them from the call at hand. Reset the state so each reference call stands alone."""
    rot = hf.model.language_model.rotary_emb
    if "dynamic" in str(getattr(rot, "rope_type", "")):
        rot.inv_freq = rot.original_inv_freq.clone()
        rot.max_seq_len_cached = rot.original_max_seq_len


def _torch_forward(hf, ids, mask, pix):
    _reset_dynamic_rope(hf)
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(R.positions(mask))).logits.numpy()


@pytest.mark.parametrize("padding", ["left", "right"])
def test_logits_match_transformers(pair, padding):
    case, hf, jm = pair
    ids, mask, pix = R.batch_inputs(case, padding=padding)
    want = _torch_forward(hf, ids, mask, pix)
    got = np.asarray(jaxflow.forward(jm, ids, pix, mask).logits)
    real = mask.astype(bool)
    assert got.shape == want.shape
    err = np.abs(got - want)[real].max()
    assert err <= TOL, f"{case}/{padding}: max |logits diff| {err:.2e}"
    assert np.abs(want).max() > 0.5  # the comparison is not between near-zero outputs


def test_vision_features_match_transformers(pair):
    case, hf, jm = pair
    _, _, pix = R.batch_inputs(case)
    with torch.no_grad():
        want = hf.model.get_image_features(
            pixel_values=torch.tensor(pix), vision_feature_layer=hf.config.vision_feature_layer,
            vision_feature_select_strategy=hf.config.vision_feature_select_strategy).pooler_output
    want = torch.stack(list(want)).numpy()
    got = np.asarray(jaxflow.image_features(jm, pix))
    assert got.shape == want.shape == (3, R.num_image_tokens(case), 32)
    assert np.abs(got - want).max() <= TOL


def test_greedy_generation_matches_transformers(pair):
    case, hf, jm = pair
    ids, mask, pix = R.batch_inputs(case, seed=1, padding="left")
    _reset_dynamic_rope(hf)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix),
                          attention_mask=torch.tensor(mask), max_new_tokens=10, do_sample=False,
                          eos_token_id=hf.config.text_config.eos_token_id, pad_token_id=0)
    want = out[:, ids.shape[1]:].numpy()
    got = jaxflow.generate(jm, ids, pix, mask, max_new_tokens=10, pad_token_id=0)
    # transformers stops early only if every row hit EOS; compare what it produced
    assert (got.tokens[:, :want.shape[1]] == want).all(), f"{case}: {got.tokens.tolist()} vs {want.tolist()}"


def test_generation_right_padding_equals_left(pair):
    case, _, jm = pair
    ids_l, mask_l, pix = R.batch_inputs(case, seed=2, padding="left")
    ids_r, mask_r, _ = R.batch_inputs(case, seed=2, padding="right")
    a = jaxflow.generate(jm, ids_l, pix, mask_l, max_new_tokens=8)
    b = jaxflow.generate(jm, ids_r, pix, mask_r, max_new_tokens=8)
    assert (a.tokens == b.tokens).all()


def test_reference_and_fused_attention_agree(pair):
    case, _, jm = pair
    ids, mask, pix = R.batch_inputs(case, padding="left")
    fused = np.asarray(jaxflow.forward(jm, ids, pix, mask, attn_impl="fused").logits)
    ref = np.asarray(jaxflow.forward(jm, ids, pix, mask, attn_impl="reference").logits)
    real = mask.astype(bool)
    assert np.abs(fused - ref)[real].max() <= 1e-5
    f1 = np.asarray(jaxflow.image_features(jm, pix, attn_impl="fused"))
    f2 = np.asarray(jaxflow.image_features(jm, pix, attn_impl="reference"))
    assert np.abs(f1 - f2).max() <= 1e-5


def test_bfloat16_checkpoint_converts_without_torch(tmp_path):
    """A bf16 safetensors file converts in a process where importing torch fails, bit-exact."""
    import subprocess
    import sys

    hf = R.build_hf_model("mha").to(torch.bfloat16)
    hf.save_pretrained(str(tmp_path / "hf"))
    code = ("import sys; sys.modules['torch'] = None\n"
            "from jaxflow.convert import convert_checkpoint\n"
            f"convert_checkpoint({str(tmp_path / 'hf')!r}, {str(tmp_path / 'jf')!r}, 'bfloat16', progress=False, "
            "allow_no_tokenizer=True)\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=R.REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    jm = jaxflow.load(str(tmp_path / "jf"))
    want = hf.model.language_model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
    got = np.asarray(jm.language_model.layers.self_attn.q_proj.kernel[...][1]).astype(np.float32)
    assert jm.dtype == np.dtype("bfloat16") or str(jm.dtype) == "bfloat16"
    np.testing.assert_array_equal(got, want)
    # the bf16 model runs and stays close to the float32 reference computation of the same weights
    ids, mask, pix = R.batch_inputs("mha")
    lo = np.asarray(jaxflow.forward(jm, ids, pix, mask).logits)
    want_logits = _torch_forward(hf.float(), ids, mask, pix)
    assert np.abs(lo - want_logits)[mask.astype(bool)].max() < 0.1


def test_causal_query_blocks_are_exact(pair, monkeypatch):
    """Full-sequence attention runs in causal query blocks; force several blocks on short inputs."""
    import jax

    import jaxflow.models.llama as llama

    case, hf, jm = pair
    ids, mask, pix = R.batch_inputs(case, seed=9, padding="left")
    want = _torch_forward(hf, ids, mask, pix)
    unblocked = {impl: np.asarray(jaxflow.forward(jm, ids, pix, mask, attn_impl=impl).logits)
                 for impl in ("fused", "reference")}
    monkeypatch.setattr(llama, "CAUSAL_BLOCK", 4)
    jax.clear_caches()
    try:
        real = mask.astype(bool)
        assert ids.shape[1] > 3 * 4  # at least 4 blocks
        for impl in ("fused", "reference"):
            got = np.asarray(jaxflow.forward(jm, ids, pix, mask, attn_impl=impl).logits)
            assert np.abs(got - want)[real].max() <= TOL
            assert np.abs(got - unblocked[impl])[real].max() <= 1e-5
        gen = jaxflow.generate(jm, ids, pix, mask, max_new_tokens=6)  # prefill in blocks
        monkeypatch.setattr(llama, "CAUSAL_BLOCK", 10_000)
        jax.clear_caches()
        np.testing.assert_array_equal(gen.tokens, jaxflow.generate(jm, ids, pix, mask, max_new_tokens=6).tokens)
    finally:
        jax.clear_caches()
