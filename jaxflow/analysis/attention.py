"""Attention shares: how the selected query tokens' attention divides among S, T and U, per layer.

For layer l and query i, with A_l(i, j) the attention probabilities averaged over heads (or their
maximum over heads, heads="max"):
    share_g(i) = sum_{j in g} A_l(i, j) / sum_{j in S u T u U} A_l(i, j)    for g in S, T, U
(answer-token keys are left out of the denominator), then averaged over the selected queries of the
row. Default queries: the answer tokens when an answer_mask is given, else each row's last real token.

The probabilities come from the reference attention path for the selected rows only
(`attn_rows`): (L, B, H, Q, T) — never (L, H, T, T) — while the rest of the forward runs fused.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxflow.analysis._common import pad_rows, prepare
from jaxflow.forward import forward_core
from jaxflow.models.image_layout import place_on_grid

GROUPS = ("S", "T", "U")
HEAD_REDUCTIONS = ("mean", "max")


@dataclasses.dataclass
class AttentionResult:
    """Attention of the selected queries. L = decoder layers, Q = most queries in a row."""
    shares: np.ndarray  # (B, L, 3) float32 S, T, U shares (rows sum to 1), averaged over the queries
    query_shares: np.ndarray  # (B, L, Q, 3) float32 per query (zeros where query_mask is False)
    image_maps: np.ndarray  # (I, L, gh, gw) float32 head-reduced attention of its row's queries to each token of
    # image i, query mean (on each image's grid; smaller images are zero outside theirs; I = B with one image per row)
    rows: np.ndarray  # (B, L, Q, T) float32 head-reduced attention rows of the queries
    query_positions: np.ndarray  # (B, Q) int32 query positions in the sequence
    query_mask: np.ndarray  # (B, Q) bool: which entries are real queries
    group_masks: np.ndarray  # (B, 3, T) bool key groups S, T, U
    grids: np.ndarray  # (I, 2) int32 each image's own grid (gh, gw)
    image_rows: np.ndarray | None = None  # (I,) int32 the row of each image


def default_queries(attention_mask: np.ndarray, answer_mask: np.ndarray | None) -> np.ndarray:
    """(B, T) bool: the answer tokens where a row has any, else the row's last real token."""
    mask = np.asarray(attention_mask) > 0
    q = np.zeros(mask.shape, bool) if answer_mask is None else np.asarray(answer_mask, bool).copy()
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    for b in np.flatnonzero(~q.any(axis=1)):
        q[b, last[b]] = True
    return q


@partial(jax.jit, static_argnames=("impl", "grid_hw"))
def _attention_jit(model, ids, pixels, mask, qpos, qvalid, groups, img_rows, img_pos, cells, head_max, *, impl,
                   grid_hw):
    out = forward_core(model, ids, pixels, mask, impl=impl, attn_rows=qpos)
    p = out.attn_rows  # (L, B, H, Q, T) float32
    a = jnp.where(head_max, jnp.max(p, axis=2), jnp.mean(p, axis=2))  # (L, B, Q, T)
    mass = jnp.einsum("lbqt,bgt->lbqg", a, groups)  # (L, B, Q, 3)
    q_shares = mass / jnp.sum(mass, axis=-1, keepdims=True)
    w = qvalid / jnp.sum(qvalid, axis=-1, keepdims=True)  # (B, Q)
    shares = jnp.einsum("lbqg,bq->blg", q_shares, w)
    img = jnp.take_along_axis(a[:, img_rows], img_pos[None, :, None, :], axis=3)  # (L, I, Q, N)
    img_map = jnp.einsum("liqn,iq->iln", img, w[img_rows])
    q_shares = jnp.where(qvalid[None, :, :, None] > 0, q_shares, 0.0)
    return (shares, jnp.transpose(q_shares, (1, 0, 2, 3)), place_on_grid(img_map, cells, grid_hw),
            jnp.transpose(a, (1, 0, 2, 3)))


def attention_analysis(model, input_ids, pixel_values, query_mask=None, *, attention_mask=None, answer_mask=None,
                       heads: str = "mean", attn_impl: str = "fused", **image_kw) -> AttentionResult:
    """Shares of S, T, U, image-attention maps and the attention rows of the selected queries, per layer.

    query_mask (B, T) bool selects the query tokens (default: the answer tokens, else the last real
    token). answer_mask (B, T) marks the answer tokens so that they are excluded from the U group
    (pass it whenever the sequence holds an answer). heads: "mean" (the paper) or "max" over heads.
    Compiled once per input shape.
    """
    if heads not in HEAD_REDUCTIONS:
        raise ValueError(f"heads must be one of {HEAD_REDUCTIONS}, got {heads!r}")
    p = prepare(model, input_ids, pixel_values, attention_mask, answer_mask, attn_impl=attn_impl, **image_kw)
    if query_mask is None:
        qm = default_queries(p.attention_mask, answer_mask)
    else:
        qm = np.asarray(query_mask)
        if qm.shape != p.input_ids.shape:
            raise ValueError(f"query_mask shape {qm.shape} differs from input_ids shape {p.input_ids.shape}")
        qm = qm.astype(bool)
        if (qm & (p.attention_mask == 0)).any():
            raise ValueError("query_mask marks padding positions (attention_mask 0)")
        empty = np.flatnonzero(~qm.any(axis=1))
        if empty.size:
            raise ValueError(f"query_mask row {int(empty[0])} is empty: select at least one query token")
    qpos, qvalid = pad_rows(qm, fill_outside=True)
    sp = p.spans
    groups = np.stack([sp.system, sp.image, sp.user], axis=1).astype(np.float32)  # (B, 3, T)
    shares, q_shares, img, rows = _attention_jit(
        model, jnp.asarray(p.input_ids), p.images, jnp.asarray(p.attention_mask),
        jnp.asarray(qpos), jnp.asarray(qvalid, jnp.float32), jnp.asarray(groups), jnp.asarray(p.image_rows),
        jnp.asarray(p.image_positions),
        jnp.asarray(p.layout.cells), jnp.bool_(heads == "max"), impl=attn_impl, grid_hw=tuple(p.grid_hw))
    return AttentionResult(shares=np.asarray(shares), query_shares=np.asarray(q_shares), image_maps=np.asarray(img),
                           rows=np.asarray(rows), query_positions=qpos, query_mask=qvalid,
                           group_masks=groups.astype(bool), grids=p.layout.grids, image_rows=p.image_rows)


def attention_shares(model, input_ids, pixel_values, query_mask=None, *, attention_mask=None, answer_mask=None,
                     heads: str = "mean", attn_impl: str = "fused", **image_kw) -> np.ndarray:
    """(B, L, 3) float32: per layer, the shares of S, T, U in the selected queries' attention.

    Heads averaged (heads="max": maximum over heads); each query's shares are normalised over
    S u T u U and then averaged over the row's queries, so every (b, l) row sums to 1. query_mask
    (B, T) bool, default: the answer tokens (answer_mask) else the last real token of each row.
    """
    return attention_analysis(model, input_ids, pixel_values, query_mask, attention_mask=attention_mask,
                              answer_mask=answer_mask, heads=heads, attn_impl=attn_impl, **image_kw).shares
