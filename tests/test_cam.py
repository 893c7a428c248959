"""LLaVA-CAM against an independent torch computation on the same converted tiny model.

Torch: autograd with forward hooks on every layer's post_attention_layernorm (retain_grad on its
output), teacher-forced target = sum of the answer tokens' logits at positions p - 1, then the
DESIGN.md formulas in numpy. jaxflow: one jax.grad over zero deltas at every layer's MLP input.
Tolerance: max |jaxflow - torch| / max |torch| <= 1e-4 (per layer for gradients), float32.

Compilation dominates the runtime on a 2-core runner, so the tests share few compiled variants:
left and right padding have the same shape (one compilation each variant).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import analysis_reference as AR  # noqa: E402
import jaxflow.analysis.cam as C  # noqa: E402

TOL = 1e-4
B, L, N = 3, 3, AR.NUM_IMAGE_TOKENS
GRID = (AR.GRID, AR.GRID)


@pytest.fixture(scope="module")
def models():
    return AR.pair()


@pytest.fixture(scope="module", params=["left", "right"])
def case(request, models):
    """Inputs, the torch reference site values, and jaxflow's results for them."""
    hf, jm = models
    ids, mask, amask, pix = AR.inputs(request.param)
    g, h = AR.torch_site(hf, ids, mask, amask, pix)
    g_tok, _ = AR.torch_site(hf, ids, mask, amask, pix, per_token=True)
    cams = C.llava_cams(jm, ids, pix, amask, C.METHODS, attention_mask=mask)
    tok = C.llava_cams(jm, ids, pix, amask, C.METHODS, attention_mask=mask, per_token=True)
    return dict(ids=ids, mask=mask, amask=amask, pix=pix, g=g, h=h, g_tok=g_tok, cams=cams, tok=tok)


def _per_layer_rel(got, want):
    """max over layers (axis 1) of the relative error, for layers where the reference is non-zero."""
    return max(AR.rel_err(got[:, l], want[:, l]) for l in range(want.shape[1]) if np.abs(want[:, l]).max() > 0)


def test_site_gradients_match_torch(models, case):
    _, jm = models
    g, h = C.cam_site(jm, case["ids"], case["pix"], case["amask"], attention_mask=case["mask"])
    assert g.shape == case["g"].shape == (B, L, N, 32)
    assert AR.rel_err(h, case["h"]) <= TOL
    assert _per_layer_rel(g, case["g"]) <= TOL
    # the last layer's image tokens cannot reach the answer logits: its gradient is exactly zero in both
    assert np.abs(case["g"][:, -1]).max() == 0 and np.abs(g[:, -1]).max() == 0
    assert np.abs(case["g"][:, 0]).max() > 1e-3  # a real comparison, not between zeros


