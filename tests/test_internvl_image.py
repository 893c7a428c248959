"""InternVL dynamic tiling against transformers' PIL-backend GotOcr2 image processor."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor, GotOcr2ImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
from transformers.models.internvl.processing_internvl import InternVLProcessor
from transformers.utils import is_torchvision_available

from jaxflow.data.internvl_image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InternVLImageConfig,
    internvl_image_config,
    preprocess_internvl,
    tile_boxes,
    tile_grid,
)

# An InternVL -hf preprocessor_config.json (InternVL3 / InternVL2.5 -hf checkpoints).
HF_CONFIG = {
    "crop_to_patches": False,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": list(IMAGENET_MEAN),
    "image_processor_type": "GotOcr2ImageProcessorFast",
    "image_std": list(IMAGENET_STD),
    "max_patches": 12,
    "min_patches": 1,
    "processor_class": "InternVLProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 448, "width": 448},
}


def _config(size: int = 56, min_patches: int = 1, max_patches: int = 12) -> dict:
    return {**HF_CONFIG, "size": {"height": size, "width": size}, "min_patches": min_patches,
            "max_patches": max_patches}


def _reference(cfg: dict) -> GotOcr2ImageProcessorPil:
    skip = ("image_processor_type", "processor_class")
    return GotOcr2ImageProcessorPil(**{k: v for k, v in cfg.items() if k not in skip})


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
        Image.fromarray(_rgb(300, 90, 0)),  # wide
        Image.fromarray(_rgb(80, 260, 1)),  # tall
        Image.fromarray(_rgb(200, 200, 2)),  # square
        Image.fromarray(_rgb(10, 7, 4)),  # tiny
        Image.fromarray(_rgb(120, 160, 5)).convert("L"),
        Image.fromarray(rgba.astype(np.uint8), "RGBA"),
        Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)),  # I;16, saturates
        palette,
    ]


def _ref_out(proc, images, **kw):
    out = proc(images, crop_to_patches=True, return_tensors="np", **kw)
    return out["pixel_values"], out["num_patches"]


def test_auto_image_processor_choice_and_config():
    """AutoImageProcessor picks the PIL class when torchvision is absent; the config reads alike."""
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "preprocessor_config.json"), "w") as f:
            json.dump(HF_CONFIG, f)
        proc = AutoImageProcessor.from_pretrained(d)
    if not is_torchvision_available():
        assert type(proc) is GotOcr2ImageProcessorPil
    cfg = internvl_image_config(HF_CONFIG)
    assert cfg == InternVLImageConfig() == internvl_image_config(None)
    assert (cfg.tile_height, cfg.tile_width) == (proc.size.height, proc.size.width) == (448, 448)
    assert (cfg.min_patches, cfg.max_patches, cfg.resample) == (proc.min_patches, proc.max_patches, proc.resample)
    assert cfg.image_mean == tuple(proc.image_mean) and cfg.image_std == tuple(proc.image_std)
    assert cfg.rescale_factor == proc.rescale_factor and cfg.crop_to_patches
    assert not internvl_image_config(HF_CONFIG, crop_to_patches=None).crop_to_patches  # the file's value
    # the processor forces tiling on every call
    assert InternVLProcessor.images_kwargs == {"crop_to_patches": True}
    # missing keys take GotOcr2ImageProcessorPil's class defaults, as transformers does
    bare, ours = GotOcr2ImageProcessorPil(), internvl_image_config({})
    assert (ours.tile_height, ours.image_mean, ours.image_std) == (bare.size.height, tuple(bare.image_mean),
                                                                   tuple(bare.image_std))


@pytest.mark.parametrize("limits", [(1, 12), (1, 6), (2, 2), (3, 8)])
@pytest.mark.parametrize("tile", [56, 448])
def test_tile_grid_matches_transformers(limits, tile):
    cfg = InternVLImageConfig(tile_height=tile, tile_width=tile, min_patches=limits[0], max_patches=limits[1])
    rng = np.random.default_rng(sum(limits) + tile)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 2000, size=(300, 2))]
    sizes += [(w * k, h * k) for w, h in [(1, 1), (5, 4), (4, 5), (3, 1), (2, 3)] for k in (1, 7, 40, 200, 500)]
    for w, h in sizes:
        cols, rows = get_optimal_tiled_canvas((h, w), (tile, tile), *limits)
        assert tile_grid(w, h, cfg) == (rows, cols), (w, h)


def test_tie_breaks():
    """Equal aspect-ratio distance: the later (larger or, same area, wider) grid wins iff the image
    area exceeds half the tiled canvas area."""
    cfg = InternVLImageConfig(tile_height=56, tile_width=56, min_patches=2, max_patches=2)
    assert tile_grid(500, 400, cfg) == (1, 2)  # (1x2) vs (2x1) tie at |1.25 - r| = 0.75, big: wider
    assert tile_grid(5, 4, cfg) == (2, 1)  # small: the first grid stays
    cfg = InternVLImageConfig(tile_height=56, tile_width=56)
    assert tile_grid(40, 40, cfg) == (1, 1)  # 1600 <= 0.5 * 56**2 * 4
    assert tile_grid(200, 200, cfg) == (3, 3)
    assert tile_grid(300, 90, cfg) == (2, 6)  # 3x1 and 6x2 tie; 27000 > 0.5 * 56**2 * 12
    assert tile_grid(300, 90, InternVLImageConfig()) == (1, 3)  # 448 px tiles: 3x1
    assert tile_grid(300, 90, dataclasses.replace(cfg, crop_to_patches=False)) == (1, 1)


@pytest.mark.parametrize("size,limits", [(56, (1, 12)), (56, (1, 6)), (28, (2, 5))])
def test_matches_transformers(size, limits):
    raw = _config(size, *limits)
    images = _images()
    ref_pixels, ref_num = _ref_out(_reference(raw), images)
    ours = preprocess_internvl(images, internvl_image_config(raw))
    assert ours.pixel_values.dtype == np.float32 and ours.pixel_values.shape == ref_pixels.shape
    np.testing.assert_array_equal(ours.num_patches, ref_num)
    np.testing.assert_allclose(ours.pixel_values, ref_pixels, rtol=0, atol=1e-5)
    for layout, n in zip(ours.layouts, ref_num):
        assert layout.num_patches == n and layout.has_thumbnail == (layout.num_tiles > 1)
    assert [lay.image_size for lay in ours.layouts] == [im.size for im in images]
    assert int(ours.num_patches.sum()) == len(ours.pixel_values)
    assert any(lay.num_tiles > 1 for lay in ours.layouts) and any(lay.rows != lay.cols for lay in ours.layouts)


def test_default_448_config():
    im = Image.fromarray(_rgb(300, 90, 7))
    ref_pixels, ref_num = _ref_out(_reference(HF_CONFIG), [im])
    ours = preprocess_internvl([im])
    assert ours.layouts[0].grid == (1, 3) and ref_num.tolist() == [4] == ours.num_patches.tolist()
    np.testing.assert_allclose(ours.pixel_values, ref_pixels, rtol=0, atol=1e-5)


@pytest.mark.parametrize("max_patches", [1, 12])
def test_single_tile_has_no_thumbnail(max_patches):
    """max_patches = 1 skips tiling (plain resize); a 1x1 grid while tiling has no thumbnail either."""
    raw = _config(56, 1, max_patches)
    im = Image.fromarray(_rgb(40, 40, 8)) if max_patches > 1 else Image.fromarray(_rgb(300, 90, 8))
    ref_pixels, ref_num = _ref_out(_reference(raw), [im])
    ours = preprocess_internvl(im, internvl_image_config(raw))
    assert ref_num.tolist() == [1] == ours.num_patches.tolist() and ours.pixel_values.shape == (1, 3, 56, 56)
    lay = ours.layouts[0]
    assert (lay.grid, lay.has_thumbnail, lay.num_patches) == ((1, 1), False, 1)
    np.testing.assert_allclose(ours.pixel_values, ref_pixels, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(tile_boxes(lay), [[0, 0, im.width, im.height]])


def test_tile_order_and_boxes():
    """A 168x112 image tiles 2x3 at 56 px, so the resized image is the original: tile i is the
    original's crop at tile_boxes[i], and the thumbnail comes last."""
    arr = _rgb(168, 112, 9)
    cfg = InternVLImageConfig(tile_height=56, tile_width=56, do_normalize=False)
    ours = preprocess_internvl([Image.fromarray(arr)], cfg)
    lay = ours.layouts[0]
    assert (lay.rows, lay.cols, lay.has_thumbnail, lay.resized_size) == (2, 3, True, (168, 112))
    boxes = tile_boxes(lay)
    assert boxes.shape == (6, 4)
    for i, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        expect = arr[y0:y1, x0:x1].transpose(2, 0, 1).astype(np.float64) / 255
        np.testing.assert_allclose(ours.pixel_values[i], expect, rtol=0, atol=1e-6)
    # a scaled case: boxes cut the original evenly, row-major
    wide = dataclasses.replace(lay, rows=2, cols=6, width=300, height=90)
    b = tile_boxes(wide)
    np.testing.assert_allclose(b[0], [0, 0, 50, 45])
    np.testing.assert_allclose(b[7], [50, 45, 100, 90])
    np.testing.assert_allclose(b[-1], [250, 45, 300, 90])
    two = preprocess_internvl([Image.fromarray(arr), Image.fromarray(_rgb(10, 7))], cfg)
    np.testing.assert_array_equal(two.image_patches(1), two.pixel_values[7:])


def test_errors():
    with pytest.raises(ValueError, match="min_patches"):
        InternVLImageConfig(min_patches=4, max_patches=2)
    with pytest.raises(ValueError, match="min_patches"):
        internvl_image_config({"min_patches": 0})
    with pytest.raises(ValueError, match="size"):
        internvl_image_config({"size": {"shortest_edge": 448}})
    with pytest.raises(ValueError, match="empty"):
        preprocess_internvl([Image.new("RGB", (0, 5))])
    with pytest.raises(ValueError, match="no images"):
        preprocess_internvl([])
    with pytest.raises(ValueError, match="positive"):
        tile_grid(0, 10, InternVLImageConfig())
    with pytest.raises(ValueError, match="mode 'L'"):
        preprocess_internvl([Image.new("L", (5, 5))], InternVLImageConfig(do_convert_rgb=False))
