"""The pipelines on Qwen-VL (v1): a tiny random checkpoint with a tokenizer (16 resampler queries on a 4x4
grid, seq_length 48 so every prompt runs with dynamic NTK and logn attention), the official evaluation's
prompt wording per data set, `scripts/evaluate.py` (its batched truncation-generated K = L answers equal
the plain model on each item alone), the demo, and the converter on an official directory with its
tokenizer (qwen.tiktoken becomes a tokenizer.json that loads without remote code)."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np

import jaxflow
import qwen_vl_reference as QR
from jaxflow.data.datasets import load_dataset, qwen_vl_question, template_question
from jaxflow.data.datasets._common import Item
from jaxflow.data.fixtures import write_fixtures
from jaxflow.data.prompts import format_prompt
from jaxflow.evaluation import read_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _item(dataset, question="Is there a dog in the image?", **meta):
    return Item(id="1", dataset=dataset, image="x.png", question=question, formatted_question="LLAVA FORM",
                answers=("yes",), split="s", metadata=meta)


def test_official_question_wording_per_data_set():
    # eval_mm/evaluate_vqa.py: '<img>{}</img>{} Answer:' (TextVQA; POPE has no script, the same VQA form)
    assert format_prompt(qwen_vl_question(_item("pope")), "qwen_vl", "<imgpad>") == \
        "<img><imgpad></img>Is there a dog in the image? Answer:"
    assert format_prompt(qwen_vl_question(_item("textvqa", "what is written?")), "qwen_vl", "<imgpad>") == \
        "<img><imgpad></img>what is written? Answer:"
    # eval_mm/evaluate_multiple_choice.py: Context (hint, or N/A when empty), Question, Options joined by
    # newlines, then "\nAnswer:" -- which already ends in ":", so no " Answer:" is added
    sqa = _item("scienceqa", "Which is a mammal?", choices=["cat", "trout"], hint="")
    assert format_prompt(qwen_vl_question(sqa), "qwen_vl", "<imgpad>") == (
        "<img><imgpad></img>Context: N/A\nQuestion: Which is a mammal?\nOptions: A. cat\nB. trout\nAnswer:")
    sqa = _item("scienceqa", "Which is a mammal?", choices=["cat", "trout", "eel"], hint="Look closely.")
    assert qwen_vl_question(sqa) == "Context: Look closely.\nQuestion: Which is a mammal?\nOptions: A. cat\nB. trout\n" \
                                    "C. eel\nAnswer:"
    # eval_mm/evaluate_caption.py
    cap = _item("chair", "Please describe this image in detail.")
    assert format_prompt(qwen_vl_question(cap), "qwen_vl", "<imgpad>") == \
        "<img><imgpad></img>Describe the image in English:"
    # every other template keeps LLaVA's wording
    assert template_question(_item("pope"), "vicuna_v1") == "LLAVA FORM"
    assert template_question(_item("pope"), "qwen_vl") == "Is there a dog in the image?"


def test_evaluate_pope_script(tiny_qwen_vl_checkpoint, tmp_path):
    from jaxflow.pipeline import answer, load_bundle

    ckpt = tiny_qwen_vl_checkpoint
    out = tmp_path / "pope"
    res = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), "--dataset=pope",
                          f"--checkpoint={ckpt}", f"--out={out}", "--progress=false", "--batch_size=3",
                          "--max_new_tokens=4"], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cliff layer:" in res.stdout
    s = json.load(open(out / "summary.json"))
    assert s["layers"] == [0, 1, 2, 3, 4] and s["n_items"] > 0
    assert json.load(open(out / "run.json"))["params"]["template"] == "qwen_vl"
    bundle = load_bundle(ckpt)
    fx = write_fixtures(str(tmp_path / "fx"))["pope"]
    recs = {(r["id"], r["K"]): r for r in read_records(str(out / "predictions.jsonl"))}
    for it in load_dataset("pope", *fx, limit=3):
        got = answer(bundle, [it.image], [template_question(it, "qwen_vl")], max_new_tokens=4)
        assert got.texts[0] == recs[(it.id, 4)]["prediction"], it.id


def test_demo(tiny_qwen_vl_checkpoint, tmp_path):
    from jaxflow import tiny
    from jaxflow.demo import run_demo

    out = tmp_path / "demo"
    run_demo(tiny_qwen_vl_checkpoint, tiny.DEMO_IMAGE, tiny.DEMO_QUESTION, out=str(out), max_new_tokens=3,
             progress=None)
    summary = json.load(open(out / "summary.json"))
    assert summary["family"] == "qwen_vl" and summary["template"] == "qwen_vl"
    assert summary["grid"] == [4, 4] and summary["num_image_tokens"] == 16
    arrays = np.load(out / "analysis" / "arrays.npz")
    cam = next(arrays[k] for k in arrays.files if k.startswith("cam_"))
    assert cam.shape[-2:] == (4, 4) and np.isfinite(cam).all()
    assert (out / "truncation" / "sweep.png").exists()


def test_converter_turns_the_official_tokenizer_into_tokenizer_json(tmp_path):
    """An official directory (qwen.tiktoken + a tokenizer_config.json naming remote code) converts to a
    checkpoint whose tokenizer loads with AutoTokenizer, without remote code, and gives the official ids."""
    src = tmp_path / "official"
    shutil.copytree(QR.model_dir(), src)
    with gzip.open(os.path.join(QR.GOLDEN_DIR, "qwen.tiktoken.gz")) as f:
        (src / "qwen.tiktoken").write_bytes(f.read())
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "QWenTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}))
    out = jaxflow.convert_checkpoint(str(src), str(tmp_path / "jf"), progress=False)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    assert "auto_map" not in open(os.path.join(out, "tokenizer_config.json")).read()
    tok = jaxflow.load_tokenizer(out)
    cases = json.load(open(os.path.join(QR.GOLDEN_DIR, "tokenizer_cases.json")))["cases"]
    plain = [c for c in cases if "<img>" not in c["text"]][:20]
    for c in plain:
        assert tok(c["text"], add_special_tokens=False)["input_ids"] == c["ids"], c["text"]
    assert tok.convert_tokens_to_ids(["<img>", "</img>", "<imgpad>"]) == [151857, 151858, 151859]