@pytest.mark.parametrize("method", C.METHODS)
def test_maps_match_torch(case, method):
    want_raw = AR.np_raw_cam(case["g"], case["h"], method)  # (B, L, N)
    want = AR.np_normalize(want_raw).reshape(B, L, *GRID)
    r = case["cams"]
    got = r.maps[method]
    assert got.shape == (B, L, *GRID) and got.dtype == np.float32
    assert AR.rel_err(r.raw[method][:, :-1].reshape(B, L - 1, N), want_raw[:, :-1]) <= TOL
    assert np.abs(got - want).max() <= TOL
    peaks = got.max(axis=(2, 3))  # each layer's map peaks at 1, or is all zero (the ReLU removed everything)
    assert (np.isclose(peaks, 1.0, atol=1e-6) | (peaks == 0)).all() and (got >= 0).all()
    np.testing.assert_array_equal(got[:, -1], 0.0)
    # token k of the image block is grid row k // w, column k % w
    k = int(np.argmax(want_raw[0, 0]))
    assert got[0, 0, k // AR.GRID, k % AR.GRID] == pytest.approx(1.0, abs=1e-6)


def test_per_token_maps_match_torch(case):
    r = case["tok"]
    a = max(AR.ANSWER_LENGTHS)
    assert r.token_mask.shape == (B, a)
    np.testing.assert_array_equal(r.token_mask.sum(1), AR.ANSWER_LENGTHS)
    for m in C.METHODS:
        want = AR.np_normalize(AR.np_raw_cam(case["g_tok"], case["h"][:, None], m))  # (B, A, L, N)
        want = np.where(r.token_mask[:, :, None, None], want, 0.0).reshape(B, a, L, *GRID)
        assert r.token_maps[m].shape == want.shape
        assert np.abs(r.token_maps[m] - want).max() <= TOL, m
        # the all-token maps of the same call equal the summed-target maps
        assert np.abs(r.maps[m] - case["cams"].maps[m]).max() <= TOL
    for b in range(B):  # per-token ids and positions are the answer tokens in order
        pos = np.flatnonzero(case["amask"][b])
        np.testing.assert_array_equal(r.token_positions[b, :pos.size], pos)
        np.testing.assert_array_equal(r.token_ids[b, :pos.size], case["ids"][b, pos])
    # the per-token scores are the answer logits; the summed-target call reports the same ones
    np.testing.assert_allclose(r.scores, case["cams"].scores, rtol=1e-5, atol=1e-5)


def test_public_entry_points_and_threshold(models, case):
    _, jm = models
    args = (jm, case["ids"], case["pix"], case["amask"])
    got = C.llava_cam(*args, "gradcam", attention_mask=case["mask"])
    np.testing.assert_array_equal(got, case["cams"].maps["gradcam"])
    maps, tmask = C.llava_cam_per_token(*args, "paper", attention_mask=case["mask"])
    np.testing.assert_array_equal(maps, case["tok"].token_maps["paper"])
    np.testing.assert_array_equal(tmask, case["tok"].token_mask)
    thr = C.llava_cam(*args, "paper", attention_mask=case["mask"], threshold=0.5)
    base = case["cams"].maps["paper"]
    assert not ((thr > 0) & (thr < 0.5)).any()
    np.testing.assert_allclose(thr, np.where(base >= 0.5, base, 0), atol=1e-6)


def test_single_backward_equals_per_layer_loop(models):
    _, jm = models
    ids, mask, amask, pix = AR.inputs("left", seed=3)
    g1, h1 = C.cam_site(jm, ids, pix, amask, attention_mask=mask)
    g2, h2 = C.cam_site(jm, ids, pix, amask, attention_mask=mask, per_layer_loop=True)
    assert AR.rel_err(g1, g2) <= 1e-5 and AR.rel_err(h1, h2) <= 1e-6


def test_logprob_score_matches_torch(models):
    hf, jm = models
    ids, mask, amask, pix = AR.inputs("left", seed=4)
    want, _ = AR.torch_site(hf, ids, mask, amask, pix, score="logprob")
    g, _ = C.cam_site(jm, ids, pix, amask, attention_mask=mask, score="logprob")
    assert _per_layer_rel(g, want) <= TOL
    g_logit, _ = C.cam_site(jm, ids, pix, amask, attention_mask=mask)
    assert np.abs(g - g_logit).max() > 1e-4  # the option changes the target


def test_smoothgrad_averages_raw_maps_of_noisy_copies(models):
    import jax

    _, jm = models
    ids, mask, amask, pix = AR.inputs("left", seed=5)
    n, sigma, seed = 4, 0.2, 7
    # chunks of 2 copies: lax.map over vmapped pairs
    sm = C.llava_cams(jm, ids, pix, amask, C.METHODS, attention_mask=mask, smooth_n=n, smooth_sigma=sigma,
                      seed=seed, smooth_batch=2)
    noisy = np.asarray(C.noisy_copies(jax.random.PRNGKey(seed), pix, n, sigma, C.OPENAI_CLIP_MEAN,
                                      C.OPENAI_CLIP_STD))
    std = np.asarray(C.OPENAI_CLIP_STD, np.float32)[:, None, None]
    noise01 = (noisy - pix[None]) * std  # the noise on the [0, 1] scale
    assert abs(noise01.std() - sigma) < 0.01 and abs(noise01.mean()) < 0.01
    per_copy = [C.llava_cams(jm, ids, x, amask, C.METHODS, attention_mask=mask) for x in noisy]
    base = C.llava_cams(jm, ids, pix, amask, C.METHODS, attention_mask=mask)
    for m in C.METHODS:
        avg = np.mean([r.raw[m] for r in per_copy], axis=0)  # average the raw maps, then normalise
        np.testing.assert_allclose(sm.raw[m], avg, rtol=1e-4, atol=1e-7 * np.abs(avg).max())
        want = AR.np_normalize(avg.reshape(B, L, N)).reshape(avg.shape)
        np.testing.assert_allclose(sm.maps[m], want, atol=1e-4)
        assert np.abs(sm.maps[m] - base.maps[m]).max() > 1e-3  # the noise did something
    # a negligible sigma gives back the plain maps
    quiet = C.llava_cams(jm, ids, pix, amask, C.METHODS, attention_mask=mask, smooth_n=n, smooth_sigma=1e-7,
                         seed=seed, smooth_batch=2)
    np.testing.assert_allclose(quiet.maps["gradxact"], base.maps["gradxact"], atol=1e-3)


def test_validation_errors(models):
    _, jm = models
    ids, mask, amask, pix = AR.inputs("left")
    am = amask.copy()
    am[1] = False
    cases = [
        (dict(answer_mask=am), "row 1 is empty"),
        (dict(method="bogus"), "unknown CAM method"),
        (dict(answer_mask=amask[:, 1:]), "answer_mask shape"),
        (dict(input_ids=np.where(ids == AR.R.IMAGE_TOKEN, 7, ids)), "image token"),
        (dict(pixel_values=pix[:, :, :10]), "pixel_values"),
        (dict(pixel_values=None), "pixel_values is required"),
        (dict(threshold=1.5), "threshold"),
        (dict(answer_mask=mask == 0), "padding"),
        (dict(score="prob"), "score"),
        (dict(smooth_n=-1), "smooth_n"),
    ]
    for override, phrase in cases:
        kw = dict(input_ids=ids, pixel_values=pix, answer_mask=amask, attention_mask=mask)
        kw.update(override)
        with pytest.raises(ValueError, match=phrase) as e:
            C.llava_cam(jm, **kw)
        assert "\n" not in str(e.value)


def test_full_strategy_grid_drops_cls():
    """strategy "full": the image block is CLS + grid; the CLS feature is pooled but not drawn."""
    from jaxflow.analysis._common import to_grid

    np.testing.assert_array_equal(to_grid(np.arange(5), (2, 2)), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(to_grid(np.arange(8).reshape(2, 4), (2, 2)), [[[0, 1], [2, 3]], [[4, 5], [6, 7]]])
    with pytest.raises(ValueError, match="do not fill"):
        to_grid(np.arange(6), (2, 2))
