"""Faithfulness metrics: box geometry through preprocessing, pointing game and energy in box, on
hand-worked examples."""
import numpy as np
import pytest
from PIL import Image

from jaxflow.analysis.faithfulness import box_cells, energy_in_box, pointing_hits, read_box_samples
from jaxflow.data.image import ImageSpec, box_to_model_frame, preprocess_image


def test_box_cells_worked_example():
    # a 112 px image, 8x8 grid of 14 px cells; box covering x in [14, 35), y in [0, 14)
    cover, centre = box_cells((14, 0, 35, 14), (112, 112), (8, 8))
    assert cover[0, 1] == 1.0 and cover[0, 2] == pytest.approx(0.5) and cover[0, 0] == 0
    assert cover[1:].sum() == 0
    assert centre[0, 1] and not centre[0, 2]  # cell 2's centre is x = 35: outside [14, 35)
    assert centre.sum() == 1


def test_pointing_and_energy_worked_example():
    maps = np.zeros((2, 3, 2, 2), np.float32)
    maps[0, 0] = [[1, 0], [0, 0]]  # max in the box -> hit, energy 1
    maps[0, 1] = [[0, 1], [1, 2]]  # max outside -> miss, energy 0
    maps[0, 2] = 0  # all zero -> miss, energy 0
    maps[1, 0] = [[3, 1], [0, 0]]  # box covers half of cell (0,0) only
    maps[1, 1] = [[1, 1], [1, 1]]  # ties: first max (0,0) counts
    maps[1, 2] = [[0, 0], [0, 5]]
    cover = np.array([[[1, 0], [0, 0]], [[0.5, 0], [0, 0]]], np.float32)
    centre = np.array([[[1, 0], [0, 0]], [[1, 0], [0, 0]]], bool)
    hits = pointing_hits(maps, centre)
    np.testing.assert_array_equal(hits, [[True, False, False], [True, True, False]])
    np.testing.assert_allclose(energy_in_box(maps, cover), [[1, 0, 0], [1.5 / 4, 0.5 / 4, 0]])


def test_box_geometry_follows_preprocessing():
    """A box drawn on a non-square image lands where preprocess_image puts its pixels."""
    spec = ImageSpec.for_size(112)
    for size, pad in (((200, 150), False), ((150, 200), False), ((200, 150), True), ((90, 60), False)):
        img = Image.new("RGB", size, (0, 0, 0))
        box = (int(size[0] * 0.55), int(size[1] * 0.3), int(size[0] * 0.8), int(size[1] * 0.7))
        img.paste((255, 255, 255), box)
        arr = preprocess_image(img, ImageSpec.for_size(112, do_normalize=False), pad_square=pad)[0]
        x0, y0, x1, y1 = box_to_model_frame(box, size, spec, pad_square=pad)
        ys, xs = np.nonzero(arr > 0.5)
        # the bright region of the preprocessed image matches the mapped box to a pixel (resampling)
        assert abs(xs.min() - x0) <= 1.5 and abs(xs.max() + 1 - x1) <= 1.5, (size, pad, (x0, x1), xs.min(), xs.max())
        assert abs(ys.min() - y0) <= 1.5 and abs(ys.max() + 1 - y1) <= 1.5, (size, pad, (y0, y1), ys.min(), ys.max())


def test_read_box_samples_errors(tmp_path):
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    p = tmp_path / "boxes.jsonl"
    p.write_text('{"image": "a.png", "question": "Is there a cat?", "box": [1, 1, 5, 5]}\n')
    (s,) = read_box_samples(str(p))
    assert s.answer is None and s.box == (1.0, 1.0, 5.0, 5.0)
    p.write_text('{"image": "a.png", "question": "q", "box": [5, 1, 1, 5]}\n')
    with pytest.raises(ValueError, match=r"boxes.jsonl:1: \"box\" must be"):
        read_box_samples(str(p))
    p.write_text('{"image": "missing.png", "question": "q", "box": [1, 1, 5, 5]}\n')
    with pytest.raises(ValueError, match="image not found"):
        read_box_samples(str(p))


def test_faithfulness_end_to_end_default_model(tmp_path):
    """On the embedded (toy) model: per-sample hits/energies are those of the CAM maps `llava_cams` returns for the
    same inputs, the chance levels are the boxes' shares, and the script writes its files."""
    import json
    import os
    import subprocess
    import sys

    from jaxflow.analysis.cam import llava_cams
    from jaxflow.analysis.faithfulness import faithfulness
    from jaxflow.pipeline import encode, load_bundle
    from jaxflow.toy.sets import faithfulness_samples

    bundle = load_bundle(None)
    samples = faithfulness_samples(5, seed=3)
    res = faithfulness(bundle, samples, ("paper", "gradcam"), batch_size=3)
    assert res.n == 5 and res.pointing["paper"].shape == (bundle.config.text.num_layers,)
    areas = [(s.box[2] - s.box[0]) * (s.box[3] - s.box[1]) / 112 ** 2 for s in samples]
    assert res.chance_energy == pytest.approx(np.mean(areas))
    batch, pixels = encode(bundle, [s.image for s in samples], [s.question for s in samples],
                           answers=[s.answer for s in samples])
    maps = llava_cams(bundle.model, batch.input_ids, pixels, batch.answer_mask, ("gradcam",),
                      attention_mask=batch.attention_mask).maps["gradcam"]  # (N, L, 8, 8)
    for i, s in enumerate(samples):
        cover, centre = box_cells(s.box, (112, 112), (8, 8))
        for layer in range(maps.shape[1]):
            m = maps[i, layer]
            hit = m.max() > 0 and bool(centre.ravel()[m.argmax()])
            assert res.hits["gradcam"][i, layer] == hit
            want = (m * cover).sum() / m.sum() if m.sum() > 0 else 0.0
            assert res.energies["gradcam"][i, layer] == pytest.approx(want, abs=1e-5)

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "faith"
    run = subprocess.run([sys.executable, os.path.join(repo, "scripts", "faithfulness.py"), "--n=4", "--batch_size=4",
                          f"--out={out}", "--methods=gradcam"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 4 and list(summary["per_method"]) == ["gradcam"]
    assert (out / "faithfulness.png").stat().st_size > 1000 and (out / "per_sample.npz").exists()
    assert "chance: pointing" in run.stdout
    bad = subprocess.run([sys.executable, os.path.join(repo, "scripts", "faithfulness.py"), "--methods=nope",
                          f"--out={tmp_path / 'bad'}"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--methods must be among" in bad.stderr and not (tmp_path / "bad").exists()
