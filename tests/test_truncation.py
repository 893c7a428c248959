"""Truncation: the fast sweep and truncated generation against the masked reference path and an
independent torch implementation (transformers eager attention with image keys masked from layer K)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jaxflow  # noqa: E402
import hf_reference as R  # noqa: E402
from jaxflow.analysis.truncation import fastv_keep_mask, image_layout  # noqa: E402


@pytest.fixture(scope="module", params=["mha", "gqa"])
def pair(request, converted_pair):
    hf, jm = converted_pair(request.param)
    return request.param, hf, jm


def torch_truncated_logits(hf, ids, mask, pix, K, image_token_id=R.IMAGE_TOKEN):
    """transformers forward where every decoder layer l >= K adds -inf at image-token key columns."""
    layers = hf.model.language_model.layers
    img_cols = torch.tensor(ids == image_token_id)[:, None, None, :]  # (B, 1, 1, T)
    handles = []

    def hook(module, args, kwargs):
        m = kwargs["attention_mask"]
        kwargs["attention_mask"] = torch.where(img_cols, torch.finfo(m.dtype).min, m)
        return args, kwargs

    for l, layer in enumerate(layers):
        if l >= K:
            handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            return hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix),
                      attention_mask=torch.tensor(mask), position_ids=torch.tensor(R.positions(mask))).logits.numpy()
    finally:
        for h in handles:
            h.remove()


def _sweep_vs(sweep, vi, full_logits):
    """max |diff| between sweep variant vi and (B, T, V) logits at the sweep's positions."""
    worst = 0.0
    for b in range(sweep.mask.shape[0]):
        pos = sweep.positions[b][sweep.mask[b]]
        worst = max(worst, float(np.abs(sweep.logits[vi, b, :len(pos)] - full_logits[b, pos]).max()))
    return worst


@pytest.mark.parametrize("padding", ["left", "right"])
def test_sweep_equals_masked_reference_and_torch(pair, padding):
    case, hf, jm = pair
    ids, mask, pix = R.batch_inputs(case, seed=3, padding=padding)
    L = jm.config.text.num_layers
    sweep = jaxflow.truncation_sweep(jm, ids, pix, mask)
    assert sweep.logits.shape[:2] == (L + 1, 3) and list(sweep.layers) == list(range(L + 1))
    for vi, K in enumerate(sweep.layers):
        ref = np.asarray(jaxflow.forward(jm, ids, pix, mask, truncate_at=int(K)).logits)
        assert _sweep_vs(sweep, vi, ref) <= 1e-5, (case, padding, K)
        want = torch_truncated_logits(hf, ids, mask, pix, int(K))
        assert _sweep_vs(sweep, vi, want) <= 1e-4, (case, padding, K)
        # greedy next token = argmax at each row's last real token, and last_logits are that row
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
        np.testing.assert_array_equal(sweep.next_token[vi], ref[np.arange(3), last].argmax(-1))
        np.testing.assert_allclose(sweep.last_logits[vi], ref[np.arange(3), last], atol=1e-5)
    lean = jaxflow.truncation_sweep(jm, ids, pix, mask, all_logits=False)
    assert lean.logits is None
    np.testing.assert_allclose(lean.last_logits, sweep.last_logits, atol=1e-6)
    np.testing.assert_array_equal(lean.next_token, sweep.next_token)


def test_sweep_ends(pair):
    """K = L is the plain forward; K = 0 is a forward where no layer sees an image key."""
    case, hf, jm = pair
    ids, mask, pix = R.batch_inputs(case, seed=4)
    L = jm.config.text.num_layers
    sweep = jaxflow.truncation_sweep(jm, ids, pix, mask, layers=[0, L])
    plain = np.asarray(jaxflow.forward(jm, ids, pix, mask).logits)
    assert _sweep_vs(sweep, 1, plain) <= 1e-5
    no_image = torch_truncated_logits(hf, ids, mask, pix, 0)
    assert _sweep_vs(sweep, 0, no_image) <= 1e-4
    # and truncation changes something: the cut is not a no-op on these random weights
    assert _sweep_vs(sweep, 0, plain) > 1e-3


def test_sweep_layer_subset_matches_full_sweep(pair):
    case, _, jm = pair
    ids, mask, pix = R.batch_inputs(case, seed=5)
    full = jaxflow.truncation_sweep(jm, ids, pix, mask)
    for chunks in (1, 3):
        sub = jaxflow.truncation_sweep(jm, ids, pix, mask, layers=[2, 0], chunks=chunks)
        assert list(sub.layers) == [0, 2]
        np.testing.assert_allclose(sub.logits, full.logits[[0, 2]], atol=1e-5)


def test_truncated_generation_equals_per_k_reference(pair):
    case, _, jm = pair
    ids, mask, pix = R.batch_inputs(case, seed=6, padding="right")
    gen = jaxflow.truncation_generate(jm, ids, pix, mask, max_new_tokens=8)
    L = jm.config.text.num_layers
    assert gen.tokens.shape == (L + 1, 3, 8)
    for vi, K in enumerate(gen.layers):
        ref = jaxflow.generate(jm, ids, pix, mask, max_new_tokens=8, truncate_at=int(K))
        np.testing.assert_array_equal(gen.tokens[vi], ref.tokens, err_msg=f"{case} K={K}")
        np.testing.assert_array_equal(gen.lengths[vi], ref.lengths)
    # the variants do not all say the same thing
    assert len({tuple(gen.tokens[v].ravel()) for v in range(L + 1)}) > 1


