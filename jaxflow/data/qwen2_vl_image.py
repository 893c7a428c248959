"""Qwen2-VL / Qwen2.5-VL image preprocessing (dynamic resolution, patch flattening) in numpy + PIL.

Reference: transformers' ``Qwen2VLImageProcessorPil`` (``models/qwen2_vl/image_processing_pil_qwen2_vl.py``).
Qwen2-VL and Qwen2.5-VL checkpoints both name ``Qwen2VLImageProcessor``; ``AutoImageProcessor`` (and so
``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor``) picks the torchvision class ``Qwen2VLImageProcessor``
when torchvision is installed and ``Qwen2VLImageProcessorPil`` otherwise. This module mirrors the PIL
class step for step (the torchvision class resizes uint8 tensors with torch's antialiased bicubic,
which differs from PIL by small amounts). The processors pass no image kwargs of their own. Per image:

1. convert to RGB (``jaxflow.data.image``'s transformers ``convert_to_rgb``: transparency composited
   onto white, other modes by ``Image.convert("RGB")``);
2. ``smart_resize`` picks (h, w), both multiples of ``patch_size * merge_size``, with
   ``min_pixels <= h * w <= max_pixels`` (up to the rounding rules), aspect ratio kept as well as
   possible; the image is resized with PIL (uint8) to exactly that, no crop, no padding;
3. rescale (``float64(x) * rescale_factor`` -> float32) and normalise ``(x - mean) / std`` (float32);
4. cut into ``patch_size`` patches and flatten (``patchify``): patches are listed merge block by merge
   block (``merge_size x merge_size`` patches, blocks row-major, patches row-major inside a block),
   each patch flattened as (C, t, p, p) with the image repeated ``temporal_patch_size`` times along t.

The grid of an image is (t, h, w) = (1, H / p, W / p) in patches; the language model sees
``h * w / merge_size**2`` tokens per image, token j covering merge block j, i.e. the token grid is
(h / merge, w / merge), row-major.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from jaxflow.data.image import BICUBIC, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageSpec, _to_rgb, preprocess_image

# Qwen2VLImageProcessorPil's class defaults (what transformers uses for a key a config leaves out).
# Note: released checkpoints (Qwen2-VL-*-Instruct, Qwen2.5-VL-*-Instruct) set max_pixels to
# QWEN2_VL_CHECKPOINT_MAX_PIXELS, much larger than the class default.
DEFAULT_MIN_PIXELS = 56 * 56  # 3136
DEFAULT_MAX_PIXELS = 28 * 28 * 1280  # 1003520
QWEN2_VL_CHECKPOINT_MAX_PIXELS = 14 * 14 * 4 * 16384  # 12845056, the released checkpoints' value
MAX_ASPECT_RATIO = 200


@dataclasses.dataclass(frozen=True)
class Qwen2VLImageConfig:
    """Image-processor settings; the defaults are ``Qwen2VLImageProcessorPil``'s class defaults.

    ``min_pixels`` / ``max_pixels`` are transformers' ``size["shortest_edge"]`` /
    ``size["longest_edge"]`` (pixel counts, not edges). ``resample`` is a PIL filter id (3: bicubic).
    """

    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resample: int = BICUBIC

    def __post_init__(self):
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) > max_pixels ({self.max_pixels})")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values, got {self.image_mean} and {self.image_std}")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")

    @property
    def factor(self) -> int:
        """Side multiple of resized images: ``patch_size * merge_size`` (28 for Qwen2-VL)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: 3 * temporal_patch_size * patch_size**2 (1176 for Qwen2-VL)."""
        return 3 * self.temporal_patch_size * self.patch_size**2


def _positive_int(name: str, value: Any) -> int:
    """``value`` as a positive int (an integral float is fine), else a one-line ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not float(value).is_integer() or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or 3 numbers, got {value!r}") from None
    if len(out) != 3:
        raise ValueError(f"{name} must be a number or 3 numbers, got {value!r}")
    return out  # type: ignore[return-value]


