"""InternVL image preprocessing (dynamic tiling) in numpy + PIL.

``preprocess_internvl`` reproduces what transformers' ``InternVLProcessor`` gets from its image
processor: InternVL ``-hf`` checkpoints name ``GotOcr2ImageProcessor`` (``AutoImageProcessor``
picks ``GotOcr2ImageProcessor``, which needs torchvision, or else ``GotOcr2ImageProcessorPil``);
this module mirrors the PIL backend, ``GotOcr2ImageProcessorPil``, step for step.
``InternVLProcessor`` passes ``crop_to_patches=True`` on every call, whatever the checkpoint's
``preprocessor_config.json`` says. Per image:

1. convert to RGB (``jaxflow.data.image``'s transformers ``convert_to_rgb``: transparency
   composited onto white; other modes by ``Image.convert("RGB")``, so ``I;16`` values above 255
   saturate to 255);
2. choose a grid of ``rows x cols`` tiles (``tile_grid``) and resize the whole image with PIL to
   (``cols * tile_width``, ``rows * tile_height``), no crop, no padding;
3. cut it into tiles in row-major order: tile i is row ``i // cols``, column ``i % cols``;
4. if there is more than one tile (and ``use_thumbnail``), append a thumbnail: the whole image
   resized to one tile;
5. rescale (``float64(x) * rescale_factor`` -> float32) and normalise ``(x - mean) / std``.

Without tiling (``crop_to_patches`` off, or ``max_patches <= 1``) each image is one resized tile.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from PIL import Image

from jaxflow.data.image import BICUBIC, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageSpec, _to_rgb, preprocess_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # transformers' IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)  # transformers' IMAGENET_DEFAULT_STD

# GotOcr2ImageProcessorPil's class attributes: what transformers uses for a key that a
# preprocessor_config dict leaves out.
_GOT_OCR2_DEFAULTS: dict[str, Any] = {
    "size": {"height": 384, "width": 384},
    "min_patches": 1,
    "max_patches": 12,
    "crop_to_patches": False,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "rescale_factor": 1 / 255,
    "resample": BICUBIC,
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
}


@dataclasses.dataclass(frozen=True)
class InternVLImageConfig:
    """Image-processor settings; the defaults are those of the InternVL ``-hf`` checkpoints
    (448 px tiles, 1..12 tiles, ImageNet mean/std, bicubic) with ``crop_to_patches`` on, as
    ``InternVLProcessor`` calls it.

    ``use_thumbnail`` is always True in transformers (``_preprocess`` never passes it).
    ``do_resize`` only matters without tiling (tiling always resizes, as in transformers).
    """

    tile_height: int = 448
    tile_width: int = 448
    min_patches: int = 1
    max_patches: int = 12
    crop_to_patches: bool = True
    use_thumbnail: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    rescale_factor: float = 1 / 255
    resample: int = BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    def __post_init__(self):
        if self.tile_height < 1 or self.tile_width < 1:
            raise ValueError(f"tile size must be positive, got {self.tile_height}x{self.tile_width} (h x w)")
        if self.min_patches < 1:
            raise ValueError(f"min_patches must be >= 1, got {self.min_patches}")
        if self.min_patches > self.max_patches:
            raise ValueError(f"min_patches ({self.min_patches}) > max_patches ({self.max_patches})")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values, got {self.image_mean} and {self.image_std}")

    @property
    def tiling(self) -> bool:
        """Whether images are cut into tiles (transformers: ``crop_to_patches and max_patches > 1``)."""
        return self.crop_to_patches and self.max_patches > 1


def _tile_hw(size: Any) -> tuple[int, int]:
    """transformers' ``size`` (int, [h, w] or {"height", "width"}) -> (h, w)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    if isinstance(size, dict) and size.get("height") is not None and size.get("width") is not None:
        return int(size["height"]), int(size["width"])
    raise ValueError(f"unsupported image processor size {size!r} (tiling needs a height and a width)")