def test_generation_stops_at_eos(pair):
    """A row stops at EOS: pick EOS = the token the K=0 variant generates second."""
    case, _, jm = pair
    ids, mask, pix = R.batch_inputs(case, seed=6)
    free = jaxflow.truncation_generate(jm, ids, pix, mask, max_new_tokens=6, layers=[0])
    eos = int(free.tokens[0, 0, 1])
    gen = jaxflow.truncation_generate(jm, ids, pix, mask, max_new_tokens=6, layers=[0], eos_token_id=eos,
                                      pad_token_id=0)
    ref = jaxflow.generate(jm, ids, pix, mask, max_new_tokens=6, truncate_at=0, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(gen.tokens[0], ref.tokens)
    assert gen.lengths[0, 0] <= 2 and (gen.tokens[0, 0, gen.lengths[0, 0]:] == 0).all()


@pytest.mark.parametrize("k", [2])
def test_fastv_partial_truncation(pair, k):
    case, _, jm = pair
    ids, mask, pix = R.batch_inputs(case, seed=7)
    sweep = jaxflow.truncation_sweep(jm, ids, pix, mask, keep_top_k=k)
    gen = jaxflow.truncation_generate(jm, ids, pix, mask, keep_top_k=k, max_new_tokens=5)
    for vi, K in enumerate(sweep.layers):
        keep = fastv_keep_mask(jm, ids, pix, mask, int(K), k)
        assert keep.sum(1).tolist() == [k] * 3 and not (keep & (ids != R.IMAGE_TOKEN)).any()
        ref = np.asarray(jaxflow.forward(jm, ids, pix, mask, truncate_at=int(K), keep_image_mask=keep).logits)
        assert _sweep_vs(sweep, vi, ref) <= 1e-5, (case, k, K)
        ref_gen = jaxflow.generate(jm, ids, pix, mask, max_new_tokens=5, truncate_at=int(K), keep_image_mask=keep)
        np.testing.assert_array_equal(gen.tokens[vi], ref_gen.tokens)


def test_bad_arguments(pair):
    case, _, jm = pair
    ids, mask, pix = R.batch_inputs(case)
    L = jm.config.text.num_layers
    with pytest.raises(ValueError, match=r"cut layers K in 0\.\."):
        jaxflow.truncation_sweep(jm, ids, pix, mask, layers=[L + 1])
    with pytest.raises(ValueError, match=r"cut layers K in 0\.\."):
        jaxflow.truncation_sweep(jm, ids, pix, mask, layers=[-1])
    with pytest.raises(ValueError, match="truncate_at must be an integer"):
        jaxflow.forward(jm, ids, pix, mask, truncate_at=L + 1)
    with pytest.raises(ValueError, match="images for 2 rows|image tokens"):
        jaxflow.truncation_sweep(jm, ids[:2], pix, mask[:2])
    no_img = ids.copy()
    no_img[1][no_img[1] == R.IMAGE_TOKEN] = 7
    with pytest.raises(ValueError, match="image tokens"):
        jaxflow.truncation_sweep(jm, no_img, pix, mask)
    with pytest.raises(ValueError, match="row 1 has no image token"):
        image_layout(no_img, mask, R.IMAGE_TOKEN, jm.config.num_image_tokens)
    split = ids.copy()
    first = int(np.flatnonzero(split[0] == R.IMAGE_TOKEN)[0])
    split[0, first] = 7  # a gap inside the image block
    split[0, first - 1] = R.IMAGE_TOKEN
    lay = image_layout(split, mask, R.IMAGE_TOKEN, jm.config.num_image_tokens)  # a gap: like two images
    assert not lay.contiguous and first in lay.text_idx[0][lay.text_valid[0]]  # the gap's token is an own token
    with pytest.raises(ValueError, match="must hold 576 image tokens|must hold .* image tokens"):
        image_layout(ids[:, 1:], mask[:, 1:], R.IMAGE_TOKEN, jm.config.num_image_tokens + 1)
    with pytest.raises(ValueError, match="one image per row"):
        jaxflow.truncation_sweep(jm, split, pix, mask, keep_top_k=2)
    with pytest.raises(ValueError, match="keep_top_k"):
        jaxflow.truncation_sweep(jm, ids, pix, mask, keep_top_k=10_000)
    with pytest.raises(ValueError, match="max_new_tokens"):
        jaxflow.truncation_generate(jm, ids, pix, mask, max_new_tokens=0)


def test_text_bucket_pads_without_changing_results(pair):
    case, _, jm = pair
    ids, mask, pix = R.batch_inputs(case, seed=8)
    a = jaxflow.truncation_sweep(jm, ids, pix, mask, layers=[0, 1])
    b = jaxflow.truncation_sweep(jm, ids, pix, mask, layers=[0, 1], text_bucket=16)
    assert b.logits.shape[2] == 16 and b.mask[:, a.mask.shape[1]:].sum() == 0
    ta = a.mask.shape[1]
    np.testing.assert_allclose(b.logits[:, :, :ta][:, a.mask], a.logits[:, a.mask], atol=1e-5)
    np.testing.assert_array_equal(a.next_token, b.next_token)
    ga = jaxflow.truncation_generate(jm, ids, pix, mask, layers=[0, 1], max_new_tokens=4)
    gb = jaxflow.truncation_generate(jm, ids, pix, mask, layers=[0, 1], max_new_tokens=4, text_bucket=16)
    np.testing.assert_array_equal(ga.tokens, gb.tokens)
