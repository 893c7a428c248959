"""Information-flow saliency |sum_h A * ds/dA| against torch autograd on the same converted tiny model.

Torch: eager attention returns the softmax probabilities that multiply the values; retain_grad on
them and backpropagate the teacher-forced target (sum of the answer tokens' logits at p - 1).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import analysis_reference as AR  # noqa: E402
from jaxflow.analysis import flow as F  # noqa: E402
from jaxflow.data.prompts import token_spans  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def result():
    hf, jm = AR.pair()
    ids, mask, amask, pix = AR.inputs("left", seed=6)
    att, grad = AR.torch_attentions(hf, ids, mask, pix, grad_of_answer_mask=amask)
    want = np.abs((att * grad).sum(axis=2))  # (B, L, T, T)
    r = F.information_flow(jm, ids, pix, amask, attention_mask=mask)
    return dict(jm=jm, ids=ids, mask=mask, amask=amask, pix=pix, want=want, r=r)


def test_saliency_matches_torch(result):
    r, want = result["r"], result["want"]
    b_idx = np.arange(3)[:, None]
    ref = want[b_idx, :, r.query_positions].transpose(0, 2, 1, 3)  # (B, L, Q, T)
    got = np.where(r.query_mask[:, None, :, None], r.saliency, 0.0)
    ref = np.where(r.query_mask[:, None, :, None], ref, 0.0)
    assert got.shape == ref.shape
    for l in range(ref.shape[1]):
        assert AR.rel_err(got[:, l], ref[:, l]) <= TOL, l
    assert ref.max() > 1e-3


def test_query_rows_and_flows(result):
    r, want, ids, mask, amask = result["r"], result["want"], result["ids"], result["mask"], result["amask"]
    sp = token_spans(ids, mask, AR.R.IMAGE_TOKEN, amask)
    keys = {"S": sp.system, "T": sp.image, "U": sp.user, "A": sp.answer}
    for b in range(3):
        ans = np.flatnonzero(amask[b])
        pred = ans - 1  # the rows whose logits make up the target: last prompt token + answers but the last
        user = np.setdiff1d(np.flatnonzero(sp.user[b]), pred)
        q = r.query_positions[b][r.query_mask[b]]
        np.testing.assert_array_equal(np.sort(q), np.sort(np.concatenate([pred, user])))
        np.testing.assert_array_equal(np.sort(r.query_positions[b][r.query_is_answer[b]]), pred)
        for name in F.FLOWS:
            src, dst = name.split("->")
            rows = pred if dst == "A" else user
            w = want[b][:, rows][..., keys[src][b]].sum(axis=(1, 2))  # (L,)
            scale = max(np.abs(want[b]).max(), 1e-12)
            assert np.abs(r.flows[name][b] - w).max() / scale <= TOL, (b, name)
    assert r.flows["T->A"].max() > 0 and (r.flows["A->A"][1] == 0).all()  # row 1 has a one-token answer
    frac = r.fractions("A")
    np.testing.assert_allclose(sum(frac.values()), 1.0, atol=1e-6)


def test_saliency_function_and_errors(result):
    r = result["r"]
    qm = np.zeros_like(result["amask"])
    for b in range(3):
        qm[b, r.query_positions[b][r.query_mask[b]]] = True
    sal, qpos, qvalid = F.saliency(result["jm"], result["ids"], result["pix"], result["amask"], qm,
                                   attention_mask=result["mask"])
    np.testing.assert_array_equal(qpos[qvalid], r.query_positions[r.query_mask])
    np.testing.assert_allclose(sal, np.where(r.query_mask[:, None, :, None], r.saliency, 0.0), atol=1e-7)
    with pytest.raises(ValueError, match="row 0 is empty"):
        am = result["amask"].copy()
        am[0] = False
        F.information_flow(result["jm"], result["ids"], result["pix"], am, attention_mask=result["mask"])
    with pytest.raises(ValueError, match="score"):
        F.information_flow(result["jm"], result["ids"], result["pix"], result["amask"], score="x")
