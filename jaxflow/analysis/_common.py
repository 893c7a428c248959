"""Shared pieces of the analyses: host-side validation, index tables, the teacher-forced target score.

Everything here runs on the host (numpy) except `target_scores`, which is traced inside the jitted
analyses. Index tables have static shapes: per-row lists are padded to the longest row and come
with a validity mask, so one compiled function serves a whole batch.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxflow.data.prompts import TokenSpans, token_spans
from jaxflow.forward import validate_inputs
from jaxflow.models.image_layout import ImageLayout, image_layout
from jaxflow.models.layers import ATTN_IMPLS

SCORES = ("logit", "logprob")


@dataclasses.dataclass
class Prepared:
    """Validated inputs of one analysis call (numpy, host side)."""
    input_ids: np.ndarray  # (B, T) int32
    attention_mask: np.ndarray  # (B, T) int32
    pixel_values: np.ndarray  # as the family's processor gives them (LLaVA (B, C, H, W)) float32
    images: object  # the model's `image_inputs`: what the jitted analyses take (pixels and derived arrays)
    spans: TokenSpans  # S/T/U/A masks (B, T) from the ids
    layout: ImageLayout  # the tokens of each image (a row may hold several) and their cells on its grid

    @property
    def image_positions(self) -> np.ndarray:  # (I, N) int32: the tokens of each image, in order
        return self.layout.positions

    @property
    def image_valid(self) -> np.ndarray:  # (I, N) bool: False where a smaller image is padded
        return self.layout.valid

    @property
    def image_rows(self) -> np.ndarray:  # (I,) int32: the row of each image
        return self.layout.rows

    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.layout.grid_hw


def prepare(model, input_ids, pixel_values, attention_mask=None, answer_mask=None, *,
            require_answer: bool = False, attn_impl: str = "fused", **image_kw) -> Prepared:
    """Validates the inputs of an analysis (one or more images per row) and computes the token groups
    and the image layout (image_kw: the family's extra image arguments, e.g. InternVL's tile_grids)."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
    if pixel_values is None:
        raise ValueError("pixel_values is required: the analyses look at the image tokens")
    ids, mask = validate_inputs(model, input_ids, pixel_values, attention_mask, **image_kw)
    b = ids.shape[0]
    pv = np.asarray(pixel_values, np.float32)
    if answer_mask is not None:
        am = np.asarray(answer_mask)
        if am.shape != ids.shape:
            raise ValueError(f"answer_mask shape {am.shape} differs from input_ids shape {ids.shape}")
        am = am.astype(bool)
        if (am & (mask == 0)).any():
            raise ValueError("answer_mask marks padding positions (attention_mask 0)")
    else:
        am = None
    if require_answer:
        if am is None:
            raise ValueError("answer_mask is required: the target score is the answer tokens' logits")
        empty = np.flatnonzero(~am.any(axis=1))
        if empty.size:
            raise ValueError(f"answer_mask row {int(empty[0])} is empty: mark the answer tokens to explain")
    cfg = model.config
    if not ((ids == cfg.image_token_id) & (mask > 0)).any(axis=1).all():
        raise ValueError(f"a row of input_ids has no image token (id {cfg.image_token_id})")
    spans = token_spans(ids, mask, cfg.image_token_id, am)
    layout = image_layout(ids, mask, cfg.image_token_id, model.image_geometries(ids, mask, pv, **image_kw))
    if am is not None:
        first_real = np.argmax(mask > 0, axis=1)
        for r in range(b):
            pos = np.flatnonzero(am[r])
            if pos.size and pos[0] <= first_real[r]:
                raise ValueError(f"answer_mask row {r} starts at the first real token: an answer needs a prompt")
    return Prepared(ids, mask, pv, model.image_inputs(ids, mask, pv, **image_kw), spans, layout)


def pad_rows(masks: np.ndarray, *, fill_outside: bool = False):
    """(B, T) bool -> positions (B, Q) int32 of the True entries, in order, and valid (B, Q) bool.

    Q is the largest count over rows (at least 1). With fill_outside, padded entries point at distinct
    positions outside the row's set (so they can serve as extra attention rows without aliasing a real
    one); otherwise they point at 0.
    """
    masks = np.asarray(masks, bool)
    b, t = masks.shape
    q = max(1, int(masks.sum(axis=1).max()))
    pos = np.zeros((b, q), np.int32)
    valid = np.zeros((b, q), bool)
    for r in range(b):
        idx = np.flatnonzero(masks[r])
        pos[r, :idx.size], valid[r, :idx.size] = idx, True
        if fill_outside and idx.size < q:
            free = np.flatnonzero(~masks[r])[: q - idx.size]
            pos[r, idx.size:idx.size + free.size] = free
    return pos, valid


def answer_targets(ids: np.ndarray, answer_mask: np.ndarray):
    """Teacher forcing: answer token at position p is scored by the logits at p - 1.

    Returns target positions (B, A) int32 (= p - 1), target token ids (B, A) int32, valid (B, A) bool,
    and the answer positions (B, A) int32 (= p).
    """
    ans_pos, valid = pad_rows(answer_mask)
    tok = np.take_along_axis(ids, ans_pos, axis=1).astype(np.int32)
    tgt = np.where(valid, ans_pos - 1, 0).astype(np.int32)
    return tgt, np.where(valid, tok, 0).astype(np.int32), valid, ans_pos


def target_scores(model, hidden, tgt_pos, tgt_tok, tgt_valid, logprob=False):
    """Per answer token, its logit (or log-probability) at the position before it: (B, A) float32.

    hidden (B, T, D) is the last layer's output before the final norm; only the A target rows go
    through the final norm and the LM head (the other positions' logits are never computed).
    `logprob` may be traced (one compiled function serves both scores).
    """
    hs = jnp.take_along_axis(hidden, tgt_pos[..., None], axis=1)  # (B, A, D)
    logits = model.language_model.logits(hs)  # (B, A, V) float32
    if logprob is not False:
        logits = jnp.where(logprob, jax.nn.log_softmax(logits, axis=-1), logits)
    s = jnp.take_along_axis(logits, tgt_tok[..., None], axis=-1)[..., 0]
    return jnp.where(tgt_valid, s, 0.0)


def check_score(score: str):
    """Validates `score` and returns the traced flag for `target_scores` (True = log-probabilities)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    return jnp.bool_(score == "logprob")


def to_grid(x, grid_hw: tuple[int, int]):
    """(..., N) over the image tokens -> (..., gh, gw); token k is row k // gw, column k % gw.

    With strategy "full" the block starts with the CLS feature (N = gh * gw + 1): it is dropped.
    """
    gh, gw = grid_hw
    n = x.shape[-1]
    if n == gh * gw + 1:
        x = x[..., 1:]
    elif n != gh * gw:
        raise ValueError(f"{n} image tokens do not fill a {gh}x{gw} grid")
    return x.reshape(*x.shape[:-1], gh, gw)
