"""Figures of the logit lens (jaxflow.analysis.logit_lens.LensReport), built without pyplot (as
jaxflow.viz.figures; write them with `figures.save`):

- `answer_lens_figure`: the answer's first token at the last prompt position, per lens layer: its
  rank (log scale) and its probability, with the lens's top-1 word of every layer written above;
- `image_tokens_figure`: for a few layers, the top-1 word of every image token on the image's grid,
  over the original image: cells coloured by word (the most frequent words of the shown layers get
  their own colours, listed in a legend; a colour word such as "red" in its colour), the word written
  in the cell when the grid is small enough.
"""
from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib import colors, ticker
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from jaxflow.viz.figures import as_map_image

MAX_WORDS_IN_CELLS = 16  # grids up to this many columns get the words written in their cells
LEGEND_WORDS = 10


def answer_lens_figure(report, word, *, title: str) -> Figure:
    """Two panels over the lens layers 0..L: the first answer token's rank (1 = the lens's top-1; log
    scale) and probability at the last prompt position. `word(token id) -> str`."""
    L = report.num_layers
    x = np.arange(L + 1)
    fig = Figure(figsize=(max(6.5, 0.28 * (L + 1) + 3), 6), constrained_layout=True)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    rank1 = report.answer_rank.astype(np.float64) + 1
    ax1.semilogy(x, rank1, marker="o", ms=3, color="tab:blue")
    ax1.axhline(1, color="grey", lw=0.8, ls="--")
    ax1.set_ylim(max(2.0, rank1.max() * 1.5), 0.8)  # inverted: the top is rank 1
    ax1.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax1.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax1.set_ylabel("rank of the answer token (1 = top)")
    ax1.grid(alpha=0.3)
    ax2.plot(x, report.answer_prob, marker="o", ms=3, color="tab:orange", label=f"P({word(report.first_token)!r})")
    ax2.plot(x, report.top_probs[:, 0], ls=":", color="grey", label="P(lens top-1)")
    for l in x:  # the lens's top-1 word at each layer
        ax2.annotate(word(report.top_ids[l, 0])[:12], (l, report.top_probs[l, 0]), textcoords="offset points",
                     xytext=(0, 4), ha="center", fontsize=7, rotation=60 if L > 12 else 0, color="dimgrey")
    ax2.set_ylim(-0.02, 1.12)
    ax2.set_ylabel("probability")
    ax2.set_xlabel(f"lens layer l (the residual entering layer l; l = {L}: the model's output)")
    ax2.legend(loc="upper left", fontsize=8)
    ax2.grid(alpha=0.3)
    if L + 1 <= 40:
        ax2.set_xticks(x if L < 20 else x[::2])
    fig.suptitle(title if len(title) < 100 else title[:97] + "...", fontsize=10)
    return fig


def _word_colours(report, layers, word):
    """The most frequent top-1 words over the shown layers -> colours (others grey)."""
    spatial = report.image_cells >= 0
    counts: dict[str, int] = {}
    for l in layers:
        for t in report.image_top_ids[l, spatial, 0]:
            w = word(t)
            counts[w] = counts.get(w, 0) + 1
    top = sorted(counts, key=lambda w: (-counts[w], w))[:LEGEND_WORDS]
    # a colour word is drawn in its colour; the other words get muted hues from tab20b
    others = iter(colors.to_rgb(c) for c in matplotlib.colormaps["tab20b"].colors[::2] +
                  matplotlib.colormaps["tab20b"].colors[1::2])
    out = {}
    for w in top:
        name = w.strip().lower()
        out[w] = colors.to_rgb(name) if name.isalpha() and name in colors.CSS4_COLORS else next(others)
    return out


def image_tokens_figure(report, word, layers, image, *, title: str) -> Figure:
    """One panel per lens layer in `layers`: the image (a MapImage, or an (H, W, 3) array the grid
    covers whole) with each image token's cell coloured by its top-1 word (and the word written in it
    when the grid has at most MAX_WORDS_IN_CELLS columns). Tokens that are not spatial (CLS, a
    thumbnail tile) are not drawn."""
    frame = as_map_image(image)
    gh, gw = report.grid
    h, w = frame.image.shape[:2]
    cx0, cy0, cx1, cy1 = frame.canvas
    bx0, by0, bx1, by1 = frame.map_box
    cw, ch = (bx1 - bx0) / gw, (by1 - by0) / gh
    palette = _word_colours(report, layers, word)
    n = len(layers)
    cols = min(n, 4)
    rows = -(-n // cols)
    aspect = (cy1 - cy0) / max(cx1 - cx0, 1)
    fig = Figure(figsize=(3.6 * cols, 3.6 * rows * aspect + 1.4), constrained_layout=True)
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    text_size = max(3.0, min(8.0, 150.0 / max(gw, 1) / cols * 1.2))
    for ax, l in zip(axes, layers):
        grid = report.word_grid(l)
        ax.set_facecolor(np.asarray(frame.fill, np.float64) / 255.0)
        ax.imshow(frame.image, extent=(0, w, h, 0))
        rgba = np.zeros((gh, gw, 4))
        for r in range(gh):
            for c in range(gw):
                if grid[r, c] < 0:
                    continue
                wd = word(grid[r, c])
                rgba[r, c] = (*palette.get(wd, (0.6, 0.6, 0.6)), 0.45)
                if gw <= MAX_WORDS_IN_CELLS:
                    ax.text(bx0 + (c + 0.5) * cw, by0 + (r + 0.5) * ch, wd if len(wd) <= 8 else wd[:7] + "\u2026",
                            ha="center", va="center",
                            fontsize=text_size, color="black")
        ax.imshow(rgba, extent=(bx0, bx1, by1, by0), interpolation="nearest")
        ax.set_xlim(cx0, cx1)
        ax.set_ylim(cy1, cy0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"l = {l}" + (" (the model's output)" if l == report.num_layers else
                                   " (embeddings)" if l == 0 else f" (entering layer {l})"), fontsize=9)
    for ax in axes[n:]:
        ax.axis("off")
    handles = [Patch(facecolor=(*rgb, 0.6), label=wd) for wd, rgb in palette.items()]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=8,
                   title="top-1 word of the image token", title_fontsize=8)
    fig.suptitle(title if len(title) < 100 else title[:97] + "...", fontsize=10)
    return fig