def _pixel_bounds(raw: dict[str, Any]) -> tuple[int, int]:
    """(min_pixels, max_pixels) as ``Qwen2VLImageProcessorPil.__init__`` resolves them: ``size``
    ({"shortest_edge", "longest_edge"}, default the class's), overridden by top-level ``min_pixels`` /
    ``max_pixels`` (what the released checkpoints' preprocessor_config.json holds). A ``size`` of
    {"min_pixels", "max_pixels"} (transformers 4.4x saves) is read as the same bounds."""
    size = raw.get("size")
    if size is None:
        size = {"shortest_edge": DEFAULT_MIN_PIXELS, "longest_edge": DEFAULT_MAX_PIXELS}
    if not isinstance(size, dict):
        raise ValueError(f"size must be a dict with shortest_edge and longest_edge (pixel counts), got {size!r}")
    unknown = set(size) - {"shortest_edge", "longest_edge", "min_pixels", "max_pixels"}
    if unknown:
        raise ValueError(f"unsupported size keys {sorted(unknown)} (need shortest_edge and longest_edge), got {size!r}")
    low = raw["min_pixels"] if raw.get("min_pixels") is not None else size.get("shortest_edge", size.get("min_pixels"))
    high = raw["max_pixels"] if raw.get("max_pixels") is not None else size.get("longest_edge", size.get("max_pixels"))
    if low is None or high is None:
        raise ValueError(f"size needs both shortest_edge (min_pixels) and longest_edge (max_pixels), got {size!r}")
    return _positive_int("min_pixels", low), _positive_int("max_pixels", high)


def _read_config_file(path: str) -> dict[str, Any]:
    """A directory's preprocessor_config.json, else processor_config.json's ``image_processor``
    section (transformers 5 processor layout); or a JSON file given directly."""
    if os.path.isdir(path):
        candidates = [os.path.join(path, "preprocessor_config.json"), os.path.join(path, "processor_config.json")]
        found = [p for p in candidates if os.path.isfile(p)]
        if not found:
            raise FileNotFoundError(f"no preprocessor_config.json or processor_config.json in {path}")
        path = found[0]
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"no such config file or directory: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise ValueError(f"cannot read {path}: {msg}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    if os.path.basename(path) == "processor_config.json" and not isinstance(cfg.get("image_processor"), dict):
        raise ValueError(f"{path} has no image_processor section")
    return cfg