def internvl_image_config(
    preprocessor_config: dict[str, Any] | None = None, *, crop_to_patches: bool | None = True
) -> InternVLImageConfig:
    """An ``InternVLImageConfig`` from a checkpoint's ``preprocessor_config.json`` dict.

    ``None`` gives the InternVL ``-hf`` defaults (``InternVLImageConfig()``). In a dict (or the
    ``image_processor`` section of a ``processor_config.json``) a missing or null key takes
    ``GotOcr2ImageProcessorPil``'s class default, as transformers does (note: 384 px and the
    OpenAI CLIP mean/std, not InternVL's values). ``crop_to_patches=True`` (the default) is what
    ``InternVLProcessor`` passes on every call, overriding the file; ``None`` reads it from the
    dict (a bare image processor's behaviour).
    """
    if preprocessor_config is None:
        cfg = InternVLImageConfig()
        return cfg if crop_to_patches is None else dataclasses.replace(cfg, crop_to_patches=bool(crop_to_patches))
    raw = preprocessor_config.get("image_processor", preprocessor_config)
    if not isinstance(raw, dict):
        raise ValueError(f"expected a preprocessor config dict, got {type(raw).__name__}")
    get = lambda key: raw[key] if raw.get(key) is not None else _GOT_OCR2_DEFAULTS[key]  # noqa: E731
    tile_h, tile_w = _tile_hw(get("size"))
    mean, std = get("image_mean"), get("image_std")
    mean = [mean] * 3 if isinstance(mean, (int, float)) else mean
    std = [std] * 3 if isinstance(std, (int, float)) else std
    crop = get("crop_to_patches") if crop_to_patches is None else crop_to_patches
    return InternVLImageConfig(
        tile_height=tile_h,
        tile_width=tile_w,
        min_patches=int(get("min_patches")),
        max_patches=int(get("max_patches")),
        crop_to_patches=bool(crop),
        image_mean=tuple(float(v) for v in mean),
        image_std=tuple(float(v) for v in std),
        rescale_factor=float(get("rescale_factor")),
        resample=int(get("resample")),
        do_resize=bool(get("do_resize")),
        do_rescale=bool(get("do_rescale")),
        do_normalize=bool(get("do_normalize")),
        do_convert_rgb=bool(get("do_convert_rgb")),
    )


def _grids(min_patches: int, max_patches: int) -> list[tuple[int, int]]:
    """transformers' ``get_all_supported_aspect_ratios``: (cols, rows) with min <= cols*rows <= max,
    built cols-major then rows, then stably sorted by cols*rows."""
    grids = [
        (c, r)
        for c in range(1, max_patches + 1)
        for r in range(1, max_patches + 1)
        if min_patches <= c * r <= max_patches
    ]
    return sorted(grids, key=lambda g: g[0] * g[1])


