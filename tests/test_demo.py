"""The tiny random model's determinism, a checkpoint round trip of the embedded (toy) model, and the demo
script end to end."""
import json
import os
import subprocess
import sys

import numpy as np

import jaxflow
from jaxflow import tiny
from jaxflow.pipeline import encode, load_bundle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "demo.py"), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def test_tiny_model_is_deterministic():
    a, b = tiny.tiny_model(0), tiny.tiny_model(0)
    pa = jaxflow.convert.checkpoint.model_params(a)
    pb = jaxflow.convert.checkpoint.model_params(b)
    for x, y in zip(jax_leaves(pa), jax_leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def test_save_and_load_round_trip(tmp_path):
    bundle = load_bundle(None)
    batch, pixels = encode(bundle, [tiny.DEMO_IMAGE, tiny.DEMO_IMAGE], ["Is there a red circle?", "What colour?"])
    want = np.asarray(jaxflow.forward(bundle.model, batch.input_ids, pixels, batch.attention_mask).logits)
    path = jaxflow.save_model(bundle.model, str(tmp_path / "toy"))
    bundle.tokenizer.save_pretrained(path)
    back = load_bundle(path)
    got = np.asarray(jaxflow.forward(back.model, batch.input_ids, pixels, batch.attention_mask).logits)
    np.testing.assert_array_equal(got, want)
    assert back.tokenizer("a red circle").input_ids == bundle.tokenizer("a red circle").input_ids


def test_demo_script_default(tmp_path):
    out = tmp_path / "demo"
    res = _run(f"--out={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "model_input.png").stat().st_size > 1000
    assert summary["model"] == "toy-llava"
    spans = summary["spans"][0]
    n_img = summary["num_image_tokens"]
    assert n_img == 64 and spans["image"][1] - spans["image"][0] == n_img
    # the groups tile the sequence in order S, T, U, A
    assert spans["system"][0] == 0 and spans["system"][1] == spans["image"][0]
    assert spans["image"][1] == spans["user"][0] and spans["user"][1] == spans["answer"][0]
    assert spans["answer"][1] == len(summary["input_ids"])
    assert summary["input_ids"][spans["answer"][0]:] == summary["answer_ids"]
    # the answer is the model's greedy continuation of the prompt
    bundle = load_bundle(None)
    batch, pixels = encode(bundle, [tiny.DEMO_IMAGE], [summary["question"]])
    gen = jaxflow.generate(bundle.model, batch.input_ids, pixels, batch.attention_mask, max_new_tokens=16)
    assert gen.tokens[0, :len(summary["answer_ids"])].tolist() == summary["answer_ids"]
    assert "answer:" in res.stdout and "wrote" in res.stdout
    # the analyses: every figure and the truncation report
    for name in ("cam_paper.png", "cam_gradcam.png", "attention_shares.png", "image_attention.png", "flows.png",
                 "arrays.npz", "summary.json"):
        assert (out / "analysis" / name).stat().st_size > 1000, name
    trunc = json.loads((out / "truncation" / "answers.json").read_text())
    assert trunc["layers"] == [0, 1, 2, 3, 4] and trunc["answers"][-1] == summary["answer"]
    assert summary["truncation"]["cliff_layer"] == trunc["cliff_layer"]
    # the instruments beyond the paper: knockout per path and window, the logit lens
    ko = json.loads((out / "knockout" / "knockout.json").read_text())
    assert summary["knockout"]["change_percent"]["image->question"] == \
        [round(v, 2) for v in ko["change_percent"]["image->question"]]
    assert (out / "knockout" / "knockout.png").stat().st_size > 1000
    lens = json.loads((out / "logit_lens" / "summary.json").read_text())
    assert (out / "logit_lens" / "answer_lens.png").stat().st_size > 1000 and lens
    assert "knockout:" in res.stdout


def test_demo_script_bad_inputs(tmp_path):
    for args, phrase in ((["--image=/nonexistent.png"], "image not found"),
                         (["--question=Hi", "--analyses", "--max_new_tokens=0"], "max_new_tokens"),
                         (["--question= "], "question is empty"),
                         ([f"--checkpoint={tmp_path}/missing"], "checkpoint not found")):
        res = _run(*args, f"--out={tmp_path}/o")
        assert res.returncode == 2, res.stderr[-2000:]
        assert res.stderr.strip().splitlines()[-1].startswith("error:") and phrase in res.stderr
        assert not (tmp_path / "o").exists()
