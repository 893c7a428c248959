"""The logit lens against transformers' `output_hidden_states` through the final norm and `lm_head`, on a
tiny LLaVA (Llama decoder) and a tiny InternVL (Qwen2 decoder, widened init: norm weights differ from 1);
the lean options (positions, top_k, targets, bfloat16) against the full lens; bad input as one-line
ValueErrors; scripts/logit_lens.py's library function on the embedded toy model.

What transformers returns (5.x, `capture_outputs`): `hidden_states` has L+1 entries; entry l < L is the
input of decoder layer l (entry 0: the embeddings, image features scattered in), and the last entry is
NOT the last layer's raw output but `last_hidden_state`, i.e. already through the final norm (its hook
records the raw output, then `tie_last_hidden_states` replaces it). So the reference lens is
lm_head(norm(hidden_states[l])) for l < L and lm_head(hidden_states[L]) for l = L (norming it again is
wrong; test_transformers_last_hidden_state_is_normed shows the difference on InternVL, whose final norm
weight is not 1)."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jaxflow  # noqa: E402
import hf_reference as R  # noqa: E402
import internvl_reference as I  # noqa: E402
from jaxflow.analysis.logit_lens import last_positions, logit_lens  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def llava(converted_pair):
    hf, jm = converted_pair("mha")
    ids, mask, pix = R.batch_inputs("mha")
    return hf, jm, ids, mask, pix


@pytest.fixture(scope="module")
def internvl():
    hf, jm, _, _ = I.pair()
    ids, mask, pix, _, _ = I.batch_inputs()
    return hf, jm, ids, mask, pix


def _hf_outputs(hf, ids, mask, pix):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(R.positions(mask)), output_hidden_states=True)


def _hf_lens(hf, out):
    """(B, L+1, T, V): transformers' hidden states through the final norm and lm_head (the last entry is
    already normed, see the module doc)."""
    lm = hf.model.language_model
    hs = out.hidden_states
    L = lm.config.num_hidden_layers
    assert len(hs) == L + 1
    with torch.no_grad():
        lens = [hf.lm_head(lm.norm(h)) for h in hs[:L]] + [hf.lm_head(hs[L])]
    return np.stack([x.numpy() for x in lens], axis=1)


@pytest.fixture(scope="module")
def internvl_full(internvl):
    hf, jm, ids, mask, pix = internvl
    return logit_lens(jm, ids, pix, mask)


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_lens_matches_transformers_hidden_states(family, request):
    hf, jm, ids, mask, pix = request.getfixturevalue(family)
    out = _hf_outputs(hf, ids, mask, pix)
    want = _hf_lens(hf, out)
    got = (request.getfixturevalue("internvl_full") if family == "internvl" else logit_lens(jm, ids, pix, mask))
    L = jm.config.text.num_layers
    assert got.logits.shape == want.shape == ids.shape[:1] + (L + 1,) + ids.shape[1:] + (jm.config.text.vocab_size,)
    assert got.logits.dtype == np.float32
    real = mask.astype(bool)
    err = np.abs(got.logits - want).transpose(0, 2, 1, 3)[real].max()
    assert err <= TOL, f"{family}: max |lens diff| {err:.2e}"
    # the last layer is the model's own logits; the earlier layers genuinely differ from it
    assert np.abs(want[:, L] - out.logits.numpy())[real].max() <= 1e-5
    assert np.abs(want[:, 0] - want[:, L])[real].max() > 0.1
    np.testing.assert_array_equal(got.positions, np.broadcast_to(np.arange(ids.shape[1]), ids.shape))


def test_transformers_last_hidden_state_is_normed(internvl):
    """The claim the reference rests on: hidden_states[L] already went through the final norm (so it
    maps to the logits by lm_head alone), and norming it a second time changes the logits."""
    hf, _, ids, mask, pix = internvl
    out = _hf_outputs(hf, ids, mask, pix)
    lm = hf.model.language_model
    hs_last = out.hidden_states[-1]
    real = mask.astype(bool)
    with torch.no_grad():
        once = hf.lm_head(hs_last).numpy()
        twice = hf.lm_head(lm.norm(hs_last)).numpy()
    assert np.abs(once - out.logits.numpy())[real].max() <= 1e-5
    assert np.abs(twice - out.logits.numpy())[real].max() > 1e-2


def test_lean_options_equal_the_full_lens(internvl, internvl_full):
    """positions, top_k, targets and bfloat16 logits give what the full lens gives at those places."""
    _, jm, ids, mask, pix = internvl
    full = internvl_full.logits  # (B, L+1, T, V)
    b, n_layers, t, v = full.shape
    rng = np.random.RandomState(0)
    pos = np.stack([np.sort(rng.choice(np.flatnonzero(mask[r]), 5, replace=False)) for r in range(b)])
    pos[:, -1] = last_positions(mask)[:, 0]
    tgt = rng.randint(0, v, size=pos.shape)
    at = full[np.arange(b)[:, None], :, pos].transpose(0, 2, 1, 3)  # (B, L+1, P, V)
    logp = at - np.log(np.exp(at - at.max(-1, keepdims=True)).sum(-1, keepdims=True)) - at.max(-1, keepdims=True)
    want_tlp = np.take_along_axis(logp, np.broadcast_to(tgt[:, None, :, None], logp.shape[:3] + (1,)), -1)[..., 0]
    t_logit = np.take_along_axis(at, np.broadcast_to(tgt[:, None, :, None], at.shape[:3] + (1,)), -1)
    want_rank = (at > t_logit).sum(-1)

    only = logit_lens(jm, ids, pix, mask, positions=pos, targets=tgt)  # the full-logits path
    np.testing.assert_array_equal(only.positions, pos)
    assert only.top_ids is None and np.abs(only.logits - at).max() <= 1e-5
    assert np.abs(only.target_logprobs - want_tlp).max() <= 1e-5
    np.testing.assert_array_equal(only.target_ranks, want_rank)
    half = logit_lens(jm, ids, pix, mask, positions=pos, targets=tgt, logits_dtype="bfloat16")
    assert half.logits.dtype.name == "bfloat16"
    assert np.abs(half.logits.astype(np.float32) - at).max() <= 2 ** -7 * np.abs(at).max()

    k = 4
    lean = logit_lens(jm, ids, pix, mask, positions=pos, top_k=k, targets=tgt)  # one layer at a time
    assert lean.logits is None and lean.top_ids.shape == lean.top_logprobs.shape == (b, n_layers, pos.shape[1], k)
    order = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(lean.top_ids, order)
    assert np.abs(lean.top_logprobs - np.take_along_axis(logp, order, -1)).max() <= 1e-5
    assert np.abs(lean.target_logprobs - want_tlp).max() <= 1e-5
    np.testing.assert_array_equal(lean.target_ranks, want_rank)
    np.testing.assert_array_equal(lean.target_ids, tgt)


def test_last_positions():
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(last_positions(mask), [[3], [2], [0]])
    with pytest.raises(ValueError, match="real token"):
        last_positions(np.array([[1, 1], [0, 0]]))


@pytest.mark.parametrize("kw,needle", [
    (dict(positions=np.array([[0], [15]])), "padding token"),
    (dict(positions=np.array([[99], [99]])), "must lie in"),
    (dict(positions=np.array([[0.5], [1.5]])), "integer array"),
    (dict(positions=np.array([[15, 16, 17]])), "B = 2"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(top_k=10 ** 6), "top_k"),
    (dict(positions=np.array([[15], [16]]), targets=np.array([1, 2])), "targets must be"),
    (dict(positions=np.array([[15], [16]]), targets=np.array([[1], [10 ** 6]])), "targets must lie"),
    (dict(logits_dtype="int8"), "logits_dtype"),
    (dict(attn_impl="magic"), "attn_impl"),
])
def test_bad_input_is_one_line(internvl, kw, needle):
    _, jm, ids, mask, pix = internvl
    assert mask[0, 0] == 0 and mask[:, 15:].all()  # row 0 is left-padded
    with pytest.raises(ValueError) as e:
        logit_lens(jm, ids, pix, mask, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_run_logit_lens_on_the_toy_model(tmp_path):
    """The script's library function: the files, and the answer's trajectory equal to the model's own
    next-token distribution at the last layer (from jaxflow.forward)."""
    from jaxflow import tiny
    from jaxflow.analysis.logit_lens import run_logit_lens
    from jaxflow.pipeline import encode, load_bundle

    bundle = load_bundle(None)
    out = tmp_path / "lens"
    report, summary, files = run_logit_lens(None, tiny.DEMO_IMAGE, tiny.DEMO_QUESTION, out=str(out), top_k=3,
                                            bundle=bundle)
    assert sorted(os.listdir(out)) == sorted(["answer_lens.png", "image_tokens.png", "lens.npz", "summary.json",
                                              ".jaxflow-outputs.json"])
    L = bundle.config.text.num_layers
    s = json.loads((out / "summary.json").read_text())
    assert s["num_layers"] == L and len(s["answer_rank"]) == L + 1 and len(s["top_tokens"][0]) == 3
    assert s["image_tokens"]["grid"] == [8, 8] and s["image_tokens"]["count"] == 64
    arrays = np.load(out / "lens.npz")
    assert arrays["image_top_ids"].shape == (L + 1, 64, 3)
    batch, px = encode(bundle, [tiny.DEMO_IMAGE], [tiny.DEMO_QUESTION])
    logits = np.asarray(jaxflow.forward(bundle.model, batch.input_ids, px, batch.attention_mask).logits)[0, -1]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert abs(report.answer_prob[L] - p[report.first_token]) <= 1e-5
    assert report.answer_rank[L] == (logits > logits[report.first_token]).sum() == 0  # the greedy answer
    assert report.word_grid(L).shape == (8, 8) and (report.word_grid(L) >= 0).all()
    with pytest.raises(ValueError, match="--layers must be lens layers in 0..4"):
        run_logit_lens(None, tiny.DEMO_IMAGE, tiny.DEMO_QUESTION, out=str(tmp_path / "bad"), layers=[0, 9],
                       bundle=bundle)
    assert not (tmp_path / "bad").exists()
