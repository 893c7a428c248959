"""The demo, analyze, truncation-sweep and faithfulness scripts' library functions on the second family:
a tiny random InternVL on non-square images (several tiles and a thumbnail). Maps lie on the stitched
tile grid, are drawn over the original image, and the JSON records each image's own grid and tokens."""
import json

import numpy as np
import pytest

from jaxflow.outputs import MANIFEST  # noqa: E402
from PIL import Image

from jaxflow import tiny
from jaxflow.data.internvl_image import tile_boxes

QUESTION = "Is there a red circle in the image?"
WIDE = (150, 60)  # -> 1 x 3 tiles + thumbnail: a 2 x 6 grid of the tiny model's 2 x 2 tokens per tile
TALL = (60, 150)  # -> 3 x 1 tiles + thumbnail: 6 x 2


def _scaled_box(box, size):
    sx, sy = size[0] / tiny.TINY_IMAGE_SIZE, size[1] / tiny.TINY_IMAGE_SIZE
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_internvl_checkpoint):
    root = tmp_path_factory.mktemp("scripts-internvl")
    ckpt = tiny_internvl_checkpoint
    images = {}
    for name, size in (("wide", WIDE), ("tall", TALL)):
        images[name] = str(root / f"{name}.png")
        tiny.make_demo_image().resize(size, Image.BICUBIC).save(images[name])
    return root, ckpt, images


@pytest.fixture(scope="module")
def bundle(setup):
    from jaxflow.pipeline import load_bundle

    return load_bundle(setup[1])


@pytest.fixture(scope="module")
def demo(setup):
    from jaxflow.demo import run_demo

    root, ckpt, images = setup
    out = root / "demo"
    return out, run_demo(ckpt, images["wide"], QUESTION, out=str(out), max_new_tokens=3, progress=None)


def test_image_box_cells_scale_the_box_onto_the_stitched_grid():
    from jaxflow.analysis.faithfulness import image_box_cells

    # 150 x 60 image, 2 x 6 grid: cells of 25 x 30 px
    cover, centre = image_box_cells((25, 0, 62.5, 30), WIDE, (2, 6))
    assert cover[0, 1] == 1 and cover[0, 2] == pytest.approx(0.5) and cover.sum() == pytest.approx(1.5)
    assert centre[0, 1] and centre.sum() == 1  # cell 2's centre x = 62.5 is outside [25, 62.5)
    cover, centre = image_box_cells((-10, -10, 25, 30), WIDE, (2, 6))  # clipped to the image
    assert cover[0, 0] == 1 and cover.sum() == 1 and centre.sum() == 1


def test_llava_maps_cover_the_region_of_the_original_that_the_model_input_shows():
    """The other family's overlays, for contrast: the centre crop (or the padded square) mapped back."""
    from jaxflow.data.image import ImageSpec, box_to_model_frame, model_input_box
    from jaxflow.viz.figures import MapImage, map_raster

    spec = ImageSpec.for_size(112)
    assert model_input_box(WIDE, spec) == (45.0, 0.0, 105.0, 60.0)  # 280 x 112 resized, 84 px cut each side
    assert model_input_box(WIDE, spec, pad_square=True) == (0.0, -45.0, 150.0, 105.0)
    for size, pad in ((WIDE, False), (TALL, False), (WIDE, True), ((640, 480), False)):
        assert box_to_model_frame(model_input_box(size, spec, pad), size, spec, pad) == (0, 0, 112, 112)
    raster = map_raster(MapImage(np.zeros((60, 150, 3), np.uint8), (45.0, 0.0, 105.0, 60.0)), np.ones((8, 8)))
    assert raster.shape == (60, 150) and (raster[:, 45:105] == 1).all()
    assert np.isnan(raster[:, :45]).all() and np.isnan(raster[:, 105:]).all()


def test_demo_summary_uses_the_images_own_grid(demo, bundle):
    out, s = demo
    assert s["family"] == "internvl" and s["tiles"] == {"rows": 1, "cols": 3, "thumbnail": True}
    side = bundle.config.tile_side
    assert s["grid"] == [1 * side, 3 * side] == [2, 6]
    image = s["spans"][0]["image"]
    assert s["num_image_tokens"] == image[1] - image[0] == (3 + 1) * side * side
    # model_input.png: the three tiles in a row, then the thumbnail (4 px gaps, 3 gaps before the thumbnail)
    with Image.open(out / "model_input.png") as im:
        assert im.size == (3 * 56 + 2 * 4 + 3 * 4 + 56, 56)
    trunc = json.loads((out / "truncation" / "answers.json").read_text())
    assert trunc["family"] == "internvl" and trunc["layers"] == [0, 1, 2, 3, 4]
    assert trunc["answers"][-1] == s["answer"] and trunc["num_image_tokens"] == s["num_image_tokens"]
    assert (out / "truncation" / "sweep.png").stat().st_size > 1000


def test_analysis_maps_lie_on_the_stitched_grid_over_the_original_image(demo):
    out, _ = demo
    a = out / "analysis"
    s = json.loads((a / "summary.json").read_text())
    assert s["grid"] == [2, 6] and s["num_image_tokens"] == 16 and s["family"] == "internvl"
    assert s["image_size"] == list(WIDE) and s["map_box"] == [0, 0, WIDE[0], WIDE[1]]
    assert sorted(s["files"]) == sorted(p.name for p in a.iterdir() if p.name != MANIFEST)
    for name in s["files"]:
        assert (a / name).stat().st_size > 1000, name
    arrays = np.load(a / "arrays.npz")
    L = s["num_layers"]
    for m in s["methods"]:
        assert arrays[f"cam_{m}"].shape == (L, 2, 6) and np.isfinite(arrays[f"cam_{m}"]).all()
        assert arrays[f"cam_{m}_tokens"].shape == (len(s["answer_ids"]), L, 2, 6)
        assert all(0 <= r < 2 and 0 <= c < 6 for r, c in s["cam_peak"][m])
    assert arrays["image_attention"].shape == (L, 2, 6) and (arrays["image_attention"] > 0).all()


