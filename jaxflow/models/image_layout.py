"""Where the image tokens sit and where each one belongs on its image: the host-side `ImageLayout`.

A family describes one image's tokens with an `ImageGeometry`: the image's grid (rows, columns of
the map drawn over the original image) and, for each of its tokens in sequence order, the flat cell
(row * grid_w + column) it covers, or -1 for a token that is not spatial (CLS, a thumbnail tile).
`image_layout` finds each row's image block in the ids and pairs it with its geometry. Analyses work
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
    """The image tokens of a batch with one image per row (host side, numpy)."""
    positions: np.ndarray  # (B, N) int32 sequence position of each image token (N = most in a row)
    valid: np.ndarray  # (B, N) bool: a real image token (False: padding of shorter rows)
    cells: np.ndarray  # (B, N) int32 flat cell on the batch grid `grid_hw` (row r, column c of the row's own
    # grid -> r * GW + c); -1 = not spatial or padding
    grids: np.ndarray  # (B, 2) int32 each row's grid (gh, gw)
    image_start: np.ndarray  # (B,) int32 first image token
    image_end: np.ndarray  # (B,) int32 one past the last image token

    @property
    def grid_hw(self) -> tuple[int, int]:
        """The largest grid: per-row maps are placed on it (top-left aligned, zeros outside)."""
        return int(self.grids[:, 0].max()), int(self.grids[:, 1].max())

    def crop(self, maps: np.ndarray, row: int) -> np.ndarray:
        """(..., GH, GW) padded maps of `row` -> (..., gh, gw) on the row's own grid."""
        gh, gw = (int(x) for x in self.grids[row])
        return maps[..., :gh, :gw]


def image_layout(input_ids, attention_mask, image_token_id: int, geometries) -> ImageLayout:
    """Pairs each row's one contiguous image-token block with its geometry (one per row, in order).

    Raises ValueError naming the row when a row has no block, a broken block, or a block whose
    length differs from its geometry's token count.
    """
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    b = ids.shape[0]
    if len(geometries) != b:
        raise ValueError(f"{len(geometries)} images for {b} rows: the analyses need one image per row")
    blocks = []
    for r in range(b):
        idx = np.flatnonzero((ids[r] == image_token_id) & (mask[r] > 0))
        if idx.size == 0:
            raise ValueError(f"row {r} has no image token (id {image_token_id})")
        if idx[-1] - idx[0] + 1 != idx.size:
            raise ValueError(f"row {r}: image tokens are not contiguous ({idx.size} image tokens spread over "
                             f"positions {idx[0]}..{idx[-1]})")
        if idx.size != geometries[r].cells.size:
            raise ValueError(f"row {r} holds {idx.size} image tokens but its image gives "
                             f"{geometries[r].cells.size}")
        blocks.append(idx)
    n = max(x.size for x in blocks)
    positions = np.zeros((b, n), np.int32)
    valid = np.zeros((b, n), bool)
    cells = np.full((b, n), -1, np.int32)
    grids = np.asarray([g.grid for g in geometries], np.int32).reshape(b, 2)
    gw_all = int(grids[:, 1].max())
    for r, idx in enumerate(blocks):
        positions[r, :idx.size], positions[r, idx.size:] = idx, idx[-1]
        valid[r, :idx.size] = True
        own = geometries[r].cells
        rr, cc = np.divmod(own, geometries[r].grid[1])
        cells[r, :idx.size] = np.where(own >= 0, rr * gw_all + cc, -1)
    return ImageLayout(positions, valid, cells, grids, np.asarray([x[0] for x in blocks], np.int32),
                       np.asarray([x[-1] + 1 for x in blocks], np.int32))


def place_on_grid(x, cells, grid_hw: tuple[int, int]):
    """Per-token values (B, ..., N) -> (B, ..., gh, gw) on the grid (traceable): token n of row b goes
    to cell cells[b, n]; tokens with cell -1 are dropped; uncovered cells are 0. cells (B, N) int32."""
    gh, gw = grid_hw
    b, n = cells.shape
    flat = jnp.where(cells >= 0, cells, gh * gw)  # out of range: dropped
    lead = x.shape[1:-1]
    xt = jnp.moveaxis(x, -1, 1).reshape(b, n, -1)  # (B, N, prod(lead))
    out = jnp.zeros((b, gh * gw, xt.shape[-1]), x.dtype)
    out = out.at[jnp.arange(b)[:, None], flat].set(xt, mode="drop")
    return jnp.moveaxis(out.reshape((b, gh * gw) + lead), 1, -1).reshape((b,) + lead + (gh, gw))
