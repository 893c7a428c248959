"""The pipelines on Qwen2-VL and Qwen2.5-VL (tiny random checkpoints with a tokenizer, a chat template
and an image processor): `scripts/evaluate.py --dataset pope` with images of different sizes in one
batch (its batched, truncation-generated K = L answers equal the plain model on each item alone), and
the demo (answer, analyses over the original image on the image's own grid, truncation sweep)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxflow import tiny
from jaxflow.data.datasets import load_dataset
from jaxflow.data.fixtures import write_fixtures
from jaxflow.evaluation import read_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("version", ["qwen2_vl", "qwen2_5_vl"])
def test_evaluate_pope_script(tiny_qwen2_vl_checkpoints, tmp_path, version):
    from jaxflow.pipeline import answer, load_bundle

    ckpt = tiny_qwen2_vl_checkpoints[version]
    out = tmp_path / "pope"
    res = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), "--dataset=pope",
                          f"--checkpoint={ckpt}", f"--out={out}", "--progress=false", "--batch_size=3",
                          "--max_new_tokens=4"], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cliff layer:" in res.stdout
    s = json.load(open(out / "summary.json"))
    assert s["layers"] == [0, 1, 2, 3, 4] and s["n_items"] > 0
    assert json.load(open(out / "run.json"))["params"]["template"] == "qwen2_vl"
    bundle = load_bundle(ckpt)
    fx = write_fixtures(str(tmp_path / "fx"))["pope"]
    recs = {(r["id"], r["K"]): r for r in read_records(str(out / "predictions.jsonl"))}
    for it in load_dataset("pope", *fx, limit=3):
        got = answer(bundle, [it.image], [it.formatted_question], max_new_tokens=4)
        assert got.texts[0] == recs[(it.id, 4)]["prediction"], it.id


def test_runner_batches_images_of_different_sizes(tiny_qwen2_vl_checkpoints, tmp_path):
    """Rows whose images give different token counts share a batch; each row's answers for every K
    equal that row alone."""
    import dataclasses

    from jaxflow.evaluation.runner import generate_batch, prepare_batch
    from jaxflow.pipeline import load_bundle

    bundle = load_bundle(tiny_qwen2_vl_checkpoints["qwen2_vl"])
    fx = write_fixtures(str(tmp_path / "fx"))["pope"]
    items = list(load_dataset("pope", *fx, limit=2))
    for it, size in zip(items, ((150, 60), (60, 90))):
        path = str(tmp_path / f"img{len(str(size))}_{size[0]}.png")
        Image.open(it.image).convert("RGB").resize(size).save(path)
        object.__setattr__(it, "image", path) if dataclasses.is_dataclass(it) else setattr(it, "image", path)
    batch = prepare_batch(bundle, items, rows=3)
    grid = batch.image_kw["image_grid_thw"]
    assert len({int(np.prod(g)) for g in grid[:2]}) == 2 and grid.shape == (3, 3)
    both = generate_batch(bundle, batch, [0, 2, 4], max_new_tokens=3)
    for i, it in enumerate(items):
        alone = generate_batch(bundle, prepare_batch(bundle, [it], rows=1), [0, 2, 4], max_new_tokens=3)
        for k in (0, 2, 4):
            assert both[k][i] == alone[k][0], (it.id, k)


def test_demo_on_a_wide_image(tiny_qwen2_vl_checkpoints, tmp_path):
    from jaxflow.demo import run_demo
    from jaxflow.pipeline import encode_images, load_bundle

    ckpt = tiny_qwen2_vl_checkpoints["qwen2_5_vl"]
    image = str(tmp_path / "wide.png")
    tiny.make_demo_image().resize((150, 60), Image.BICUBIC).save(image)
    out = tmp_path / "demo"
    run_demo(ckpt, image, "Is there a red circle in the image?", out=str(out), max_new_tokens=3, progress=None)
    summary = json.load(open(out / "summary.json"))
    lay = encode_images(load_bundle(ckpt), [image]).layouts[0]
    assert summary["family"] == "qwen2_5_vl" and summary["template"] == "qwen2_vl"
    assert summary["grid"] == list(lay.token_grid) and summary["num_image_tokens"] == lay.num_tokens
    view = np.asarray(Image.open(out / "model_input.png"))
    assert view.shape[:2] == tuple(lay.resized_hw)  # the patches put back at their places
    arrays = np.load(out / "analysis" / "arrays.npz")
    cam = next(arrays[k] for k in arrays.files if k.startswith("cam_"))
    assert cam.shape[-2:] == tuple(lay.token_grid)
    assert (out / "truncation" / "sweep.png").exists()
