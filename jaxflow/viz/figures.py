"""Matplotlib figures of the analyses (PNG): CAM overlays, attention shares, heat maps, flows.

Every function takes numpy arrays for one example and returns a `matplotlib.figure.Figure` built
without pyplot (no global backend or figure state is touched, so it is safe in notebooks);
`save(fig, path)` writes a PNG (through a temporary file renamed into place).
Overlays upsample the token grid to the image bilinearly (half-pixel centres, edges clamped:
the convention of `jax.image.resize(..., "bilinear")` and torch's `align_corners=False`).

The image under an overlay is an (H, W, 3) uint8 array, which the map covers whole, or a `MapImage`:
the original image and the box, in its pixels, that the map's grid covers (LLaVA: the centre crop
mapped back, or the padded square; InternVL: the whole image). `map_raster` resamples a grid onto
the image's pixels inside that box.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
from matplotlib import colors, transforms
from matplotlib.figure import Figure

GROUP_COLORS = {"S": "#4C72B0", "T": "#DD8452", "U": "#55A868", "A": "#C44E52"}
GROUP_NAMES = {"S": "system (S)", "T": "image (T)", "U": "user (U)", "A": "answer (A)"}


def upsample_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) -> (H, W) bilinear with half-pixel centres and clamped edges."""
    x = np.asarray(x, np.float64)
    h, w = x.shape
    hh, ww = size

    def coords(n_out, n_in):
        c = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        c = np.clip(c, 0, n_in - 1)
        lo = np.floor(c).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, c - lo

    y0, y1, fy = coords(hh, h)
    x0, x1, fx = coords(ww, w)
    top = x[y0][:, x0] * (1 - fx) + x[y0][:, x1] * fx
    bot = x[y1][:, x0] * (1 - fx) + x[y1][:, x1] * fx
    return (top * (1 - fy)[:, None] + bot * fy[:, None]).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class MapImage:
    """An image to draw token-grid maps over: `image` (H, W, 3) uint8 (the original image) and `box`
    (x0, y0, x1, y1), in its pixels, the region the map's grid covers (None: the whole image). A box
    reaching outside the image (LLaVA's pad_square) widens the canvas; the part of the canvas outside
    the image is drawn in `fill` (RGB 0..255, the padding colour the model saw)."""
    image: np.ndarray
    box: tuple[float, float, float, float] | None = None
    fill: tuple[int, int, int] = (255, 255, 255)

    @property
    def map_box(self) -> tuple[float, float, float, float]:
        h, w = self.image.shape[:2]
        return (0.0, 0.0, float(w), float(h)) if self.box is None else tuple(float(v) for v in self.box)

    @property
    def canvas(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) integer pixel bounds of what is drawn: the image and the map's box."""
        h, w = self.image.shape[:2]
        bx0, by0, bx1, by1 = self.map_box
        return (min(0, math.floor(bx0)), min(0, math.floor(by0)), max(w, math.ceil(bx1)), max(h, math.ceil(by1)))


def as_map_image(image) -> MapImage:
    """A MapImage, or an (H, W, 3) array that the map covers whole."""
    return image if isinstance(image, MapImage) else MapImage(np.asarray(image))


def map_raster(image, m: np.ndarray) -> np.ndarray:
    """A (gh, gw) map resampled onto the canvas pixels of `image` (a MapImage or an array the map
    covers whole): (canvas height, canvas width) float32, bilinear with half-pixel centres inside the
    map's box (edges clamped), NaN outside it. For a box equal to the whole image it is
    `upsample_bilinear(m, (H, W))`."""
    frame = as_map_image(image)
    m = np.asarray(m, np.float64)
    gh, gw = m.shape
    cx0, cy0, cx1, cy1 = frame.canvas
    bx0, by0, bx1, by1 = frame.map_box

    def coords(start, stop, lo, hi, n_in):  # canvas pixels [start, stop) -> source coords, inside mask
        p = np.arange(start, stop) + 0.5  # pixel centres in image coordinates
        c = (p - lo) * n_in / (hi - lo) - 0.5
        inside = (p >= lo) & (p < hi)
        c = np.clip(c, 0, n_in - 1)
        i0 = np.floor(c).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), c - i0, inside

    y0, y1, fy, iny = coords(cy0, cy1, by0, by1, gh)
    x0, x1, fx, inx = coords(cx0, cx1, bx0, bx1, gw)
    top = m[y0][:, x0] * (1 - fx) + m[y0][:, x1] * fx
    bot = m[y1][:, x0] * (1 - fx) + m[y1][:, x1] * fx
    out = (top * (1 - fy)[:, None] + bot * fy[:, None]).astype(np.float32)
    return np.where(np.outer(iny, inx), out, np.float32(np.nan))


def _aspect(image) -> float:
    """Height / width of what an overlay draws."""
    x0, y0, x1, y1 = as_map_image(image).canvas
    return (y1 - y0) / max(x1 - x0, 1)