def tile_grid(width: int, height: int, cfg: InternVLImageConfig) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of ``width`` x ``height`` pixels, as transformers'
    ``get_optimal_tiled_canvas`` picks them; (1, 1) when ``cfg`` does not tile.

    Over the (cols, rows) grids with min..max tiles, in order of increasing cols*rows (equal areas:
    fewer cols first), the grid minimising ``|width/height - cols/rows|`` wins; a later grid with an
    exactly equal difference replaces the current best iff ``width * height > 0.5 * tile_height *
    tile_width * cols * rows`` (more tiles while the image area exceeds half the tiled canvas).
    """
    width, height = int(width), int(height)
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height} (w x h)")
    if not cfg.tiling:
        return 1, 1
    aspect_ratio = width / height
    area = width * height
    best_diff, best = float("inf"), (1, 1)  # best is (cols, rows)
    for cols, rows in _grids(cfg.min_patches, cfg.max_patches):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * cfg.tile_height * cfg.tile_width * cols * rows:
            best = (cols, rows)
    return best[1], best[0]


@dataclasses.dataclass(frozen=True)
class InternVLImageLayout:
    """Where one image's tiles come from.

    The image (``width`` x ``height``) is resized, by scaling alone (no crop, no padding), to
    ``resized_size`` = (cols * tile_width, rows * tile_height); tile i (0-based, 0 <= i < rows*cols)
    is the block at row ``i // cols``, column ``i % cols`` of that resized image (``tile_boxes``
    gives its box in the original's pixels). If ``has_thumbnail``, the image's last patch is the
    whole image resized to one tile. Without tiling, rows = cols = 1 and the tile is the whole
    image resized (or, with ``do_resize`` off, not resized: the tile size is then the image's).
    """

    rows: int
    cols: int
    has_thumbnail: bool
    width: int  # original image
    height: int
    tile_width: int
    tile_height: int

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols)."""
        return self.rows, self.cols

    @property
    def image_size(self) -> tuple[int, int]:
        """The original (width, height), as PIL's ``Image.size``."""
        return self.width, self.height

    @property
    def resized_size(self) -> tuple[int, int]:
        """(width, height) of the resized image that the tiles are cut from."""
        return self.cols * self.tile_width, self.rows * self.tile_height

    @property
    def num_tiles(self) -> int:
        """Tiles of the grid, thumbnail excluded."""
        return self.rows * self.cols

    @property
    def num_patches(self) -> int:
        """Tiles including the thumbnail (transformers' ``num_patches``)."""
        return self.num_tiles + int(self.has_thumbnail)


def tile_boxes(layout: InternVLImageLayout) -> np.ndarray:
    """Boxes (x0, y0, x1, y1) of the non-thumbnail tiles in original-image pixels -> (n_tiles, 4)
    float64, row-major like the tiles; tile (r, c) is [c*W/cols, r*H/rows, (c+1)*W/cols, (r+1)*H/rows].
    (The thumbnail, if any, covers the whole image, (0, 0, W, H).)"""
    r, c = np.divmod(np.arange(layout.num_tiles), layout.cols)  # each (n_tiles,)
    sx, sy = layout.width / layout.cols, layout.height / layout.rows
    return np.stack([c * sx, r * sy, (c + 1) * sx, (r + 1) * sy], axis=1).astype(np.float64)  # (n_tiles, 4)


@dataclasses.dataclass(frozen=True)
class InternVLPixels:
    """``preprocess_internvl``'s result.

    ``pixel_values`` (total_tiles, 3, tile_height, tile_width) float32: each image's tiles in
    row-major order then its thumbnail, image after image. ``num_patches`` (num_images,) int64:
    patches per image, thumbnail included. ``layouts``: one ``InternVLImageLayout`` per image.
    """

    pixel_values: np.ndarray  # (total_tiles, 3, tile_height, tile_width) float32
    num_patches: np.ndarray  # (num_images,) int64
    layouts: tuple[InternVLImageLayout, ...]

    def image_patches(self, index: int) -> np.ndarray:
        """Image ``index``'s patches -> (num_patches[index], 3, tile_height, tile_width)."""
        start = int(self.num_patches[:index].sum())
        return self.pixel_values[start : start + int(self.num_patches[index])]


def _spec(cfg: InternVLImageConfig, resize_hw: tuple[int, int] | None) -> ImageSpec:
    """The CLIP ``ImageSpec`` that resizes an RGB image to exactly ``resize_hw`` (h, w) (or not at
    all if None), then rescales and normalises as ``cfg`` says; no crop, no conversion."""
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


def _one_image(image: Image.Image, cfg: InternVLImageConfig) -> tuple[list[np.ndarray], InternVLImageLayout]:
    """One RGB image -> its patches (each (3, tile_height, tile_width) float32) and layout."""
    width, height = image.size
    th, tw = cfg.tile_height, cfg.tile_width
    if not cfg.tiling:
        resize_hw = (th, tw) if cfg.do_resize else None
        patch = preprocess_image(image, _spec(cfg, resize_hw))  # (3, h, w)
        layout = InternVLImageLayout(1, 1, False, width, height, patch.shape[2], patch.shape[1])
        return [patch], layout
    rows, cols = tile_grid(width, height, cfg)
    resized = preprocess_image(image, _spec(cfg, (rows * th, cols * tw)))  # (3, rows*th, cols*tw)
    patches = [
        resized[:, (i // cols) * th : (i // cols + 1) * th, (i % cols) * tw : (i % cols + 1) * tw]
        for i in range(rows * cols)
    ]  # each (3, th, tw)
    has_thumbnail = cfg.use_thumbnail and rows * cols != 1
    if has_thumbnail:
        patches.append(preprocess_image(image, _spec(cfg, (th, tw))))  # (3, th, tw)
    return patches, InternVLImageLayout(rows, cols, has_thumbnail, width, height, tw, th)


def preprocess_internvl(
    images: Sequence[Image.Image] | Image.Image, cfg: InternVLImageConfig = InternVLImageConfig()
) -> InternVLPixels:
    """PIL images (any mode) -> ``InternVLPixels``, equal to transformers' InternVL image processing
    (``GotOcr2ImageProcessorPil`` called with ``cfg``'s settings)."""
    if isinstance(images, Image.Image):
        images = [images]
    if len(images) == 0:
        raise ValueError("no images given")
    patches: list[np.ndarray] = []  # each (3, th, tw)
    layouts = []
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"image {index} is a {type(image).__name__}, not a PIL image")
        if image.width < 1 or image.height < 1:
            raise ValueError(f"image {index} is empty: {image.width}x{image.height} (w x h)")
        if cfg.do_convert_rgb:
            image = _to_rgb(image)
        if image.mode != "RGB":
            raise ValueError(f"image {index} has mode {image.mode!r}, not RGB (enable do_convert_rgb)")
        image_patches, layout = _one_image(image, cfg)
        patches.extend(image_patches)
        layouts.append(layout)
    shapes = {p.shape for p in patches}
    if len(shapes) != 1:
        raise ValueError(f"patches differ in shape (do_resize is off): {sorted(shapes)}")
    pixel_values = np.ascontiguousarray(np.stack(patches), dtype=np.float32)  # (total_tiles, 3, th, tw)
    num_patches = np.array([lay.num_patches for lay in layouts], dtype=np.int64)  # (num_images,)
    return InternVLPixels(pixel_values, num_patches, tuple(layouts))
