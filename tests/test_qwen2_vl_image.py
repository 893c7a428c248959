"""Qwen2-VL / Qwen2.5-VL image preprocessing against transformers' PIL-backend Qwen2VL image processor."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
from transformers.utils import is_torchvision_available

from jaxflow.data.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from jaxflow.data.qwen2_vl_image import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    QWEN2_VL_CHECKPOINT_MAX_PIXELS,
    Qwen2VLImageConfig,
    image_token_counts,
    patch_positions,
    preprocess_qwen2_vl,
    qwen2_vl_image_config,
    smart_resize,
)

# Qwen/Qwen2.5-VL-7B-Instruct's preprocessor_config.json (Qwen2-VL-7B-Instruct's differs only in
# processor_class).
QWEN25_VL_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_std": list(OPENAI_CLIP_STD),
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}

# small bounds so that both upscaling and downscaling happen on small test images
SMALL = {"min_pixels": 112 * 112, "max_pixels": 28 * 28 * 40}
TOL = 1e-5


def _rgb(w: int, h: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: gradients plus noise, so resampling matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([255 * x, 255 * y, 128 + 100 * np.sin(12 * x * y)], axis=-1)
    return np.clip(base + rng.normal(0, 25, size=(h, w, 3)), 0, 255).astype(np.uint8)


def _images() -> list[Image.Image]:
    rgba = np.concatenate([_rgb(150, 100, 3), np.linspace(0, 255, 150 * 100).reshape(100, 150, 1)], axis=-1)
    palette = Image.fromarray(_rgb(70, 50, 6)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    return [
        Image.fromarray(_rgb(10, 7, 0)),  # tiny: upscaled to reach min_pixels
        Image.fromarray(_rgb(400, 300, 1)),  # large: downscaled below max_pixels
        Image.fromarray(_rgb(900, 40, 2)),  # very wide (22.5 : 1)
        Image.fromarray(_rgb(50, 260, 4)),  # tall
        Image.fromarray(_rgb(120, 90, 5)).convert("L"),  # grayscale
        Image.fromarray(rgba.astype(np.uint8), "RGBA"),
        palette,  # palette with a transparent index
        Image.fromarray(_rgb(112, 140, 7)),  # already on the 28 grid
    ]


def _reference(raw: dict) -> Qwen2VLImageProcessorPil:
    skip = ("image_processor_type", "processor_class")
    return Qwen2VLImageProcessorPil(**{k: v for k, v in raw.items() if k not in skip})


def _ref_out(proc, images) -> tuple[np.ndarray, np.ndarray]:
    out = proc(images, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


@pytest.mark.parametrize(
    "raw",
    [
        SMALL,
        {**SMALL, "patch_size": 16, "merge_size": 2, "temporal_patch_size": 3},
        {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 100, "merge_size": 1, "resample": 2},
        {**SMALL, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 127.5},
    ],
)
def test_matches_transformers(raw):
    images = _images()
    cfg = qwen2_vl_image_config(raw)
    ref_pixels, ref_grid = _ref_out(_reference(raw), images)
    ours = preprocess_qwen2_vl(images, cfg)
    assert ours.pixel_values.dtype == np.float32 and ours.pixel_values.shape == ref_pixels.shape
    assert ours.pixel_values.shape[1] == cfg.patch_dim
    assert ours.image_grid_thw.dtype == np.int64
    np.testing.assert_array_equal(ours.image_grid_thw, ref_grid)
    assert np.abs(ours.pixel_values - ref_pixels).max() <= TOL
    # per-image geometry
    assert ours.original_hw.tolist() == [[im.height, im.width] for im in images]
    np.testing.assert_array_equal(ours.resized_hw, ref_grid[:, 1:] * cfg.patch_size)
    np.testing.assert_array_equal(ours.num_patches, ref_grid.prod(axis=1))
    np.testing.assert_array_equal(ours.num_tokens, ref_grid.prod(axis=1) // cfg.merge_size**2)
    np.testing.assert_array_equal(ours.token_grid, ref_grid[:, 1:] // cfg.merge_size)
    assert int(ours.num_patches.sum()) == len(ours.pixel_values)
    # what the processors use to count image tokens without an image
    proc = _reference(raw)
    assert [proc.get_number_of_image_patches(im.height, im.width, {}) for im in images] == ours.num_patches.tolist()
    # both directions of resizing happen on the SMALL bounds
    area = ours.original_hw.prod(axis=1)
    resized = ours.resized_hw.prod(axis=1)
    if raw is SMALL:
        assert resized[0] > area[0] and resized[0] >= cfg.min_pixels
        assert resized[1] < area[1] <= 1e9 and resized[1] <= cfg.max_pixels
        assert ours.image_grid_thw[2, 2] > 8 * ours.image_grid_thw[2, 1]  # the wide image stays wide
        assert ours.resized_hw[7].tolist() == [140, 112]  # on the grid and within bounds: unchanged


def test_batch_is_concatenation():
    images = _images()
    cfg = qwen2_vl_image_config(SMALL)
    batch = preprocess_qwen2_vl(images, cfg)
    singles = [preprocess_qwen2_vl(im, cfg) for im in images]
    np.testing.assert_array_equal(batch.pixel_values, np.concatenate([s.pixel_values for s in singles]))
    np.testing.assert_array_equal(batch.image_grid_thw, np.concatenate([s.image_grid_thw for s in singles]))
    for i, single in enumerate(singles):
        np.testing.assert_array_equal(batch.image_patches(i), single.pixel_values)
        assert batch.layouts[i] == single.layouts[0]
    # transformers' batch is the concatenation of its single-image calls too, and equals ours
    proc = _reference(SMALL)
    ref = [_ref_out(proc, [im])[0] for im in images]
    assert np.abs(np.concatenate(ref) - batch.pixel_values).max() <= TOL


def test_array_inputs():
    """(H, W, 3) and (H, W) uint8 arrays (channels last) equal the PIL images and transformers' array path."""
    arrays = [_rgb(130, 90, 11), _rgb(33, 61, 12), np.asarray(Image.fromarray(_rgb(70, 50, 13)).convert("L"))]
    cfg = qwen2_vl_image_config(SMALL)
    ours = preprocess_qwen2_vl(arrays, cfg)
    from_pil = preprocess_qwen2_vl([Image.fromarray(a) for a in arrays], cfg)
    np.testing.assert_array_equal(ours.pixel_values, from_pil.pixel_values)
    ref_pixels, ref_grid = _ref_out(_reference(SMALL), arrays[:2])
    n = int(ours.num_patches[:2].sum())
    np.testing.assert_array_equal(ours.image_grid_thw[:2], ref_grid)
    assert np.abs(ours.pixel_values[:n] - ref_pixels).max() <= TOL
    single = preprocess_qwen2_vl(arrays[0], cfg)  # a bare array is one image
    np.testing.assert_array_equal(single.pixel_values, ours.image_patches(0))