def _grid_shape(n: int, cols: int) -> tuple[int, int]:
    cols = max(1, min(cols, n))
    return -(-n // cols), cols


def _overlay(ax, image, m, *, vmin=0.0, vmax=1.0, cmap="jet", alpha=0.5):
    frame = as_map_image(image)
    h, w = frame.image.shape[:2]
    cx0, cy0, cx1, cy1 = frame.canvas
    ax.set_facecolor(np.asarray(frame.fill, np.float64) / 255.0)
    ax.imshow(frame.image, extent=(0, w, h, 0))
    im = ax.imshow(map_raster(frame, m), cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax,
                   extent=(cx0, cx1, cy1, cy0))
    ax.set_xlim(cx0, cx1)
    ax.set_ylim(cy1, cy0)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def layer_grid_figure(image: np.ndarray, maps: np.ndarray, *, title: str, layers=None, cols: int = 8,
                      cbar_label: str = "relevance / layer max", cmap: str = "jet", alpha: float = 0.5,
                      normalise: bool = False):
    """One overlay per layer: image (H, W, 3) uint8 or a MapImage, maps (L, gh, gw) in [0, 1]
    (normalise=True rescales each layer from its minimum to its maximum first)."""
    maps = np.asarray(maps, np.float32)
    layers = list(range(maps.shape[0])) if layers is None else list(layers)
    if normalise:  # min to max per layer (attention maps: the structure, not the level)
        flat = maps.reshape(maps.shape[0], -1)
        lo, span = flat.min(axis=1), np.ptp(flat, axis=1)
        maps = (maps - lo[:, None, None]) / np.where(span > 0, span, 1)[:, None, None]
    rows, cols = _grid_shape(len(layers), cols)
    width = max(1.9 * cols + 1.4, 7.5)
    panel = 1.75 * min(max(_aspect(image), 0.3), 2.5) + 0.25  # a square image: 2 inches
    height = panel * rows + 1.3
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(rows, cols, squeeze=False)
    im = None
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for ax, l in zip(axes.flat, layers):
        im = _overlay(ax, image, maps[l], cmap=cmap, alpha=alpha)
        peak = float(maps[l].max())
        ax.set_title(f"layer {l}" + ("" if peak > 0 else " (zero)"), fontsize=9)
    fig.suptitle(title, fontsize=11)
    top = 1 - 0.85 / height
    right = 1 - 1.25 / width  # room for the colour bar and its label, in inches
    fig.subplots_adjust(left=0.02, right=right, bottom=0.03, top=top, wspace=0.08, hspace=0.25)
    cax = fig.add_axes([right + 0.15 / width, 0.05, 0.13 / width, top - 0.07])
    fig.colorbar(im, cax=cax).set_label(cbar_label, fontsize=9)
    return fig


def token_grid_figure(image: np.ndarray, token_maps: np.ndarray, token_labels, *, title: str, layers=None,
                      cmap: str = "jet", alpha: float = 0.5):
    """Per answer token (rows) and layer (columns): token_maps (A, L, gh, gw) in [0, 1]; image as in
    `layer_grid_figure`."""
    token_maps = np.asarray(token_maps, np.float32)
    a, n_layers = token_maps.shape[:2]
    layers = list(range(n_layers)) if layers is None else list(layers)
    height = (1.55 * min(max(_aspect(image), 0.3), 2.5) + 0.25) * a + 1.2  # a square image: 1.8 per row
    width = max(1.7 * len(layers) + 2.4, 7.5)
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(a, len(layers), squeeze=False)
    im = None
    for i in range(a):
        for j, l in enumerate(layers):
            ax = axes[i, j]
            im = _overlay(ax, image, token_maps[i, l], cmap=cmap, alpha=alpha)
            if i == 0:
                ax.set_title(f"layer {l}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{i}: {token_labels[i]!s}"[:18], fontsize=9)
    fig.suptitle(title, fontsize=11)
    top = 1 - 1.05 / height
    right = 1 - 1.25 / width
    fig.subplots_adjust(left=0.7 / width, right=right, bottom=0.03, top=top, wspace=0.06, hspace=0.12)
    cax = fig.add_axes([right + 0.15 / width, 0.06, 0.13 / width, top - 0.12])
    fig.colorbar(im, cax=cax).set_label("relevance / max of its token and layer", fontsize=9)
    return fig


def shares_figure(shares: np.ndarray, *, title: str):
    """Stacked bars per layer of the S / T / U attention shares: shares (L, 3) (paper Fig. 2A)."""
    shares = np.asarray(shares, np.float64)
    n = shares.shape[0]
    x = np.arange(n)
    fig = Figure(figsize=(max(8.0, 0.28 * n + 3), 4.4))
    ax = fig.subplots()
    bottom = np.zeros(n)
    for k, g in enumerate("STU"):
        ax.bar(x, shares[:, k], bottom=bottom, width=0.85, color=GROUP_COLORS[g], label=GROUP_NAMES[g])
        bottom += shares[:, k]
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, 1)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("share of attention")
    ax.set_xticks(x if n <= 16 else x[::2])
    fig.suptitle(title, fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return fig


def _group_bounds(ranges: dict, length: int):
    return [(g, r) for g, r in (("S", ranges.get("system")), ("T", ranges.get("image")),
                                ("U", ranges.get("user")), ("A", ranges.get("answer"))) if r]


def attention_heatmap_figure(rows: np.ndarray, query_labels, ranges: dict, image: np.ndarray, image_map: np.ndarray,
                             *, layer: int, title: str):
    """One layer: the queries' attention over every key (Q, T), log colour scale, with the token groups
    marked; and that layer's attention to the image tokens over the image (an array or a MapImage)
    (paper Fig. 2B)."""
    rows = np.asarray(rows, np.float64)
    q, t = rows.shape
    fig = Figure(figsize=(13.5, max(3.6, 0.32 * q + 2.2)))
    ax = fig.add_axes([0.11, 0.2, 0.5, 0.62])
    pos = rows[rows > 0]
    vmin = max(float(pos.min()) if pos.size else 1e-6, float(rows.max()) * 1e-4, 1e-8)
    im = ax.imshow(np.maximum(rows, vmin), aspect="auto", interpolation="nearest", cmap="viridis",
                   norm=colors.LogNorm(vmin=vmin, vmax=max(float(rows.max()), vmin * 10)))
    top = transforms.blended_transform_factory(ax.transData, ax.transAxes)
    for k, (g, (s, e)) in enumerate(_group_bounds(ranges, t)):
        ax.axvline(s - 0.5, color="white", lw=0.8)
        narrow = (e - s) < 0.05 * t  # stagger the labels of narrow groups so that they do not collide
        ax.text((s + e - 1) / 2, 1.02 + (0.07 * (k % 2) if narrow else 0), g, transform=top, ha="center",
                va="bottom", color=GROUP_COLORS[g], fontsize=10, fontweight="bold", clip_on=False)
    ax.set_yticks(range(q))
    ax.set_yticklabels([str(s)[:16] for s in query_labels], fontsize=8)
    ax.set_xlabel("key position (token index)")
    ax.set_ylabel("query token")
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label("attention (heads averaged)")
    ax2 = fig.add_axes([0.69, 0.2, 0.24, 0.62])
    m = np.asarray(image_map, np.float32)
    lo, hi = float(m.min()), float(m.max())
    im2 = _overlay(ax2, image, m, vmin=lo, vmax=hi if hi > lo else lo + 1e-12, cmap="jet", alpha=0.55)
    ax2.set_title("attention to the image tokens\n(colour: min to max)", fontsize=10)
    cb2 = fig.colorbar(im2, ax=ax2, fraction=0.046, pad=0.03)
    cb2.set_label("attention (mean over queries)")
    fig.suptitle(f"{title} — layer {layer}", fontsize=11)
    return fig


def flows_figure(flows: dict, *, title: str):
    """Per-layer information flows (paper Fig. 1 as data): absolute sums (log scale) and the fractions of
    the flow into the answer. flows: name ("S->A", ...) -> (L,)."""
    names_a = [n for n in ("S->A", "T->A", "U->A", "A->A") if n in flows]
    names_u = [n for n in ("S->U", "T->U", "U->U") if n in flows]
    n = len(next(iter(flows.values())))
    x = np.arange(n)
    fig = Figure(figsize=(13, 4.8))
    ax1, ax2 = fig.subplots(1, 2)
    for name in names_a:
        ax1.plot(x, _positive(flows[name]), "-o", ms=3, color=GROUP_COLORS[name[0]],
                 label=name.replace("->", " → "))
    for name in names_u:
        ax1.plot(x, _positive(flows[name]), "--", color=GROUP_COLORS[name[0]], alpha=0.7,
                 label=name.replace("->", " → "))
    ax1.set_yscale("log")
    ax1.set_xlabel("decoder layer")
    ax1.set_ylabel("saliency  Σ |Σ_h A·∂s/∂A|")
    ax1.set_title("flow per layer (sum over token pairs; zeros not drawn)", fontsize=10)
    ax1.legend(fontsize=8, ncol=4, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    total = sum(np.asarray(flows[nm], np.float64) for nm in names_a)
    safe = np.where(total > 0, total, 1)
    bottom = np.zeros(n)
    for name in names_a:
        frac = np.where(total > 0, flows[name] / safe, 0)
        ax2.bar(x, frac, bottom=bottom, width=0.85, color=GROUP_COLORS[name[0]], label=name.replace("->", " → "))
        bottom += frac
    ax2.set_ylim(0, 1)
    ax2.set_xlim(-0.6, n - 0.4)
    ax2.set_xlabel("decoder layer")
    ax2.set_ylabel("fraction of the flow into A")
    ax2.set_title("where the answer's information comes from", fontsize=10)
    ax2.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xticks(x if n <= 16 else x[::2])
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig


def _positive(v):
    v = np.asarray(v, np.float64)
    return np.where(v > 0, v, np.nan)


def save(fig, path: str, dpi: int = 110) -> str:
    """Writes the figure as PNG (temp file, then renamed into place)."""
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi, format="png")
    os.replace(tmp, path)
    return path
