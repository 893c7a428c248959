"""Toy evaluation sets: written in real file formats, read by the loaders, scored by worked examples."""
import json
import os

import numpy as np
import pytest

from jaxflow.data.datasets import load_dataset
from jaxflow.metrics import score, toy_caption_metrics, toy_mentions
from jaxflow.toy.sets import write_toy_captions, write_toy_pope


def test_toy_pope_files_load_as_pope(tmp_path):
    data_dir, image_dir = write_toy_pope(str(tmp_path), n_per_split=6, seed=1)
    ds = load_dataset("toy_pope", data_dir, image_dir)
    assert len(ds) == 18
    assert {it.split for it in ds} == {"random", "popular", "adversarial"}
    assert [it.answers[0] for it in ds][:6] == ["yes", "no"] * 3  # balanced, alternating
    for it in ds:
        assert it.formatted_question == it.question  # the toy model was trained without LLaVA's suffix
    # every yes-question names an object that is in its image, every no-question one that is not
    boxes = {r["image"]: r for r in map(json.loads, open(f"{data_dir}/boxes.jsonl"))}
    for it in ds:
        words = it.question.rstrip("?").split()
        asked = (words[3], words[4])
        present = {(o["color"], o["shape"]) for o in boxes[it.metadata["image_file"]]["objects"]}
        assert (asked in present) == (it.answers[0] == "yes"), it.question
    # deterministic
    again = write_toy_pope(str(tmp_path / "b"), n_per_split=6, seed=1)
    assert open(f"{again[0]}/coco_pope_random.json").read() == open(f"{data_dir}/coco_pope_random.json").read()


def test_toy_captions_load_and_score(tmp_path):
    data_dir, image_dir = write_toy_captions(str(tmp_path), n=5)
    ds = load_dataset("toy_caption", data_dir, image_dir)
    assert len(ds) == 5
    rows = [json.loads(line) for line in open(f"{data_dir}/toy_captions.jsonl")]
    # the gold caption scores perfectly
    gold = {it.id: r["caption"] for it, r in zip(ds, rows)}
    m = score("toy_caption", gold, ds.items)
    assert m == {"chair_s": 0.0, "chair_i": 0.0, "recall": 1.0, "exact": 1.0, "empty_ratio": 0.0}


def test_toy_caption_metric_worked_example():
    refs = {"a": ["red circle", "blue square"], "b": ["green triangle"]}
    preds = {"a": "a red circle and a green square", "b": "two green triangles and a red circle"}
    # a: mentions red circle (ok), green square (hallucinated); b: green triangle (ok), red circle (halluc.)
    assert toy_mentions(preds["b"]) == ["green triangle", "red circle"]
    m = toy_caption_metrics(preds, refs)
    assert m["chair_i"] == pytest.approx(2 / 4)
    assert m["chair_s"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["exact"] == 0.0
    # an empty caption hallucinates nothing (CHAIR 0) but covers nothing: recall 0, empty_ratio 1
    assert toy_caption_metrics({"a": "nothing here"}, {"a": ["red circle"]}) == \
        {"chair_s": 0.0, "chair_i": 0.0, "recall": 0.0, "exact": 0.0, "empty_ratio": 1.0}


def test_toy_caption_loader_errors(tmp_path):
    (tmp_path / "toy_captions.jsonl").write_text('{"id": "x", "image": "a.png", "objects": [{"color": "red"}]}\n')
    from jaxflow.data.datasets import DatasetError

    with pytest.raises(DatasetError, match=r"toy_captions.jsonl:1: missing field 'shape'"):
        load_dataset("toy_caption", str(tmp_path), str(tmp_path), check_images=False)


def test_runner_generates_and_scores_toy_sets(tmp_path):
    """--dataset toy_pope / toy_caption without data files: generated under the run directory, scored
    by the right metric; the per-item scores agree with the data set metric."""
    from jaxflow.evaluation import EvalConfig, read_records, run_evaluation

    for ds, primary in (("toy_pope", "f1"), ("toy_caption", "chair_s")):
        res = run_evaluation(EvalConfig(dataset=ds, out=str(tmp_path / ds), sweep="0,2", batch_size=4,
                                        options={"n": 2}, max_new_tokens=4, progress=False))
        s = res.summary
        assert s["primary_metric"] == primary and s["layers"] == [0, 2, 4]
        assert s["n_items"] == (6 if ds == "toy_pope" else 2)
        assert s["params"]["options"] == {"n": 2} and s["params"]["seed"] == 0
        assert os.path.isdir(tmp_path / ds / "toy_data" / "images")
        recs = read_records(res.files["predictions"])
        assert len(recs) == 3 * s["n_items"]
        if ds == "toy_pope":  # accuracy is the mean per-item score
            for row in s["per_layer"]:
                mean = np.mean([r["score"] for r in recs if r["K"] == row["K"]])
                assert row["metrics"]["accuracy"] == pytest.approx(mean)
        else:
            for row in s["per_layer"]:
                mean = np.mean([r["score"] for r in recs if r["K"] == row["K"]])
                assert row["metrics"]["chair_s"] == pytest.approx(mean)


def test_evaluate_script_rejects_bad_toy_n(tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, os.path.join(repo, "scripts", "evaluate.py"), "--dataset=toy_pope",
                          "--toy_n=0", f"--out={tmp_path / 'x'}", "--noprogress"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and "n must be a positive integer" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_caption_summary_says_recall_when_captions_are_empty():
    from jaxflow.evaluation.cliff import build_summary

    # K = 1: every caption empty -> CHAIR_s 0 (looks perfect) but recall 0; K = 2: no empty caption
    per_k = {1: {"chair_s": 0.0, "chair_i": 0.0, "recall": 0.0, "exact": 0.0, "empty_ratio": 1.0},
             2: {"chair_s": 0.5, "chair_i": 0.25, "recall": 0.75, "exact": 0.5, "empty_ratio": 0.0}}
    s = build_summary(dataset="toy_caption", model="m", num_layers=2, layers=[1, 2], metrics_per_layer=per_k,
                      primary_metric="chair_s", epsilon=0.01, n_items=4, sweep="all")
    assert len(s["notes"]) == 1 and s["notes"][0].startswith("K = 1: 100% of the captions mention no object")
    assert "recall is 0.0000" in s["notes"][0]
    s = build_summary(dataset="toy_pope", model="m", num_layers=2, layers=[2], metrics_per_layer={2: {"f1": 1.0}},
                      primary_metric="f1", epsilon=0.01, n_items=4, sweep="none")
    assert "notes" not in s
