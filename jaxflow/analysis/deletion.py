"""Deletion curves: do a heat map's top image tokens carry the answer?

For a ranking of a row's image tokens (most important first, e.g. by a LLaVA-CAM map of one layer),
the answer's probability is measured with the first 0%, 5%, ..., 100% of the ranked tokens knocked
out of attention for the positions that predict the answer (`jaxflow.knockout`: in every layer, those
queries do not attend to those keys; positions unchanged). A faithful map makes the curve fall fast
(small area under it); a random order is the baseline. Every step of every ranking of a batch runs
in one jit program: one clean forward, then each variant recomputes only the answer's rows (the
rows from the last prompt position on) against the clean keys and values of the rows before, shared
by every variant (`knockout._suffix_layers`).
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxflow.analysis.knockout import ROW_BUCKET, _bool, _clean_jit, _suffix_inputs, _suffix_layers
from jaxflow.forward import _check_impl, validate_inputs


@dataclasses.dataclass
class DeletionCurves:
    names: list  # ranking names, in order
    fractions: np.ndarray  # (S + 1,) share of the image tokens knocked out: 0, 1/S, ..., 1
    probs: np.ndarray  # (R, S + 1, B) the answer's probability (product over its tokens)
    base: np.ndarray  # (B,) the answer's probability without knockout (= probs[:, 0])

    @property
    def auc(self) -> np.ndarray:
        """(R, B) area under each row's curve of the probability relative to its base, over the
        fractions 0..1 (trapezoid): 1 = deleting changes nothing, small = the top tokens carry the answer."""
        rel = self.probs / np.maximum(self.base[None, None], 1e-30)
        f = self.fractions
        return ((rel[:, 1:] + rel[:, :-1]) * 0.5 * np.diff(f)[None, :, None]).sum(1)


def predicting_mask(answer_mask) -> np.ndarray:
    """(B, T) bool: the positions whose next token is an answer token (the last prompt position and
    every answer position but the last)."""
    am = np.asarray(answer_mask, bool)
    pred = np.zeros_like(am)
    pred[:, :-1] = am[:, 1:]
    return pred


@partial(jax.jit, static_argnames=("t0", "chunk"))
def _deletion_jit(model, x, cos, sin, allowed, cache, keys, queries, answer_ids, pred_rows, *, t0, chunk):
    """keys (V, B, T) bool per variant; queries (B, T) bool (rows >= t0); answer_ids (B, A) the tokens predicted at
    pred_rows (B, A) (-1: none). Returns the answer's probability (V, B)."""
    lm = model.language_model
    L = model.config.text.num_layers
    xs, cs, ss, als, pre_k, pre_v = _suffix_inputs(x, cos, sin, allowed, cache, t0)
    bidx = jnp.arange(x.shape[0])[:, None]
    valid = pred_rows >= 0
    rows = jnp.where(valid, pred_rows - t0, 0)
    every_layer = jnp.ones((L,), bool)

    def one(k):
        h = _suffix_layers(lm, xs, cs, ss, als, pre_k, pre_v, queries[:, t0:, None] & k[:, None, :], every_layer)
        logp = jax.nn.log_softmax(lm.logits(h[bidx, rows]))  # (B, A, V)
        tok = jnp.take_along_axis(logp, jnp.maximum(answer_ids, 0)[..., None], -1)[..., 0]  # (B, A)
        return jnp.exp(jnp.where(valid, tok, 0.0).sum(-1))  # (B,)

    return jax.lax.map(one, keys, batch_size=chunk)


QUERIES = ("answer", "text")


