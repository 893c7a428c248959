"""The per-image truncation report, the cliff definition, and scripts/truncation_sweep.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jaxflow
from jaxflow import tiny
from jaxflow.analysis.sweep_report import sweep_report
from jaxflow.evaluation.cliff import cliff_layer
from jaxflow.pipeline import encode, load_bundle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("values,eps,want", [
    # baseline is the last value (K = L = 4); walk down from K = 4 while within eps
    ([0.50, 0.60, 0.84, 0.85, 0.85], 0.02, 2),   # |0.84 - 0.85| <= .02, |0.60 - 0.85| > .02
    ([0.85, 0.85, 0.85, 0.85, 0.85], 0.0, 0),    # flat: the image never matters
    ([0.1, 0.9, 0.1, 0.9, 0.5], 0.1, 4),         # nothing else is near the baseline: cliff at L
    ([0.85, 0.2, 0.85, 0.86, 0.85], 0.02, 2),    # K = 0 is within eps but K = 1 is not: "for every K' >= K"
])
def test_cliff_layer_worked_examples(values, eps, want):
    assert cliff_layer(np.arange(5), values, eps) == want


def test_cliff_layer_order_and_errors():
    assert cliff_layer([4, 0, 2], [0.5, 0.1, 0.49], 0.02) == 2  # unsorted input is sorted by K
    with pytest.raises(ValueError):
        cliff_layer([0, 1], [0.1], 0.1)


def test_report_probabilities_match_reference_forward():
    bundle = load_bundle(None)
    q = "Is there a red circle in the image?"
    rep = sweep_report(bundle, tiny.DEMO_IMAGE, q, max_new_tokens=3, layers=[0, 2])
    L = bundle.config.text.num_layers
    assert list(rep.layers) == [0, 2, L]
    ref_ids = rep.answer_ids[-1]
    batch, pixels = encode(bundle, [tiny.DEMO_IMAGE], [q], [ref_ids])
    n = int(batch.attention_mask[0].sum())
    for v, k in enumerate(rep.layers):
        logits = np.asarray(jaxflow.forward(bundle.model, batch.input_ids, pixels, batch.attention_mask,
                                            truncate_at=int(k)).logits)[0]
        pred = logits[n - len(ref_ids) - 1:n - 1]  # positions predicting the answer tokens
        logp = pred - np.log(np.exp(pred - pred.max(-1, keepdims=True)).sum(-1, keepdims=True)) - pred.max(
            -1, keepdims=True)
        want = logp[np.arange(len(ref_ids)), ref_ids]
        np.testing.assert_allclose(rep.answer_logprob[v], want.sum(), atol=1e-4)
        np.testing.assert_allclose(rep.first_token_logprob[v], want[0], atol=1e-5)
    # the untruncated variant's greedy answer is the plain model's greedy answer
    batch, pixels = encode(bundle, [tiny.DEMO_IMAGE], [q])
    plain = jaxflow.generate(bundle.model, batch.input_ids, pixels, batch.attention_mask, max_new_tokens=3)
    assert plain.tokens[0, :len(ref_ids)].tolist() == ref_ids


def test_truncation_sweep_script(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, os.path.join(REPO, "scripts", "truncation_sweep.py"), f"--out={out}",
           "--max_new_tokens=3", "--layers=0,1,3"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((out / "answers.json").read_text())
    assert data["layers"] == [0, 1, 3, 4] and len(data["answers"]) == 4
    assert all(0 <= p <= 1 for p in data["first_token_probability"])
    assert data["cliff_layer"] in data["layers"]
    assert (out / "sweep.png").stat().st_size > 10_000
    assert "cliff layer" in res.stdout
    bad = subprocess.run(cmd[:2] + ["--image=/nope.png", f"--out={tmp_path}/x"], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "error: image not found" in bad.stderr and not (tmp_path / "x").exists()
    bad = subprocess.run(cmd[:2] + ["--layers=9", f"--out={tmp_path}/x"], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "cut layers K in 0..4" in bad.stderr and not (tmp_path / "x").exists()
