"""Deletion curves: every step equals a `knockout` forward with the same image tokens cut (that
function is checked against transformers in test_knockout.py), and on the shipped toy model the best
CAM's order removes the answer faster than a random order."""
import numpy as np
import pytest

import jaxflow
from jaxflow.analysis.deletion import deletion_curves, map_rankings, predicting_mask, random_rankings
from jaxflow.analysis.knockout import knockout


@pytest.fixture(scope="module")
def toy_batch(tmp_path_factory):
    from jaxflow.data.datasets import load_dataset
    from jaxflow.pipeline import answer, encode, load_bundle
    from jaxflow.toy.sets import write_toy_pope

    bundle = load_bundle(None)
    ds = load_dataset("toy_pope", *write_toy_pope(str(tmp_path_factory.mktemp("toy")), 8, 5))
    items = [it for it in ds.items if it.answers[0] == "yes"][:12]
    imgs, qs = [it.image for it in items], [it.question for it in items]
    ans = answer(bundle, imgs, qs, max_new_tokens=4)
    batch, enc = encode(bundle, imgs, qs, ans.token_ids, with_images=True)
    return bundle, batch, enc


def _reference(bundle, batch, enc, queries, order, fraction):
    """The answer's probability from one knockout forward: the first round(fraction * n) ranked image
    tokens cut for `queries` in every layer."""
    ids, mask = batch.input_ids, batch.attention_mask
    keys = np.zeros(ids.shape, bool)
    for r in range(ids.shape[0]):
        pos = np.flatnonzero(ids[r] == bundle.config.image_token_id)
        keys[r, pos[order[r][:int(round(fraction * len(pos)))]]] = True
    L = bundle.config.text.num_layers
    lg = np.asarray(knockout(bundle.model, ids, enc.pixel_values, mask, queries, keys, np.ones(L, bool)).logits,
                    np.float64)
    lp = lg - lg.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    pred = predicting_mask(batch.answer_mask)
    return np.array([np.exp(sum(lp[r, t, ids[r, t + 1]] for t in np.flatnonzero(pred[r]))) for r in range(len(ids))])


def test_every_step_equals_a_knockout_forward(toy_batch):
    bundle, batch, enc = toy_batch
    ids = batch.input_ids
    n_img = int((ids[0] == bundle.config.image_token_id).sum())
    order = random_rankings(len(ids), n_img, seed=1)
    after_image = np.arange(ids.shape[1])[None] > np.array(
        [np.flatnonzero(r == bundle.config.image_token_id)[-1] for r in ids])[:, None]
    for mode, queries in (("answer", predicting_mask(batch.answer_mask)),
                          ("text", after_image & (batch.attention_mask > 0))):
        dc = deletion_curves(bundle.model, ids, enc.pixel_values, batch.attention_mask, batch.answer_mask,
                             {"r": order}, steps=4, queries=mode)
        for s in (0, 2, 4):
            want = _reference(bundle, batch, enc, queries, order, s / 4)
            np.testing.assert_allclose(dc.probs[0, s], want, rtol=1e-4, atol=1e-7)


def test_the_best_cam_falls_faster_than_random_on_the_toy(toy_batch):
    """Measured on 12 toy POPE yes-questions, queries "text" (the toy reads the image into its question
    tokens; from the answer's positions alone nothing changes, see test_knockout.py), 20 steps: the
    area under the relative-probability curve is 0.46 for paper and gradcam at layer 1 (their best),
    0.63-0.69 at layers 0 and 3, and 0.74, 0.84, 0.90 for three random orders. Asserted: the best
    CAM layer's area is below 0.6 and at least 0.15 under the random orders' mean."""
    bundle, batch, enc = toy_batch
    ids = batch.input_ids
    cams = jaxflow.llava_cams(bundle.model, ids, enc.pixel_values, batch.answer_mask, ("paper", "gradcam"),
                              attention_mask=batch.attention_mask)
    L = bundle.config.text.num_layers
    rankings = {f"{m}/{l}": map_rankings(cams.maps[m][:, l].reshape(len(ids), -1))
                for m in ("paper", "gradcam") for l in range(L)}
    n_img = int((ids[0] == bundle.config.image_token_id).sum())
    for s in range(3):
        rankings[f"random/{s}"] = random_rankings(len(ids), n_img, seed=s)
    dc = deletion_curves(bundle.model, ids, enc.pixel_values, batch.attention_mask, batch.answer_mask, rankings,
                         queries="text")
    auc = dict(zip(dc.names, dc.auc.mean(1)))
    best = min(v for k, v in auc.items() if not k.startswith("random"))
    rand = np.mean([v for k, v in auc.items() if k.startswith("random")])
    assert best < 0.6 and best < rand - 0.15, auc
    np.testing.assert_allclose(dc.probs[:, 0], np.broadcast_to(dc.base, dc.probs[:, 0].shape))  # step 0: no cut


def test_bad_rankings_are_one_line_errors(toy_batch):
    bundle, batch, enc = toy_batch
    ids = batch.input_ids
    with pytest.raises(ValueError, match="must order all 64 of the row's image tokens once"):
        deletion_curves(bundle.model, ids, enc.pixel_values, batch.attention_mask, batch.answer_mask,
                        {"x": np.zeros((len(ids), 64), int)})
    with pytest.raises(ValueError, match="queries must be one of answer, text"):
        deletion_curves(bundle.model, ids, enc.pixel_values, batch.attention_mask, batch.answer_mask,
                        {"r": random_rankings(len(ids), 64)}, queries="all")


def test_faithfulness_reports_deletion_areas():
    """faithfulness() adds per-layer deletion areas; on 32 held-out toy samples (text queries, 10 steps)
    the paper map's best layer (measured 0.40-0.45) is far below a random order (measured 0.85-0.9)."""
    from jaxflow.analysis.faithfulness import faithfulness
    from jaxflow.pipeline import load_bundle
    from jaxflow.toy.sets import faithfulness_samples

    bundle = load_bundle(None)
    res = faithfulness(bundle, faithfulness_samples(32, 0), ("paper",), deletion_steps=10, deletion_queries="text")
    d = res.deletion
    L = bundle.config.text.num_layers
    assert d["auc"]["paper"].shape == (L,) and len(d["fractions"]) == 11 and d["queries"] == "text"
    best = res.deletion_best_layer("paper")
    assert d["auc"]["paper"][best] < 0.6 and d["auc"]["paper"][best] < d["auc_random"] - 0.2
    s = res.summary()["deletion"]
    assert s["best_layer"]["paper"] == best and len(s["curve_best"]["paper"]) == 11
    off = faithfulness(bundle, faithfulness_samples(4, 0), ("paper",), deletion_steps=0)
    assert off.deletion is None and "deletion" not in off.summary()