def test_overlays_cover_the_original_image(setup, bundle, demo):
    from jaxflow.pipeline import encode_images
    from jaxflow.viz import figures as V
    from jaxflow.viz.report import map_image

    _, _, images = setup
    frame = map_image(bundle, images["wide"])
    assert frame.image.shape == (WIDE[1], WIDE[0], 3) and frame.canvas == (0, 0) + WIDE
    cam = np.load(demo[0] / "analysis" / "arrays.npz")["cam_paper"]
    fig = V.layer_grid_figure(frame, cam, title="t")
    under, over = fig.axes[0].images
    assert under.get_array().shape == (WIDE[1], WIDE[0], 3) and over.get_array().shape == (WIDE[1], WIDE[0])
    assert tuple(over.get_extent()) == tuple(under.get_extent()) == (0, WIDE[0], WIDE[1], 0)
    # a map hot on the last tile's cells is drawn over that tile's part of the original image
    layout = encode_images(bundle, [images["wide"]]).layouts[0]
    hot = np.zeros((2, 6), np.float32)
    hot[:, 4:] = 1
    raster = V.map_raster(frame, hot)
    assert not np.isnan(raster).any()
    x0, _, x1, _ = tile_boxes(layout)[2]
    assert (raster[:, int(np.ceil(x0 + 12.5)):] == 1).all() and (raster[:, :int(x0 - 12.5)] == 0).all()


def test_pad_square_is_refused_with_one_line(setup):
    from jaxflow.analysis.faithfulness import run_faithfulness
    from jaxflow.analysis.sweep_report import run_sweep_report
    from jaxflow.demo import DemoError, run_demo
    from jaxflow.viz.report import AnalyzeError, run_analysis

    root, ckpt, images = setup
    calls = [
        (DemoError, lambda o: run_demo(ckpt, images["wide"], QUESTION, out=o, pad_square=True, progress=None)),
        (AnalyzeError, lambda o: run_analysis(ckpt, images["wide"], QUESTION, out=o, pad_square=True,
                                              progress=None)),
        (ValueError, lambda o: run_sweep_report(ckpt, images["wide"], QUESTION, out=o, pad_square=True)),
        (ValueError, lambda o: run_faithfulness(ckpt, out=o, n=1, pad_square=True, progress=False)),
    ]
    for i, (err, call) in enumerate(calls):
        with pytest.raises(err, match="pad_square is LLaVA-only") as e:
            call(str(root / f"pad{i}"))
        assert "\n" not in str(e.value)
        assert not (root / f"pad{i}").exists()


def test_faithfulness_on_tiled_images(setup, bundle):
    from jaxflow.analysis.faithfulness import BoxSample, faithfulness, image_box_cells, run_faithfulness

    root, ckpt, images = setup
    red = tiny.DEMO_OBJECTS[0][2]
    boxes = root / "boxes.jsonl"
    with open(boxes, "w") as f:
        for name, size in (("wide", WIDE), ("tall", TALL)):
            f.write(json.dumps({"image": images[name], "question": QUESTION, "answer": "yes",
                                "box": list(_scaled_box(red, size))}) + "\n")
    # one batch holding a 2 x 6 and a 6 x 2 grid (maps padded to 6 x 6)
    res, files = run_faithfulness(ckpt, out=str(root / "faith"), boxes=str(boxes), methods=("paper", "gradcam"),
                                  batch_size=2, progress=False)
    L = bundle.config.text.num_layers
    summary = json.loads(open(files[0]).read())
    assert summary["n"] == 2 and summary["family"] == "internvl"
    for m in ("paper", "gradcam"):
        assert res.hits[m].shape == res.energies[m].shape == (2, L)
        assert np.isfinite(res.energies[m]).all() and ((res.energies[m] >= 0) & (res.energies[m] <= 1 + 1e-6)).all()
        assert np.isfinite(summary["per_method"][m]["pointing"]).all()
        assert np.isfinite(summary["per_method"][m]["energy"]).all()
    # chance levels: the boxes on each image's own stitched grid, and their share of the image
    grids = {"wide": (2, 6), "tall": (6, 2)}
    want = [image_box_cells(_scaled_box(red, size), size, grids[n])[1].mean() for n, size in
            (("wide", WIDE), ("tall", TALL))]
    assert res.chance_pointing == pytest.approx(np.mean(want))
    area = (red[2] - red[0]) * (red[3] - red[1]) / tiny.TINY_IMAGE_SIZE ** 2
    assert res.chance_energy == pytest.approx(area)
    # scoring each row on its own grid: the batch gives what each sample gives alone
    samples = [BoxSample(images[n], QUESTION, _scaled_box(red, s), "yes") for n, s in (("wide", WIDE), ("tall", TALL))]
    alone = faithfulness(bundle, samples[1:], ("gradcam",), batch_size=1)
    np.testing.assert_array_equal(alone.hits["gradcam"][0], res.hits["gradcam"][1])
    np.testing.assert_allclose(alone.energies["gradcam"][0], res.energies["gradcam"][1], atol=1e-5)
