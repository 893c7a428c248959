"""Attention shares against transformers' output_attentions (eager) on the same converted tiny model."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import analysis_reference as AR  # noqa: E402
from jaxflow.analysis import attention as A  # noqa: E402
from jaxflow.data.prompts import token_spans  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def models():
    return AR.pair()


def _torch_shares(att, ids, mask, amask, qmask, heads="mean"):
    """The definition, in numpy, from eager probabilities att (B, L, H, T, T)."""
    sp = token_spans(ids, mask, AR.R.IMAGE_TOKEN, amask)
    a = att.mean(axis=2) if heads == "mean" else att.max(axis=2)  # (B, L, T, T)
    b_, l_ = att.shape[:2]
    out = np.zeros((b_, l_, 3))
    img = np.zeros((b_, l_, AR.NUM_IMAGE_TOKENS))
    for b in range(b_):
        qs = np.flatnonzero(qmask[b])
        rows = a[b][:, qs]  # (L, Q, T)
        mass = np.stack([rows[..., g[b]].sum(-1) for g in (sp.system, sp.image, sp.user)], -1)  # (L, Q, 3)
        out[b] = (mass / mass.sum(-1, keepdims=True)).mean(1)
        img[b] = rows[..., sp.image[b]].mean(1)
    return out, img.reshape(b_, l_, AR.GRID, AR.GRID)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_shares_match_transformers(models, padding):
    hf, jm = models
    ids, mask, amask, pix = AR.inputs(padding, seed=1)
    att, _ = AR.torch_attentions(hf, ids, mask, pix)
    assert att.shape[:3] == (3, 3, 4)
    for heads in A.HEAD_REDUCTIONS:
        want, want_img = _torch_shares(att, ids, mask, amask, amask, heads)
        r = A.attention_analysis(jm, ids, pix, attention_mask=mask, answer_mask=amask, heads=heads)
        assert r.shares.shape == (3, 3, 3)
        assert np.abs(r.shares - want).max() <= TOL, heads
        np.testing.assert_allclose(r.shares.sum(-1), 1.0, atol=1e-6)
        assert np.abs(r.image_maps - want_img).max() <= TOL
        # attention rows of the queries, head-reduced, equal the eager probabilities
        a = att.mean(axis=2) if heads == "mean" else att.max(axis=2)
        for b in range(3):
            qs = r.query_positions[b, r.query_mask[b]]
            np.testing.assert_array_equal(qs, np.flatnonzero(amask[b]))
            assert np.abs(r.rows[b][:, r.query_mask[b]] - a[b][:, qs]).max() <= TOL
    assert r.shares[..., 1].max() > 0.05  # the image share is not trivially zero


def test_public_function_defaults_and_last_token(models):
    hf, jm = models
    ids, mask, amask, pix = AR.inputs("left", seed=2)
    att, _ = AR.torch_attentions(hf, ids, mask, pix)
    # default queries are the answer tokens
    want, _ = _torch_shares(att, ids, mask, amask, amask)
    got = A.attention_shares(jm, ids, pix, attention_mask=mask, answer_mask=amask)
    assert np.abs(got - want).max() <= TOL
    explicit = A.attention_shares(jm, ids, pix, amask, attention_mask=mask, answer_mask=amask)
    np.testing.assert_array_equal(explicit, got)
    # without an answer: the last real token of each row (the prompt's end)
    last = np.zeros_like(amask)
    last[np.arange(3), [np.flatnonzero(r)[-1] for r in mask]] = True
    want_last, _ = _torch_shares(att, ids, mask, None, last)
    got_last = A.attention_shares(jm, ids, pix, attention_mask=mask)
    assert np.abs(got_last - want_last).max() <= TOL
    np.testing.assert_allclose(got_last.sum(-1), 1.0, atol=1e-6)


def test_validation_errors(models):
    _, jm = models
    ids, mask, amask, pix = AR.inputs("left")
    bad = [
        (dict(query_mask=amask[:, 1:]), "query_mask shape"),
        (dict(query_mask=mask == 0), "padding"),
        (dict(query_mask=np.zeros_like(amask)), "row 0 is empty"),
        (dict(heads="min"), "heads"),
        (dict(pixel_values=None), "pixel_values"),
        (dict(input_ids=np.where(ids == AR.R.IMAGE_TOKEN, 7, ids)), "image token"),
    ]
    for override, phrase in bad:
        kw = dict(input_ids=ids, pixel_values=pix, query_mask=amask, attention_mask=mask, answer_mask=amask)
        kw.update(override)
        with pytest.raises(ValueError, match=phrase):
            A.attention_shares(jm, **kw)
