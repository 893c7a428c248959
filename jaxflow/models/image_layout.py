"""Where the image tokens sit and where each one belongs on its image: the host-side `ImageLayout`.

A family describes one image's tokens with an `ImageGeometry`: the image's grid (rows, columns of
the map drawn over the original image) and, for each of its tokens in sequence order, the flat cell
(row * grid_w + column) it covers, or -1 for a token that is not spatial (CLS, a thumbnail tile).
`image_layout` finds each image's tokens in the ids (a row may hold several images) and pairs them with
the image's geometry. Analyses work
per image token inside jit and place values on the grids with `place_on_grid`, so nothing square
is assumed by a family-agnostic analysis.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ImageGeometry:
    """One image: its grid and each of its tokens' cell on it."""
    grid: tuple[int, int]  # (gh, gw)
    cells: np.ndarray  # (n_tokens,) int32 flat cell, -1 = not spatial


def square_geometry(side: int, leading_non_spatial: int = 0) -> ImageGeometry:
    """A side x side grid in row-major order, after `leading_non_spatial` tokens (e.g. CLS)."""
    cells = np.concatenate([np.full(leading_non_spatial, -1), np.arange(side * side)]).astype(np.int32)
    return ImageGeometry((side, side), cells)


def tiled_geometry(tile_side: int, rows: int, cols: int, thumbnail: bool) -> ImageGeometry:
    """rows x cols tiles of tile_side x tile_side tokens each (row-major inside a tile, tiles in
    row-major order), stitched into one (rows * side, cols * side) grid; a thumbnail tile last is
    not spatial."""
    t = tile_side
    r, c = np.divmod(np.arange(t * t), t)
    cells = []
    for i in range(rows * cols):
        tr, tc = divmod(i, cols)
        cells.append((tr * t + r) * (cols * t) + tc * t + c)
    if thumbnail:
        cells.append(np.full(t * t, -1))
    return ImageGeometry((rows * t, cols * t), np.concatenate(cells).astype(np.int32))


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """The images of a batch, one entry per image (row-major: the images of row 0, then row 1, ...;
    a row may hold several). Host side, numpy. I = images, N = most tokens of one image."""
    positions: np.ndarray  # (I, N) int32 sequence position of each image token in its row
    valid: np.ndarray  # (I, N) bool: a real image token (False: padding of smaller images)
    cells: np.ndarray  # (I, N) int32 flat cell on the batch grid `grid_hw` (row r, column c of the image's own
    # grid -> r * GW + c); -1 = not spatial or padding
    grids: np.ndarray  # (I, 2) int32 each image's grid (gh, gw)
    rows: np.ndarray  # (I,) int32 the batch row each image lies in

    @property
    def grid_hw(self) -> tuple[int, int]:
        """The largest grid: per-image maps are placed on it (top-left aligned, zeros outside)."""
        return int(self.grids[:, 0].max()), int(self.grids[:, 1].max())

    def crop(self, maps: np.ndarray, image: int) -> np.ndarray:
        """(..., GH, GW) padded maps of image `image` -> (..., gh, gw) on its own grid."""
        gh, gw = (int(x) for x in self.grids[image])
        return maps[..., :gh, :gw]


def image_layout(input_ids, attention_mask, image_token_id: int, geometries) -> ImageLayout:
    """Pairs the image tokens of the batch with the images' geometries (one per image, in row-major
    order): each row's image tokens are taken in sequence order, each image's count (its geometry's
    token count) at a time, and each image's tokens must be one contiguous run.

    Raises ValueError naming the row when a row has no image token, or when the rows' image tokens
    and the images' token counts do not match.
    """
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    b = ids.shape[0]
    blocks, rows = [], []
    g = 0
    for r in range(b):
        idx = np.flatnonzero((ids[r] == image_token_id) & (mask[r] > 0))
        if idx.size == 0:
            raise ValueError(f"row {r} has no image token (id {image_token_id})")
        i = 0
        while i < idx.size:
            if g >= len(geometries):
                raise ValueError(f"row {r} holds more image tokens than the {len(geometries)} images give")
            n = geometries[g].cells.size
            run = idx[i:i + n]
            if run.size != n or run[-1] - run[0] + 1 != n:
                raise ValueError(f"row {r}: image {g} needs {n} contiguous image tokens; the row's image tokens "
                                 f"from position {idx[i]} do not form such a run ({idx.size - i} left)")
            blocks.append(run)
            rows.append(r)
            g += 1
            i += n
    if g != len(geometries):
        raise ValueError(f"{len(geometries)} images for the {g} image-token blocks of {b} rows")
    n_max = max(x.size for x in blocks)
    count = len(blocks)
    positions = np.zeros((count, n_max), np.int32)
    valid = np.zeros((count, n_max), bool)
    cells = np.full((count, n_max), -1, np.int32)
    grids = np.asarray([geo.grid for geo in geometries], np.int32).reshape(count, 2)
    gw_all = int(grids[:, 1].max())
    for i, idx in enumerate(blocks):
        positions[i, :idx.size], positions[i, idx.size:] = idx, idx[-1]
        valid[i, :idx.size] = True
        own = geometries[i].cells
        rr, cc = np.divmod(own, geometries[i].grid[1])
        cells[i, :idx.size] = np.where(own >= 0, rr * gw_all + cc, -1)
    return ImageLayout(positions, valid, cells, grids, np.asarray(rows, np.int32))


def place_on_grid(x, cells, grid_hw: tuple[int, int]):
    """Per-token values (I, ..., N) -> (I, ..., gh, gw) on the grid (traceable): token n of image i goes
    to cell cells[i, n]; tokens with cell -1 are dropped; uncovered cells are 0. cells (I, N) int32."""
    gh, gw = grid_hw
    b, n = cells.shape
    flat = jnp.where(cells >= 0, cells, gh * gw)  # out of range: dropped
    lead = x.shape[1:-1]
    xt = jnp.moveaxis(x, -1, 1).reshape(b, n, -1)  # (B, N, prod(lead))
    out = jnp.zeros((b, gh * gw, xt.shape[-1]), x.dtype)
    out = out.at[jnp.arange(b)[:, None], flat].set(xt, mode="drop")
    return jnp.moveaxis(out.reshape((b, gh * gw) + lead), 1, -1).reshape((b,) + lead + (gh, gw))