def deletion_curves(model, input_ids, pixel_values, attention_mask, answer_mask, rankings: dict, *, steps: int = 20,
                    queries: str = "answer", chunk: int = 16, attn_impl: str = "fused",
                    **image_kw) -> DeletionCurves:
    """The answer's probability as the top-ranked image tokens are knocked out in `steps` equal steps.

    input_ids/attention_mask (B, T): prompt + answer (teacher-forced), answer_mask (B, T) bool marks the
    answer tokens. rankings: {name: (B, N) int} per row the image tokens' ORDER, most important first,
    as indices into the row's image tokens in position order (0 = its first image token); a row with
    fewer image tokens pads with -1. Step s knocks out the first round(s / steps * n_b) of row b's n_b
    image tokens, in every layer, for the queries: "answer" (the positions that predict the answer
    tokens) or "text" (every position after the row's last image token: the question too, for models
    that read the image into the question tokens first).
    """
    _check_impl(attn_impl)
    ids, mask = validate_inputs(model, input_ids, pixel_values, attention_mask, **image_kw)
    am = _bool("answer_mask", answer_mask, ids.shape)
    if not am.any(1).all():
        raise ValueError("every row needs answer tokens (answer_mask) whose probability the curve follows")
    if not rankings:
        raise ValueError("no rankings: pass {name: (B, N) image-token order}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if queries not in QUERIES:
        raise ValueError(f"queries must be one of {', '.join(QUERIES)}, got {queries!r}")
    b, t = ids.shape
    image = (ids == model.config.image_token_id) & (mask > 0)
    img_pos = [np.flatnonzero(image[r]) for r in range(b)]  # each row's image-token positions
    fractions = np.arange(steps + 1) / steps
    names = list(rankings)
    keys = np.zeros((len(names), steps + 1, b, t), bool)
    for i, name in enumerate(names):
        order = np.asarray(rankings[name])
        if order.ndim != 2 or order.shape[0] != b:
            raise ValueError(f"rankings[{name!r}] must be (B, N) = ({b}, N) image-token indices, got {order.shape}")
        for r in range(b):
            o = order[r][order[r] >= 0]
            n = len(img_pos[r])
            if len(o) != n or (np.sort(o) != np.arange(n)).any():
                raise ValueError(f"rankings[{name!r}] row {r} must order all {n} of the row's image tokens once")
            for s, f in enumerate(fractions):
                keys[i, s, r, img_pos[r][o[:int(round(f * n))]]] = True
    predicting = predicting_mask(am)
    pred_rows = [np.flatnonzero(predicting[r]) for r in range(b)]
    if queries == "answer":
        q_mask = predicting
    else:
        cols = np.arange(t)[None, :]
        end_img = np.array([p[-1] if len(p) else -1 for p in img_pos])
        q_mask = (mask > 0) & (cols > end_img[:, None])
    A = max(len(p) for p in pred_rows)
    rows = np.full((b, A), -1, np.int32)
    toks = np.zeros((b, A), np.int32)
    for r in range(b):
        rows[r, :len(pred_rows[r])] = pred_rows[r]
        toks[r, :len(pred_rows[r])] = ids[r, pred_rows[r] + 1]
    t0 = int(min(np.flatnonzero(q_mask.any(0))[0], min(p[0] for p in pred_rows))) // ROW_BUCKET * ROW_BUCKET
    images = model.image_inputs(ids, mask, pixel_values, **image_kw)
    last = rows.max(1)
    x, cos, sin, allowed, cache, _, _ = _clean_jit(model, jnp.asarray(ids), images, jnp.asarray(mask),
                                                   jnp.full((b,), -1, jnp.int32), jnp.asarray(last), impl=attn_impl)
    V = len(names) * (steps + 1)
    p = _deletion_jit(model, x, cos, sin, allowed, cache, jnp.asarray(keys.reshape(V, b, t)), jnp.asarray(q_mask),
                      jnp.asarray(toks), jnp.asarray(rows), t0=t0, chunk=max(1, min(int(chunk), V)))
    probs = np.asarray(p, np.float64).reshape(len(names), steps + 1, b)
    return DeletionCurves(names=names, fractions=fractions, probs=probs, base=probs[0, 0].copy())


def map_rankings(maps) -> np.ndarray:
    """(B, N) image-token order, most important first, from per-token scores (B, N) (e.g. a CAM map
    of one layer flattened in the image tokens' order). Ties keep position order."""
    m = np.asarray(maps, np.float64)
    return np.argsort(-m, axis=1, kind="stable")


def random_rankings(batch: int, num_tokens: int, seed: int = 0) -> np.ndarray:
    """(B, N) a random order of N image tokens per row (the deletion baseline)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(num_tokens) for _ in range(batch)])
