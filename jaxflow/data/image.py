"""Image loading and CLIP preprocessing (numpy + PIL only).

``preprocess_images`` reproduces transformers' ``CLIPImageProcessorPil`` (the PIL
backend of the llava-hf image processor) step for step:

1. convert to RGB (alpha composited onto white, as transformers does);
2. resize with PIL (uint8) so the short side is ``shortest_edge`` and the long side is
   ``int(shortest_edge * long / short)`` (truncated), or to an exact (h, w);
3. centre crop at ``top = (H - h) // 2``, ``left = (W - w) // 2`` (zero-padding first
   if the image is smaller than the crop);
4. rescale: ``float64(x) * rescale_factor`` cast to float32;
5. normalise in float32: ``(x - mean) / std`` per channel.

Optionally (``pad_square``) the original LLaVA eval's ``expand2square`` with the mean
colour is applied first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB (``Image.open(path).convert("RGB")`` as LLaVA does).

    Raises FileNotFoundError if ``path`` does not exist, ValueError if it is not a
    readable image.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not an image file: pass one image file")
    try:
        with Image.open(path) as im:
            return to_8bit(im).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"cannot read image {path}: {msg}") from None


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grayscale -> 8-bit "L", scaled by the bit depth: PIL's own
    ``convert("RGB")`` clips such values at 255, so a 16-bit image would come out almost all white.
    Modes I;16* are scaled by 255 / 65535; mode "I" likewise when its values exceed 255 (a 16-bit PNG),
    else taken as 8-bit. Every other mode is returned as it is."""
    if not (image.mode.startswith("I;16") or image.mode == "I"):
        return image
    a = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or a.max(initial=0) > 255:
        a = a * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """CLIP image-processor settings (defaults: LLaVA-1.5's CLIP ViT-L/14-336).

    ``resize_hw``, if set, resizes to exactly (h, w) instead of the shortest-edge rule
    (a config whose ``size`` is ``{"height", "width"}``).
    """

    shortest_edge: int = 336
    crop_size: tuple[int, int] = (336, 336)  # (h, w)
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resize_hw: tuple[int, int] | None = None  # (h, w)

    @classmethod
    def for_size(cls, n: int, **kwargs: Any) -> "ImageSpec":
        """Shortest edge ``n`` and an (n, n) crop; other fields default or from kwargs."""
        return cls(shortest_edge=int(n), crop_size=(int(n), int(n)), **kwargs)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "ImageSpec":
        """From an image-processor dict as transformers writes it (missing keys: defaults)."""
        kw: dict[str, Any] = {}
        if "size" in cfg and cfg["size"] is not None:
            size = cfg["size"]
            if isinstance(size, int):  # CLIP: default_to_square=False -> shortest edge
                kw["shortest_edge"] = size
            elif isinstance(size, (list, tuple)) and len(size) == 2:
                kw["resize_hw"] = (int(size[0]), int(size[1]))
            elif isinstance(size, dict) and set(size) == {"shortest_edge"}:
                kw["shortest_edge"] = int(size["shortest_edge"])
            elif isinstance(size, dict) and set(size) == {"height", "width"}:
                kw["resize_hw"] = (int(size["height"]), int(size["width"]))
            else:
                raise ValueError(f"unsupported image processor size {size!r}")
        if "crop_size" in cfg and cfg["crop_size"] is not None:
            crop = cfg["crop_size"]
            if isinstance(crop, int):
                kw["crop_size"] = (crop, crop)
            elif isinstance(crop, (list, tuple)) and len(crop) == 2:
                kw["crop_size"] = (int(crop[0]), int(crop[1]))
            elif isinstance(crop, dict) and {"height", "width"} <= set(crop):
                kw["crop_size"] = (int(crop["height"]), int(crop["width"]))
            else:
                raise ValueError(f"unsupported image processor crop_size {crop!r}")
        for key in ("image_mean", "image_std"):
            if cfg.get(key) is not None:
                value = cfg[key]
                value = [value] * 3 if isinstance(value, (int, float)) else value
                kw[key] = tuple(float(v) for v in value)
        if cfg.get("rescale_factor") is not None:
            kw["rescale_factor"] = float(cfg["rescale_factor"])
        if cfg.get("resample") is not None:
            kw["resample"] = int(cfg["resample"])
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if cfg.get(key) is not None:
                kw[key] = bool(cfg[key])
        return cls(**kw)

    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike) -> "ImageSpec":
        """Read ``preprocessor_config.json``, else the ``image_processor`` section of
        ``processor_config.json``, from a transformers model/processor directory."""
        path = os.fspath(path)
        pre = os.path.join(path, "preprocessor_config.json")
        proc = os.path.join(path, "processor_config.json")
        if os.path.isfile(pre):
            with open(pre, encoding="utf-8") as f:
                cfg = json.load(f)
            cfg = cfg.get("image_processor", cfg)
            return cls.from_config(cfg)
        if os.path.isfile(proc):
            with open(proc, encoding="utf-8") as f:
                cfg = json.load(f)
            if not isinstance(cfg.get("image_processor"), dict):
                raise ValueError(f"{proc} has no image_processor section")
            return cls.from_config(cfg["image_processor"])
        raise FileNotFoundError(f"no preprocessor_config.json or processor_config.json in {path}")

    @property
    def output_hw(self) -> tuple[int, int]:
        """(H, W) of the preprocessed image when resizing and cropping are on."""
        if self.do_center_crop:
            return self.crop_size
        if self.resize_hw is not None:
            return self.resize_hw
        raise ValueError("output size depends on the input when only shortest-edge resizing is done")


