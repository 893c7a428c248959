"""Image loading and preprocessing against transformers' PIL CLIP image processor."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil

from jaxflow.data.image import (
    OPENAI_CLIP_MEAN,
    ImageSpec,
    load_image,
    mean_background,
    pad_to_square,
    preprocess_images,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "jaxflow", "assets", "demo.png")


def _reference(n: int = 336, crop: int | None = None) -> CLIPImageProcessorPil:
    crop = n if crop is None else crop
    return CLIPImageProcessorPil.from_dict(
        {
            "size": {"shortest_edge": n},
            "crop_size": {"height": crop, "width": crop},
            "do_resize": True,
            "do_center_crop": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
            "resample": 3,
            "image_mean": list(OPENAI_CLIP_MEAN),
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "rescale_factor": 1 / 255,
        }
    )


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    """A structured test image: smooth gradients plus noise, so resampling matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([255 * x, 255 * y, 128 + 100 * np.sin(12 * x * y)], axis=-1)
    noisy = base + rng.normal(0, 25, size=(h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def _ref_pixels(proc, images) -> np.ndarray:
    return proc(images, return_tensors="np")["pixel_values"]  # (B, 3, H, W)


@pytest.mark.parametrize(
    "hw",
    [(300, 500), (500, 301), (336, 336), (40, 30), (337, 1001)],
    ids=["landscape", "portrait", "square", "small_upsampled", "wide_odd"],
)
def test_matches_transformers_336(hw):
    im = _image(*hw, seed=hw[0])
    ours = preprocess_images([im], ImageSpec())
    ref = _ref_pixels(_reference(336), [im])
    assert ours.shape == ref.shape == (1, 3, 336, 336)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_matches_transformers_batch_of_two():
    images = [_image(240, 320, seed=1), _image(400, 250, seed=2)]
    ours = preprocess_images(images, ImageSpec())
    ref = _ref_pixels(_reference(336), images)
    assert ours.shape == (2, 3, 336, 336)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("hw", [(90, 120), (120, 57), (56, 56)])
def test_matches_transformers_small_size(hw):
    im = _image(*hw, seed=7)
    spec = ImageSpec.for_size(56)
    assert spec.shortest_edge == 56 and spec.crop_size == (56, 56)
    ours = preprocess_images([im], spec)
    ref = _ref_pixels(_reference(56), [im])
    assert ours.shape == (1, 3, 56, 56)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_matches_transformers_crop_larger_than_resize():
    # The crop exceeds the resized image: transformers zero-pads (in uint8) before cropping.
    im = _image(50, 80, seed=3)
    spec = ImageSpec(shortest_edge=40, crop_size=(60, 30))
    proc = CLIPImageProcessorPil.from_dict({"size": {"shortest_edge": 40}, "crop_size": {"height": 60, "width": 30}})
    np.testing.assert_allclose(preprocess_images([im], spec), _ref_pixels(proc, [im]), rtol=0, atol=1e-6)


def test_matches_transformers_rgba_and_gray():
    rng = np.random.default_rng(5)
    rgba = Image.fromarray(rng.integers(0, 256, (60, 90, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (70, 50), dtype=np.uint8), "L")
    proc = _reference(56)
    for im in (rgba, gray):
        np.testing.assert_allclose(
            preprocess_images([im], ImageSpec.for_size(56)), _ref_pixels(proc, [im]), rtol=0, atol=1e-6
        )


def test_demo_image_matches_transformers():
    im = load_image(DEMO)
    np.testing.assert_allclose(
        preprocess_images([im], ImageSpec()), _ref_pixels(_reference(336), [im]), rtol=0, atol=1e-6
    )


def test_pad_square_option_matches_transformers_on_padded_image():
    im = _image(120, 200, seed=9)
    spec = ImageSpec.for_size(56)
    padded = pad_to_square(im, mean_background(spec))
    ours = preprocess_images([im], spec, pad_square=True)
    np.testing.assert_allclose(ours, _ref_pixels(_reference(56), [padded]), rtol=0, atol=1e-6)


def test_mean_background_is_llava_colour():
    assert mean_background(ImageSpec()) == (122, 116, 104)


@pytest.mark.parametrize("wh", [(7, 4), (4, 7), (8, 5), (5, 8)])
def test_pad_to_square_hand_built(wh):
    w, h = wh
    src = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3) + 1  # no pixel equals bg
    bg = (200, 150, 100)
    out = np.asarray(pad_to_square(Image.fromarray(src, "RGB"), bg))
    side = max(w, h)
    expected = np.empty((side, side, 3), np.uint8)
    expected[:] = bg
    if w > h:
        top = (side - h) // 2
        expected[top : top + h, :, :] = src
        region = out[top : top + h]
        padding = np.concatenate([out[:top], out[top + h :]], axis=0)
    else:
        left = (side - w) // 2
        expected[:, left : left + w, :] = src
        region = out[:, left : left + w]
        padding = np.concatenate([out[:, :left], out[:, left + w :]], axis=1)
    assert out.shape == (side, side, 3)
    np.testing.assert_array_equal(region, src)
    assert padding.size > 0 and (padding == np.array(bg, np.uint8)).all()
    np.testing.assert_array_equal(out, expected)


def test_pad_to_square_square_is_identity():
    im = _image(10, 10)
    assert pad_to_square(im, (0, 0, 0)) is im


def test_spec_from_preprocessor_config(tmp_path):
    _reference(56, crop=48).save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").exists()
    spec = ImageSpec.from_pretrained_dir(tmp_path)
    assert spec == ImageSpec(shortest_edge=56, crop_size=(48, 48))


def test_spec_from_processor_config(tmp_path):
    (tmp_path / "processor_config.json").write_text(
        json.dumps(
            {
                "image_processor": {
                    "crop_size": 40,
                    "size": {"height": 50, "width": 70},
                    "image_mean": [0.5, 0.5, 0.5],
                    "image_std": [0.5, 0.5, 0.5],
                    "resample": 2,
                    "do_convert_rgb": False,
                    "image_processor_type": "CLIPImageProcessor",
                },
                "patch_size": 14,
                "processor_class": "LlavaProcessor",
            }
        )
    )
    spec = ImageSpec.from_pretrained_dir(tmp_path)
    assert spec.resize_hw == (50, 70) and spec.crop_size == (40, 40)
    assert spec.image_mean == (0.5, 0.5, 0.5) and spec.resample == 2 and not spec.do_convert_rgb
    im = _image(90, 60, seed=11)
    proc = CLIPImageProcessorPil.from_dict(
        json.loads((tmp_path / "processor_config.json").read_text())["image_processor"]
    )
    np.testing.assert_allclose(preprocess_images([im], spec), _ref_pixels(proc, [im]), rtol=0, atol=1e-6)


def test_spec_from_llava_processor_save(tmp_path):
    from transformers import LlavaProcessor

    from jaxflow.data.tiny_tokenizer import build_tiny_tokenizer

    proc = LlavaProcessor(
        image_processor=_reference(56), tokenizer=build_tiny_tokenizer(), patch_size=14, image_token="<image>"
    )
    proc.save_pretrained(tmp_path)
    assert ImageSpec.from_pretrained_dir(tmp_path) == ImageSpec.for_size(56)


def test_spec_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        ImageSpec.from_pretrained_dir(tmp_path)


def test_load_image_missing(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match=re.escape(f"image not found: {path}")):
        load_image(path)


def test_load_image_unreadable(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"this is not an image\n" * 10)
    with pytest.raises(ValueError) as info:
        load_image(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (5, 3), (10, 20, 30, 40)).save(path)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (5, 3)
    assert im.getpixel((0, 0)) == (10, 20, 30)


def test_demo_asset_is_deterministic():
    from jaxflow.tiny import DEMO_OBJECTS, make_demo_image
    from jaxflow.toy.data import COLORS

    im = load_image(DEMO)
    assert im.size == (112, 112) and im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(make_demo_image()), np.asarray(im))
    # the shapes are where DEMO_OBJECTS says, in their colours (the renderer jitters by at most 15)
    for color, _, (x0, y0, x1, y1) in DEMO_OBJECTS:
        centre = ((x0 + x1) // 2, (y0 + y1) // 2 + (4 if _ == "triangle" else 0))
        got = np.asarray(im.getpixel(centre), float)
        assert np.abs(got - COLORS[color]).max() <= 15, (color, got)