def test_checkpoint_config_matches_auto_processor(tmp_path):
    """A Qwen2.5-VL preprocessor_config.json: AutoImageProcessor picks the PIL class without
    torchvision, and our config and pixels agree with it."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(QWEN25_VL_CONFIG))
    proc = AutoImageProcessor.from_pretrained(tmp_path)
    if not is_torchvision_available():
        assert type(proc) is Qwen2VLImageProcessorPil
    cfg = qwen2_vl_image_config(tmp_path)
    assert cfg == qwen2_vl_image_config(QWEN25_VL_CONFIG)
    assert (cfg.min_pixels, cfg.max_pixels) == (proc.size.shortest_edge, proc.size.longest_edge)
    assert cfg.max_pixels == QWEN2_VL_CHECKPOINT_MAX_PIXELS
    assert (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size) == (14, 2, 2)
    assert cfg.image_mean == tuple(proc.image_mean) and cfg.image_std == tuple(proc.image_std)
    assert (cfg.resample, cfg.rescale_factor) == (proc.resample, proc.rescale_factor)
    images = [Image.fromarray(_rgb(640, 480, 20)), Image.fromarray(_rgb(20, 30, 21))]
    ref_pixels, ref_grid = _ref_out(proc, images)
    ours = preprocess_qwen2_vl(images, cfg)
    np.testing.assert_array_equal(ours.image_grid_thw, ref_grid)
    assert ref_grid.tolist() == [[1, 34, 46], [1, 6, 4]]
    assert np.abs(ours.pixel_values - ref_pixels).max() <= TOL


def test_defaults_are_the_class_defaults():
    bare, ours = Qwen2VLImageProcessorPil(), qwen2_vl_image_config({})
    assert ours == Qwen2VLImageConfig() == qwen2_vl_image_config(None)
    assert (ours.min_pixels, ours.max_pixels) == (bare.size.shortest_edge, bare.size.longest_edge)
    assert (ours.min_pixels, ours.max_pixels) == (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS) == (3136, 1003520)
    assert (ours.patch_size, ours.temporal_patch_size, ours.merge_size) == (
        bare.patch_size, bare.temporal_patch_size, bare.merge_size)
    assert ours.image_mean == tuple(bare.image_mean) and ours.image_std == tuple(bare.image_std)
    assert (ours.resample, ours.rescale_factor, ours.do_resize, ours.do_rescale, ours.do_normalize,
            ours.do_convert_rgb) == (bare.resample, bare.rescale_factor, bare.do_resize, bare.do_rescale,
                                     bare.do_normalize, bare.do_convert_rgb)
    # null keys take the defaults too; size dicts in the transformers 5 and 4.4x spellings
    assert qwen2_vl_image_config({"min_pixels": None, "size": None, "patch_size": None}) == ours
    by_size = qwen2_vl_image_config({"size": {"shortest_edge": 100, "longest_edge": 5000}})
    assert (by_size.min_pixels, by_size.max_pixels) == (100, 5000)
    old = qwen2_vl_image_config({"size": {"min_pixels": 100, "max_pixels": 5000}})
    assert (old.min_pixels, old.max_pixels) == (100, 5000)
    # top-level min/max_pixels override size, as in Qwen2VLImageProcessorPil.__init__
    both = {"size": {"shortest_edge": 1, "longest_edge": 2}, "min_pixels": 100, "max_pixels": 5000}
    proc = _reference(both)
    assert (proc.size.shortest_edge, proc.size.longest_edge) == (100, 5000)
    assert (qwen2_vl_image_config(both).min_pixels, qwen2_vl_image_config(both).max_pixels) == (100, 5000)


def test_config_from_save_pretrained(tmp_path):
    """preprocessor_config.json as the image processor's save_pretrained writes it (size dict, no
    top-level min/max_pixels), and a transformers 5 processor_config.json (image_processor section)."""
    raw = {"min_pixels": 2000, "max_pixels": 60000, "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 0.75], "resample": 2, "do_convert_rgb": False}
    ref = _reference(raw)
    ref.save_pretrained(tmp_path / "pre")
    saved = json.loads((tmp_path / "pre" / "preprocessor_config.json").read_text())
    assert saved["size"] == {"shortest_edge": 2000, "longest_edge": 60000} and "min_pixels" not in saved
    cfg = qwen2_vl_image_config(tmp_path / "pre")
    expect = Qwen2VLImageConfig(min_pixels=2000, max_pixels=60000, patch_size=16, image_mean=(0.5, 0.5, 0.5),
                                image_std=(0.25, 0.5, 0.75), resample=2, do_convert_rgb=False)
    assert cfg == expect
    assert qwen2_vl_image_config(tmp_path / "pre" / "preprocessor_config.json") == expect  # the file itself
    # transformers 5 processor layout: Qwen2VLProcessor.save_pretrained needs a video processor
    # (torchvision), so the file is written by hand from the image processor's own dict
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "processor_config.json").write_text(
        json.dumps({"image_processor": ref.to_dict(), "processor_class": "Qwen2VLProcessor"}))
    assert qwen2_vl_image_config(tmp_path / "proc") == expect
    loaded = AutoImageProcessor.from_pretrained(tmp_path / "proc")
    images = [Image.fromarray(_rgb(90, 70, 30)), Image.fromarray(_rgb(300, 200, 31))]
    ref_pixels, ref_grid = _ref_out(loaded, images)
    ours = preprocess_qwen2_vl(images, cfg)
    np.testing.assert_array_equal(ours.image_grid_thw, ref_grid)
    assert np.abs(ours.pixel_values - ref_pixels).max() <= TOL


def test_smart_resize_matches_transformers():
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 3000, size=(400, 2))]
    sizes += [(h, w) for h, w in itertools.product([1, 13, 14, 27, 28, 29, 42, 55, 56, 70, 98, 126], repeat=2)]
    sizes += [(1, 200), (200, 1), (5, 1000), (20, 4000), (3000, 15), (4000, 4000), (10000, 9999)]
    bounds = [(3136, 1003520), (3136, 12845056), (112 * 112, 28 * 28 * 40), (784, 784), (1, 10**9)]
    for (h, w), (lo, hi), factor in itertools.product(sizes, bounds, (28, 32)):
        if max(h, w) / min(h, w) > 200:
            continue
        assert smart_resize(h, w, factor, lo, hi) == hf_smart_resize(h, w, factor, lo, hi), (h, w, lo, hi, factor)
    assert smart_resize(70, 42, 28, 1, 10**9) == (56, 56)  # 2.5 -> 2 and 1.5 -> 2: halves round to even
    assert smart_resize(10, 7) == hf_smart_resize(10, 7) == (84, 56)  # tiny images are upscaled, not refused
    assert smart_resize(np.int64(300), np.int64(400)) == hf_smart_resize(300, 400)


def test_smart_resize_errors():
    for h, w in [(1, 201), (1000, 4)]:
        with pytest.raises(ValueError, match="aspect ratio") as ours:
            smart_resize(h, w)
        assert "\n" not in str(ours.value)
        with pytest.raises(ValueError, match="aspect ratio"):
            hf_smart_resize(h, w)
    assert smart_resize(1, 200) == hf_smart_resize(1, 200)  # exactly 200 is allowed
    with pytest.raises(ValueError, match="height must be a positive integer"):
        smart_resize(0, 10)
    with pytest.raises(ValueError, match="width must be a positive integer"):
        smart_resize(10, 2.5)
    with pytest.raises(ValueError, match="factor"):
        smart_resize(10, 10, factor=0)
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_qwen2_vl(Image.new("RGB", (500, 2)))


def test_patch_order_and_positions():
    """On an image already on the grid (no resampling) and without normalisation, each row of
    pixel_values is the patch at patch_positions[k], repeated temporal_patch_size times."""
    arr = _rgb(112, 84, 40)  # (84, 112, 3): on the 28 grid, within the bounds
    cfg = Qwen2VLImageConfig(min_pixels=784, max_pixels=10**6, do_rescale=False, do_normalize=False)
    ours = preprocess_qwen2_vl([arr], cfg)
    lay = ours.layouts[0]
    assert lay.resized_hw == lay.original_hw == (84, 112) and lay.grid_thw == (1, 6, 8)
    assert lay.token_grid == (3, 4) and lay.num_tokens == 12
    pos = patch_positions(6, 8, 2)
    assert pos.shape == (48, 2) and pos[:5].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2]]
    assert len({tuple(p) for p in pos}) == 48
    p = cfg.patch_size
    rows = ours.pixel_values.reshape(48, 3, 2, p, p)  # (patches, C, t, p, p)
    for k, (r, c) in enumerate(pos):
        patch = arr[r * p : (r + 1) * p, c * p : (c + 1) * p].transpose(2, 0, 1)  # (3, p, p)
        np.testing.assert_array_equal(rows[k, :, 0], patch)
        np.testing.assert_array_equal(rows[k, :, 1], patch)
        assert k // 4 == (r // 2) * 4 + c // 2  # token of patch k: its merge block, row-major
    ref_pixels, _ = _ref_out(_reference({"min_pixels": 784, "max_pixels": 10**6, "do_rescale": False,
                                         "do_normalize": False}), [arr])
    np.testing.assert_array_equal(ours.pixel_values, ref_pixels)


def test_image_token_counts():
    grid = np.array([[1, 8, 10], [1, 4, 64], [2, 6, 6]], dtype=np.int64)
    np.testing.assert_array_equal(image_token_counts(grid, 2), [20, 64, 18])
    assert image_token_counts(grid.tolist(), 1).tolist() == [80, 256, 72]
    assert image_token_counts(grid, 2).dtype == np.int64
    ours = preprocess_qwen2_vl(_images()[:3], qwen2_vl_image_config(SMALL))
    np.testing.assert_array_equal(image_token_counts(ours.image_grid_thw, 2), ours.num_tokens)
    with pytest.raises(ValueError, match="N, 3"):
        image_token_counts(np.array([1, 8, 10]), 2)
    with pytest.raises(ValueError, match="multiples of merge_size"):
        image_token_counts([[1, 7, 10]], 2)


def test_no_resize():
    cfg = Qwen2VLImageConfig(do_resize=False)
    im = Image.fromarray(_rgb(56, 84, 50))
    ref_pixels, ref_grid = _ref_out(_reference({"do_resize": False}), [im])
    ours = preprocess_qwen2_vl([im], cfg)
    np.testing.assert_array_equal(ours.image_grid_thw, ref_grid)
    assert np.abs(ours.pixel_values - ref_pixels).max() <= TOL
    with pytest.raises(ValueError, match="multiples of patch_size \\* merge_size = 28"):
        preprocess_qwen2_vl([Image.fromarray(_rgb(50, 84, 50))], cfg)


def test_config_errors(tmp_path):
    bad = [
        ({"min_pixels": 5000, "max_pixels": 100}, "min_pixels"),
        ({"patch_size": 0}, "patch_size"),
        ({"merge_size": 1.5}, "merge_size"),
        ({"max_pixels": "big"}, "max_pixels"),
        ({"size": 448}, "size"),
        ({"size": {"shortest_edge": 10}}, "longest_edge"),
        ({"size": {"height": 10, "width": 10}}, "size keys"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"image_std": [0.5, 0.0, 0.5]}, "image_std"),
        ({"do_resize": "yes"}, "do_resize"),
        ({"resample": 9}, "resample"),
        ({"rescale_factor": "x"}, "rescale_factor"),
    ]
    for raw, match in bad:
        with pytest.raises(ValueError, match=match) as info:
            qwen2_vl_image_config(raw)
        assert "\n" not in str(info.value), raw
    with pytest.raises(ValueError, match="min_pixels"):
        Qwen2VLImageConfig(min_pixels=0)
    with pytest.raises(FileNotFoundError):
        qwen2_vl_image_config(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    with pytest.raises(ValueError, match="image_processor section"):
        qwen2_vl_image_config(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        qwen2_vl_image_config(tmp_path)


def test_preprocess_errors():
    with pytest.raises(ValueError, match="no images"):
        preprocess_qwen2_vl([])
    with pytest.raises(ValueError, match="empty"):
        preprocess_qwen2_vl([Image.new("RGB", (0, 5))])
    with pytest.raises(ValueError, match="uint8"):
        preprocess_qwen2_vl([np.zeros((30, 30, 3), np.float32)])
    with pytest.raises(ValueError, match="uint8"):
        preprocess_qwen2_vl([np.zeros((30, 30, 4), np.uint8)])
    with pytest.raises(ValueError, match="not a PIL image"):
        preprocess_qwen2_vl(["image.png"])
    with pytest.raises(ValueError, match="mode 'L'"):
        preprocess_qwen2_vl([Image.new("L", (30, 30))], dataclasses.replace(Qwen2VLImageConfig(),
                                                                           do_convert_rgb=False))
