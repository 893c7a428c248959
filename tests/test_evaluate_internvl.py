"""The evaluation runner on the second family: `scripts/evaluate.py --dataset pope` on a tiny random
InternVL (tiled images of different aspect ratios, so rows hold different numbers of image tokens)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from jaxflow.data.datasets import load_dataset
from jaxflow.data.fixtures import write_fixtures
from jaxflow.evaluation import read_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluate_pope_script_on_internvl(tiny_internvl_checkpoint, tmp_path):
    from jaxflow.pipeline import answer, load_bundle

    out = tmp_path / "pope"
    res = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), "--dataset=pope",
                          f"--checkpoint={tiny_internvl_checkpoint}", f"--out={out}", "--progress=false",
                          "--batch_size=3", "--max_new_tokens=4"],
                         capture_output=True, text=True, cwd=REPO, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cliff layer:" in res.stdout
    s = json.load(open(out / "summary.json"))
    assert s["layers"] == [0, 1, 2, 3, 4] and s["n_items"] > 0
    run = json.load(open(out / "run.json"))
    assert run["params"]["template"] == "internvl"
    # the batched, tiled, truncation-generated K = L answers equal the plain model on each item alone
    bundle = load_bundle(tiny_internvl_checkpoint)
    fx = write_fixtures(str(tmp_path / "fx"))["pope"]
    recs = {(r["id"], r["K"]): r for r in read_records(str(out / "predictions.jsonl"))}
    items = list(load_dataset("pope", *fx, limit=3))
    counts = set()
    for it in items:
        got = answer(bundle, [it.image], [it.formatted_question], max_new_tokens=4)
        assert got.texts[0] == recs[(it.id, 4)]["prediction"], it.id
        from jaxflow.pipeline import encode_images

        counts.add(int(encode_images(bundle, [it.image]).counts[0]))
    assert len(counts) > 1 or max(counts) > 1, "the fixtures should exercise several tiles"