def qwen2_vl_image_config(path_or_dict: str | os.PathLike | dict[str, Any] | None = None) -> Qwen2VLImageConfig:
    """A ``Qwen2VLImageConfig`` from a checkpoint directory (its preprocessor_config.json, or the
    ``image_processor`` section of processor_config.json), a JSON file, or a config dict.

    ``None`` gives the class defaults. A missing or null key takes ``Qwen2VLImageProcessorPil``'s class
    default, as transformers does; top-level ``min_pixels`` / ``max_pixels`` override ``size``. Bad
    values raise a one-line ValueError; a missing file FileNotFoundError.
    """
    if path_or_dict is None:
        return Qwen2VLImageConfig()
    if isinstance(path_or_dict, (str, os.PathLike)):
        path_or_dict = _read_config_file(os.fspath(path_or_dict))
    if not isinstance(path_or_dict, dict):
        raise ValueError(f"expected a config dict or a path, got {type(path_or_dict).__name__}")
    raw = path_or_dict.get("image_processor", path_or_dict)
    if not isinstance(raw, dict):
        raise ValueError(f"expected an image processor config dict, got {type(raw).__name__}")
    base = Qwen2VLImageConfig()
    get = lambda key: raw[key] if raw.get(key) is not None else getattr(base, key)  # noqa: E731
    min_pixels, max_pixels = _pixel_bounds(raw)
    for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if not isinstance(get(key), (bool, np.bool_)):
            raise ValueError(f"{key} must be true or false, got {get(key)!r}")
    rescale = get("rescale_factor")
    if isinstance(rescale, bool) or not isinstance(rescale, (int, float)):
        raise ValueError(f"rescale_factor must be a number, got {rescale!r}")
    resample = get("resample")
    if isinstance(resample, bool) or not isinstance(resample, int) or not 0 <= resample <= 5:
        raise ValueError(f"resample must be a PIL filter id 0..5, got {resample!r}")
    return Qwen2VLImageConfig(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=_positive_int("patch_size", get("patch_size")),
        temporal_patch_size=_positive_int("temporal_patch_size", get("temporal_patch_size")),
        merge_size=_positive_int("merge_size", get("merge_size")),
        image_mean=_triple("image_mean", get("image_mean")),
        image_std=_triple("image_std", get("image_std")),
        do_resize=bool(get("do_resize")),
        do_rescale=bool(get("do_rescale")),
        rescale_factor=float(rescale),
        do_normalize=bool(get("do_normalize")),
        do_convert_rgb=bool(get("do_convert_rgb")),
        resample=int(resample),
    )


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """(h, w) that an image of ``height`` x ``width`` pixels is resized to, by transformers' rules.

    Both sides round to the nearest multiple of ``factor`` (Python's ``round``: halves to even). If the
    area then exceeds ``max_pixels``, both sides are scaled by ``1 / sqrt(H * W / max_pixels)`` and
    floored to multiples of ``factor`` (at least ``factor``); else if it is below ``min_pixels``, scaled
    by ``sqrt(min_pixels / (H * W))`` and ceiled. Tiny images are thus upscaled, not refused.
    ValueError for an aspect ratio above 200 (transformers' own check) and for sizes or parameters
    that are not positive integers (transformers would divide by zero).
    """
    height, width = _positive_int("height", height), _positive_int("width", width)
    factor = _positive_int("factor", factor)
    min_pixels, max_pixels = _positive_int("min_pixels", min_pixels), _positive_int("max_pixels", max_pixels)
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image aspect ratio must be at most {MAX_ASPECT_RATIO}, got {ratio} ({height}x{width}, h x w)"
        )
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return int(h), int(w)