def mean_background(spec: ImageSpec) -> tuple[int, ...]:
    """The padding colour of LLaVA's eval: ``tuple(int(x * 255) for x in image_mean)``."""
    return tuple(int(x * 255) for x in spec.image_mean)


def pad_to_square(image: Image.Image, background: tuple[int, ...] | int) -> Image.Image:
    """LLaVA's ``expand2square``: centre the image on a square canvas of side max(w, h).

    Wide images are pasted at (0, (side - h) // 2), tall ones at ((side - w) // 2, 0);
    square images are returned unchanged.
    """
    width, height = image.size
    if width == height:
        return image
    if width > height:
        result = Image.new(image.mode, (width, width), background)
        result.paste(image, (0, (width - height) // 2))
        return result
    result = Image.new(image.mode, (height, height), background)
    result.paste(image, ((height - width) // 2, 0))
    return result


def _to_rgb(image: Image.Image) -> Image.Image:
    """transformers' ``convert_to_rgb``: composite transparency onto white, then RGB."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def resize_output_hw(height: int, width: int, spec: ImageSpec) -> tuple[int, int]:
    """(h, w) after resizing, as transformers' ``get_resize_output_image_size`` computes it."""
    if spec.resize_hw is not None:
        return spec.resize_hw
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(array: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """transformers' ``center_crop`` on a (C, H, W) array -> (C, h, w), zero-padding if needed."""
    _, orig_h, orig_w = array.shape
    crop_h, crop_w = int(crop_hw[0]), int(crop_hw[1])
    top = (orig_h - crop_h) // 2
    left = (orig_w - crop_w) // 2
    bottom, right = top + crop_h, left + crop_w
    if top >= 0 and bottom <= orig_h and left >= 0 and right <= orig_w:
        return array[:, top:bottom, left:right]
    new_h, new_w = max(crop_h, orig_h), max(crop_w, orig_w)
    canvas = np.zeros((array.shape[0], new_h, new_w), dtype=array.dtype)
    top_pad = math.ceil((new_h - orig_h) / 2)
    left_pad = math.ceil((new_w - orig_w) / 2)
    canvas[:, top_pad : top_pad + orig_h, left_pad : left_pad + orig_w] = array
    top, bottom, left, right = top + top_pad, bottom + top_pad, left + left_pad, right + left_pad
    return canvas[:, max(0, top) : min(new_h, bottom), max(0, left) : min(new_w, right)]


def preprocess_image(image: Image.Image, spec: ImageSpec, pad_square: bool = False) -> np.ndarray:
    """One image -> (3, H, W) float32, see ``preprocess_images``."""
    if spec.do_convert_rgb:
        image = _to_rgb(image)
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r} (enable do_convert_rgb)")
    if pad_square:
        image = pad_to_square(image, mean_background(spec))
    if spec.do_resize:
        h, w = resize_output_hw(image.height, image.width, spec)
        image = image.resize((w, h), resample=spec.resample)
    array = np.moveaxis(np.asarray(image), -1, 0)  # (3, H, W) uint8
    if spec.do_center_crop:
        array = _center_crop(array, spec.crop_size)  # (3, h, w) uint8
    if spec.do_rescale:
        array = (array.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    array = array.astype(np.float32, copy=False)
    if spec.do_normalize:
        mean = np.asarray(spec.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(spec.image_std, dtype=np.float32)[:, None, None]
        array = (array - mean) / std
    return np.ascontiguousarray(array, dtype=np.float32)  # (3, H, W)


def preprocess_images(
    images: Sequence[Image.Image], spec: ImageSpec = ImageSpec(), pad_square: bool = False
) -> np.ndarray:
    """PIL images -> pixel values (B, 3, H, W) float32, equal to the llava-hf CLIP processor.

    ``pad_square=True`` first pads each image to a square with the mean colour (LLaVA's
    ``image_aspect_ratio="pad"`` eval). All images must end up the same size (true
    whenever centre cropping is on).
    """
    if isinstance(images, Image.Image):
        images = [images]
    if len(images) == 0:
        raise ValueError("no images given")
    arrays = [preprocess_image(im, spec, pad_square=pad_square) for im in images]  # each (3, H, W)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"preprocessed images differ in shape: {sorted(shapes)}")
    return np.stack(arrays)  # (B, 3, H, W)


def box_to_model_frame(box, image_wh: tuple[int, int], spec: ImageSpec,
                       pad_square: bool = False) -> tuple[float, float, float, float]:
    """A box (x0, y0, x1, y1) in the original image's pixels -> the same box in the pixels of the
    preprocessed image the vision tower sees (after ``pad_square``, resizing and centre cropping,
    with the very offsets ``preprocess_image`` uses), clipped to it. An empty result (x1 <= x0) means
    the box was cropped away."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"a box needs x0 < x1 and y0 < y1, got {tuple(box)}")
    w, h = int(image_wh[0]), int(image_wh[1])
    if pad_square and w != h:
        side = max(w, h)
        dx, dy = (0, (w - h) // 2) if w > h else ((h - w) // 2, 0)
        x0, x1, y0, y1 = x0 + dx, x1 + dx, y0 + dy, y1 + dy
        w = h = side
    if spec.do_resize:
        nh, nw = resize_output_hw(h, w, spec)
        sx, sy = nw / w, nh / h
        x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
        w, h = nw, nh
    out_h, out_w = h, w
    if spec.do_center_crop:
        ch, cw = int(spec.crop_size[0]), int(spec.crop_size[1])
        # _center_crop's offsets, including its zero-padding of a too-small image
        top = (h - ch) // 2 if h >= ch else -math.ceil((ch - h) / 2)
        left = (w - cw) // 2 if w >= cw else -math.ceil((cw - w) / 2)
        x0, x1, y0, y1 = x0 - left, x1 - left, y0 - top, y1 - top
        out_h, out_w = ch, cw
    return (min(max(x0, 0.0), out_w), min(max(y0, 0.0), out_h), min(max(x1, 0.0), out_w), min(max(y1, 0.0), out_h))


def model_input_box(image_wh: tuple[int, int], spec: ImageSpec,
                    pad_square: bool = False) -> tuple[float, float, float, float]:
    """The region (x0, y0, x1, y1), in the original image's pixels, that the preprocessed image covers:
    the centre crop mapped back through the resizing (and ``pad_square``'s padding), with the very
    offsets ``preprocess_image`` uses. It lies inside the image when the crop cuts it; it reaches
    outside where the image was padded (``pad_square``: the whole padded square, e.g. y in
    [-(w - h) // 2, ...) for a wide image; a crop larger than the resized image: its zero padding).
    ``box_to_model_frame`` of this region is the whole model frame."""
    w, h = int(image_wh[0]), int(image_wh[1])
    if w < 1 or h < 1:
        raise ValueError(f"image size must be positive, got {w}x{h} (w x h)")
    dx = dy = 0
    if pad_square and w != h:
        side = max(w, h)
        dx, dy = (0, (w - h) // 2) if w > h else ((h - w) // 2, 0)
        w = h = side
    sx = sy = 1.0
    nw, nh = w, h
    if spec.do_resize:
        nh, nw = resize_output_hw(h, w, spec)
        sx, sy = nw / w, nh / h
    x0, y0, x1, y1 = 0.0, 0.0, float(nw), float(nh)
    if spec.do_center_crop:
        ch, cw = int(spec.crop_size[0]), int(spec.crop_size[1])
        top = (nh - ch) // 2 if nh >= ch else -math.ceil((ch - nh) / 2)
        left = (nw - cw) // 2 if nw >= cw else -math.ceil((cw - nw) / 2)
        x0, y0, x1, y1 = float(left), float(top), float(left + cw), float(top + ch)
    return (x0 / sx - dx, y0 / sy - dy, x1 / sx - dx, y1 / sy - dy)
