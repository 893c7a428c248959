"""Information-flow saliency: the quantitative version of the paper's Figure 1.

For layer l, query row i and key j (Wang et al. 2023, "Label words are anchors"):
    I_l(i, j) = | sum_h A_{h,l}(i, j) * ds/dA_{h,l}(i, j) |
with A the attention probabilities and s the teacher-forced target score (the answer tokens' logits,
as for LLaVA-CAM). ds/dA comes from one `jax.grad` with respect to a zero additive delta on the
probabilities of the selected rows (`attn_row_delta`): every layer from one backward pass.

Query rows and flows. The answer side "A" is the set of prediction positions P = {p - 1 : p an answer
token}: the last prompt token and every answer token but the last (the rows whose logits make up
s; an answer token's own row only predicts the token after it). The user side "U" is the user
tokens outside P. Flows per layer, summing I over the (query, key) pairs:
    S->A, T->A, U->A, A->A   (queries in P; keys in S, T, U, answer tokens)
    S->U, T->U, U->U         (queries in U minus P)
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxflow.analysis._common import answer_targets, check_score, pad_rows, prepare, target_scores
from jaxflow.forward import forward_core

FLOWS = ("S->A", "T->A", "U->A", "A->A", "S->U", "T->U", "U->U")


@dataclasses.dataclass
class FlowResult:
    """Saliency of the selected rows. L = decoder layers, Q = most query rows in a batch row."""
    flows: dict  # name (FLOWS) -> (B, L) float32 sums of I over the pairs of that flow
    pair_counts: dict  # name -> (B,) int number of (query, key) pairs each flow sums over (causal, real)
    saliency: np.ndarray  # (B, L, Q, T) float32 I_l(i, j) for the query rows
    query_positions: np.ndarray  # (B, Q) int32
    query_mask: np.ndarray  # (B, Q) bool real query rows
    query_is_answer: np.ndarray  # (B, Q) bool: the row is a prediction position (A side), else U side
    score: np.ndarray  # (B,) float32 the target score s

    def fractions(self, target: str = "A") -> dict:
        """Each flow into `target` as a fraction of all flow into it, per layer: name -> (B, L)."""
        names = [n for n in FLOWS if n.endswith("->" + target)]
        total = sum(self.flows[n] for n in names)
        safe = np.where(total > 0, total, 1.0)
        return {n: np.where(total > 0, self.flows[n] / safe, 0.0) for n in names}


@partial(jax.jit, static_argnames=("impl",))
def _flow_jit(model, ids, pixels, mask, qpos, tgt_pos, tgt_tok, tgt_valid, logprob, *, impl):
    t = model.config.text
    b, n_t = ids.shape
    delta0 = jnp.zeros((t.num_layers, b, t.num_heads, qpos.shape[1], n_t), jnp.float32)

    def f(delta):
        out = forward_core(model, ids, pixels, mask, impl=impl, attn_rows=qpos, attn_row_delta=delta)
        s = target_scores(model, out.hidden, tgt_pos, tgt_tok, tgt_valid, logprob).sum(-1)  # (B,)
        return s.sum(), (out.attn_rows, s)

    g, (a, s) = jax.grad(f, has_aux=True)(delta0)  # (L, B, H, Q, T) each
    sal = jnp.abs(jnp.sum(a * g, axis=2))  # (L, B, Q, T)
    return jnp.transpose(sal, (1, 0, 2, 3)), s


def information_flow(model, input_ids, pixel_values, answer_mask, *, attention_mask=None, score: str = "logit",
                     attn_impl: str = "fused", **image_kw) -> FlowResult:
    """Per-layer saliency flows S->A, T->A, U->A, A->A, S->U, T->U, U->U (see the module docstring).

    answer_mask (B, T) bool marks the answer tokens (at least one per row; the target score is theirs).
    One forward and one backward for all layers; compiled once per input shape.
    """
    logprob = check_score(score)
    p = prepare(model, input_ids, pixel_values, attention_mask, answer_mask, require_answer=True,
                attn_impl=attn_impl, **image_kw)
    sp = p.spans
    tgt_pos, tgt_tok, tgt_valid, _ = answer_targets(p.input_ids, sp.answer)
    b, t = p.input_ids.shape
    pred = np.zeros((b, t), bool)  # prediction positions P
    for r in range(b):
        pred[r, tgt_pos[r, tgt_valid[r]]] = True
    user_side = sp.user & ~pred
    qm = pred | user_side
    qpos, qvalid = pad_rows(qm, fill_outside=True)
    sal, s = _flow_jit(model, jnp.asarray(p.input_ids), p.images, jnp.asarray(p.attention_mask),
                       jnp.asarray(qpos), jnp.asarray(tgt_pos), jnp.asarray(tgt_tok), jnp.asarray(tgt_valid),
                       logprob, impl=attn_impl)
    sal = np.asarray(sal)
    is_ans = np.take_along_axis(pred, qpos, axis=1) & qvalid
    is_user = np.take_along_axis(user_side, qpos, axis=1) & qvalid
    keys = {"S": sp.system, "T": sp.image, "U": sp.user, "A": sp.answer}
    causal = qpos[:, :, None] >= np.arange(t)[None, None, :]  # (B, Q, T)
    flows, counts = {}, {}
    for name in FLOWS:
        src, dst = name.split("->")
        rows = is_ans if dst == "A" else is_user  # (B, Q)
        pair = rows[:, :, None] & keys[src][:, None, :]  # (B, Q, T)
        flows[name] = np.einsum("blqt,bqt->bl", sal, pair.astype(np.float32))
        counts[name] = (pair & causal).sum(axis=(1, 2))
    return FlowResult(flows=flows, pair_counts=counts, saliency=sal, query_positions=qpos, query_mask=qvalid,
                      query_is_answer=is_ans, score=np.asarray(s))


def saliency(model, input_ids, pixel_values, answer_mask, query_mask, *, attention_mask=None, score: str = "logit",
             attn_impl: str = "fused", **image_kw):
    """I_l(i, j) for chosen query rows: (saliency (B, L, Q, T), query_positions (B, Q), query_valid (B, Q)).

    query_mask (B, T) bool picks the rows; the target score is that of answer_mask's tokens.
    """
    logprob = check_score(score)
    p = prepare(model, input_ids, pixel_values, attention_mask, answer_mask, require_answer=True,
                attn_impl=attn_impl, **image_kw)
    qm = np.asarray(query_mask)
    if qm.shape != p.input_ids.shape:
        raise ValueError(f"query_mask shape {qm.shape} differs from input_ids shape {p.input_ids.shape}")
    qm = qm.astype(bool) & (p.attention_mask > 0)
    if not qm.any(axis=1).all():
        raise ValueError("query_mask selects no real token in some row")
    tgt_pos, tgt_tok, tgt_valid, _ = answer_targets(p.input_ids, p.spans.answer)
    qpos, qvalid = pad_rows(qm, fill_outside=True)
    sal, _ = _flow_jit(model, jnp.asarray(p.input_ids), p.images, jnp.asarray(p.attention_mask),
                       jnp.asarray(qpos), jnp.asarray(tgt_pos), jnp.asarray(tgt_tok), jnp.asarray(tgt_valid),
                       logprob, impl=attn_impl)
    return np.where(qvalid[:, None, :, None], np.asarray(sal), 0.0), qpos, qvalid