def image_token_counts(grid_thw: np.ndarray | Sequence[Sequence[int]], merge_size: int) -> np.ndarray:
    """Language-model tokens per image: ``t * h * w // merge_size**2`` for each (N, 3) grid row
    -> (N,) int64 (what the processors expand each image placeholder to)."""
    grid = np.asarray(grid_thw)
    merge_size = _positive_int("merge_size", merge_size)
    if grid.ndim != 2 or grid.shape[1] != 3 or not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"grid_thw must be an (N, 3) integer array, got shape {grid.shape} dtype {grid.dtype}")
    if (grid < 1).any() or (grid[:, 1:] % merge_size).any():
        raise ValueError(f"grid_thw rows need positive t, h, w with h and w multiples of merge_size={merge_size}")
    return (grid.astype(np.int64).prod(axis=1) // merge_size**2).astype(np.int64)  # (N,)


def patch_positions(grid_h: int, grid_w: int, merge_size: int) -> np.ndarray:
    """(row, col) in the patch grid of each flattened patch, in ``preprocess_qwen2_vl``'s order
    -> (grid_h * grid_w, 2) int64. Patch k lies in merge block (token) k // merge_size**2; this is also
    the order of the vision tower's 2D rotary position ids."""
    m = merge_size
    if grid_h % m or grid_w % m:
        raise ValueError(f"patch grid {grid_h}x{grid_w} is not a multiple of merge_size={m}")
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")  # each (gh, gw)
    blocked = lambda a: a.reshape(grid_h // m, m, grid_w // m, m).transpose(0, 2, 1, 3).reshape(-1)  # noqa: E731
    return np.stack([blocked(rows), blocked(cols)], axis=1).astype(np.int64)  # (gh*gw, 2)


def patchify(image: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """(C, H, W) float32 (H, W multiples of patch_size * merge_size) -> (H/p * W/p, C*t*p*p) float32.

    Rows in ``patch_positions`` order; each row is the patch as (C, t, p, p), the same image at every t.
    """
    c, height, width = image.shape
    p, m, t = patch_size, merge_size, temporal_patch_size
    if height % (p * m) or width % (p * m):
        raise ValueError(f"image size {height}x{width} (h x w) is not a multiple of patch_size * merge_size = {p * m}")
    gh, gw = height // p, width // p
    # split rows as (block, row-in-block, pixel-in-patch), columns likewise
    grid = image.reshape(c, gh // m, m, p, gw // m, m, p)
    # -> (block row, block col, row in block, col in block, C, py, px)
    grid = grid.transpose(1, 4, 2, 5, 0, 3, 6).reshape(gh * gw, c, 1, p, p)  # (gh*gw, C, 1, p, p)
    frames = np.broadcast_to(grid, (gh * gw, c, t, p, p))  # (gh*gw, C, t, p, p)
    return np.ascontiguousarray(frames.reshape(gh * gw, c * t * p * p), dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class Qwen2VLImageLayout:
    """One image's geometry: the original ``height`` x ``width`` is resized (scaling alone, no crop, no
    padding) to ``resized_height`` x ``resized_width``, cut into ``patch_size`` patches and merged into
    ``merge_size x merge_size`` tokens."""

    height: int  # original
    width: int
    resized_height: int
    resized_width: int
    patch_size: int
    merge_size: int

    @property
    def original_hw(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def resized_hw(self) -> tuple[int, int]:
        return self.resized_height, self.resized_width

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        """(1, h, w) patches (a still image is one temporal step)."""
        return 1, self.resized_height // self.patch_size, self.resized_width // self.patch_size

    @property
    def num_patches(self) -> int:
        _, h, w = self.grid_thw
        return h * w

    @property
    def token_grid(self) -> tuple[int, int]:
        """(rows, cols) of language-model tokens: (h / merge, w / merge); token j is at (j // cols, j % cols)."""
        _, h, w = self.grid_thw
        return h // self.merge_size, w // self.merge_size

    @property
    def num_tokens(self) -> int:
        rows, cols = self.token_grid
        return rows * cols


@dataclasses.dataclass(frozen=True)
class Qwen2VLPixels:
    """``preprocess_qwen2_vl``'s result.

    ``pixel_values`` (total_patches, C*t*p*p) float32: image after image, each in ``patchify`` order.
    ``image_grid_thw`` (N, 3) int64: (1, h, w) patches per image. ``layouts``: per-image geometry.
    """

    pixel_values: np.ndarray  # (total_patches, C*t*p*p) float32
    image_grid_thw: np.ndarray  # (N, 3) int64
    layouts: tuple[Qwen2VLImageLayout, ...]

    @property
    def num_patches(self) -> np.ndarray:
        """(N,) int64 patches per image (rows of ``pixel_values``)."""
        return np.array([lay.num_patches for lay in self.layouts], dtype=np.int64)

    @property
    def num_tokens(self) -> np.ndarray:
        """(N,) int64 language-model tokens per image: t*h*w / merge_size**2."""
        return np.array([lay.num_tokens for lay in self.layouts], dtype=np.int64)

    @property
    def original_hw(self) -> np.ndarray:
        """(N, 2) int64 original (height, width)."""
        return np.array([lay.original_hw for lay in self.layouts], dtype=np.int64).reshape(-1, 2)

    @property
    def resized_hw(self) -> np.ndarray:
        """(N, 2) int64 resized (height, width)."""
        return np.array([lay.resized_hw for lay in self.layouts], dtype=np.int64).reshape(-1, 2)

    @property
    def token_grid(self) -> np.ndarray:
        """(N, 2) int64 token grid (h / merge, w / merge) per image."""
        return np.array([lay.token_grid for lay in self.layouts], dtype=np.int64).reshape(-1, 2)

    def image_patches(self, index: int) -> np.ndarray:
        """Image ``index``'s rows of ``pixel_values`` -> (num_patches[index], C*t*p*p)."""
        counts = self.num_patches
        start = int(counts[:index].sum())
        return self.pixel_values[start : start + int(counts[index])]


def _as_pil(image: Any, index: int) -> Image.Image:
    """A PIL image as is; an (H, W, 3) or (H, W) uint8 array (channels last) as RGB / L."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ValueError(
                f"image {index}: arrays must be (H, W, 3) or (H, W) uint8, got {image.shape} {image.dtype}"
            )
        return Image.fromarray(np.ascontiguousarray(image), "RGB" if image.ndim == 3 else "L")
    raise ValueError(f"image {index} is a {type(image).__name__}, not a PIL image or uint8 array")


def _spec(cfg: Qwen2VLImageConfig, resize_hw: tuple[int, int] | None) -> ImageSpec:
    """The ``ImageSpec`` that resizes an RGB image to exactly ``resize_hw`` (h, w) (None: not at all),
    then rescales and normalises as ``cfg`` says; no crop, no conversion."""
    return ImageSpec(
        image_mean=cfg.image_mean,
        image_std=cfg.image_std,
        rescale_factor=cfg.rescale_factor,
        resample=cfg.resample,
        do_resize=resize_hw is not None,
        do_center_crop=False,
        do_rescale=cfg.do_rescale,
        do_normalize=cfg.do_normalize,
        do_convert_rgb=False,
        resize_hw=resize_hw,
    )


def preprocess_qwen2_vl(
    images: Sequence[Image.Image | np.ndarray] | Image.Image | np.ndarray,
    cfg: Qwen2VLImageConfig = Qwen2VLImageConfig(),
) -> Qwen2VLPixels:
    """Images of any sizes (PIL, any mode; or (H, W, 3) / (H, W) uint8 arrays, channels last)
    -> ``Qwen2VLPixels``, equal to transformers' ``Qwen2VLImageProcessorPil`` with ``cfg``'s settings.

    With ``do_resize`` off, each image's sides must already be multiples of ``cfg.factor``.
    """
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    if len(images) == 0:
        raise ValueError("no images given")
    rows: list[np.ndarray] = []  # each (num_patches_i, C*t*p*p)
    layouts = []
    for index, image in enumerate(images):
        image = _as_pil(image, index)
        if image.width < 1 or image.height < 1:
            raise ValueError(f"image {index} is empty: {image.width}x{image.height} (w x h)")
        if cfg.do_convert_rgb:
            image = _to_rgb(image)
        if image.mode != "RGB":
            raise ValueError(f"image {index}: expected an RGB image, got mode {image.mode!r} (enable do_convert_rgb)")
        height, width = image.height, image.width
        if cfg.do_resize:
            resize_hw = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
        elif height % cfg.factor or width % cfg.factor:
            raise ValueError(
                f"image {index} is {height}x{width} (h x w); with do_resize off both sides must be multiples"
                f" of patch_size * merge_size = {cfg.factor}"
            )
        else:
            resize_hw = None
        array = preprocess_image(image, _spec(cfg, resize_hw))  # (3, H', W') float32
        rows.append(patchify(array, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size))
        resized_h, resized_w = array.shape[1:]
        layouts.append(Qwen2VLImageLayout(height, width, resized_h, resized_w, cfg.patch_size, cfg.merge_size))
    pixel_values = np.concatenate(rows, axis=0)  # (total_patches, C*t*p*p)
    grid_thw = np.array([lay.grid_thw for lay in layouts], dtype=np.int64)  # (N, 3)
    return Qwen2VLPixels(pixel_values, grid_thw, tuple(layouts))
