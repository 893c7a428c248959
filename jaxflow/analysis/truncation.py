"""Truncation: cut the image out of attention from layer K on, for every K at once.

Semantics (docs/truncation.md): for every layer l >= K no query attends to an image-token key;
positions are unchanged; K = L is the untruncated model, K = 0 the image seen by no layer.

Why the fast sweep is exact. Tokens before the image (system, S) never see the image (causal), so
their keys and values are the same in every variant. Tokens after the image ("own" tokens: the
prompt's text after the image, U and A) are the only ones whose outputs change, and at layers >= K
they read only S keys and their own keys. So: one untruncated forward gives, per layer, the shared
prefix keys/values and the residual stream at the own tokens; variant K starts from that residual at
layer K and runs layers K..L-1 on its own tokens only, attending to [shared prefix (image keys
masked) ++ its own keys]. The prefix is broadcast into the attention einsum, never copied per
variant. Variant K needs only layers >= K: the layers are split into a few chunks and each chunk
runs just the variants already cut, so the work is about half of L x (L+1) text-only layers.

FastV-style partial truncation (`keep_top_k = k > 0`) keeps, from layer K on, the k image tokens
with the largest head-averaged attention from the last prompt token at layer K-1 (layer 0 for K=0)
of the untruncated model; the kept image tokens then join the variant's own tokens (their states
change too, since they lose the other image keys).
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxflow.forward import _check_impl, causal_allowed, validate_inputs
from jaxflow.generate import left_align, stop_tokens
from jaxflow.models.family import next_positions
from jaxflow.models.layers import _NEG
from jaxflow.models.llama import decoder_layer
from jaxflow.sharding import constrain_rows
from flax import nnx


@dataclasses.dataclass
class SweepOutput:
    logits: np.ndarray | None  # (V, B, T_after, vocab) float32, V = len(layers); slot j of row b is input
    # position positions[b, j]; None with all_logits=False
    last_logits: np.ndarray  # (V, B, vocab) float32 at each row's last real token (what scoring reads)
    next_token: np.ndarray  # (V, B) greedy next token after each row's prompt, per variant
    layers: np.ndarray  # (V,) the cut layer K of each variant (L = untruncated)
    positions: np.ndarray  # (B, T_after) index into input_ids of each slot, -1 where the row has no token
    mask: np.ndarray  # (B, T_after) bool, slot holds a real token


@dataclasses.dataclass
class TruncationGenerateOutput:
    tokens: np.ndarray  # (V, B, max_new_tokens) int32, pad after EOS
    lengths: np.ndarray  # (V, B) generated tokens, EOS included
    layers: np.ndarray  # (V,)


# --------------------------------------------------------------------------- host-side layout


@dataclasses.dataclass(frozen=True)
class _Layout:
    image_start: np.ndarray  # (B,)
    image_end: np.ndarray  # (B,) exclusive
    image_max: int  # the longest image block (rows of a family with tiles or any-size images differ)
    text_idx: np.ndarray  # (B, Ta) sequence index of each own text slot (clipped where invalid)
    text_valid: np.ndarray  # (B, Ta)
    prefix_len: int  # P = max image_end: slots [0, P) are the shared prefix
    system_len: int  # max image_start: slots [0, system_len) hold every row's system tokens
    contiguous: bool = True  # every row's image tokens form one block (False: several images in a row)


def image_layout(input_ids, attention_mask, image_token_id: int, num_image_tokens: int | None = None,
                 text_bucket: int = 1) -> _Layout:
    """Finds each row's image span, from its first image token to one past its last (of
    `num_image_tokens` tokens when given, else any number, in one or several images) and its own
    tokens, every real non-image token after the first image token (the text between two images
    included); one clear error per bad row. The own-slot count is rounded up to a multiple of
    `text_bucket` (fewer distinct shapes to compile)."""
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    b = ids.shape[0]
    start, end, texts, contiguous = np.zeros(b, np.int32), np.zeros(b, np.int32), [], True
    for r in range(b):
        idx = np.flatnonzero((ids[r] == image_token_id) & (mask[r] > 0))
        if idx.size == 0:
            raise ValueError(f"row {r} has no image token (id {image_token_id}): truncation needs an image per row")
        if num_image_tokens is not None and idx.size != num_image_tokens:
            raise ValueError(f"row {r} must hold {num_image_tokens} image tokens, found {idx.size}")
        contiguous &= bool(idx[-1] - idx[0] + 1 == idx.size)
        start[r], end[r] = idx[0], idx[-1] + 1
        after = np.arange(start[r], ids.shape[1])
        t = after[(mask[r, after] > 0) & (ids[r, after] != image_token_id)]
        if t.size == 0 or t[-1] < end[r]:
            raise ValueError(f"row {r} has no token after its last image: nothing for truncation to change")
        texts.append(t)
    ta = max(len(t) for t in texts)
    ta = -(-ta // text_bucket) * text_bucket
    text_idx = np.zeros((b, ta), np.int32)
    text_valid = np.zeros((b, ta), bool)
    for r, t in enumerate(texts):
        text_idx[r, :len(t)], text_idx[r, len(t):] = t, t[-1]
        text_valid[r, :len(t)] = True
    return _Layout(start, end, int((end - start).max()), text_idx, text_valid, int(end.max()),
                   max(int(start.max()), 1), contiguous)


def _check_layers(layers, num_layers: int) -> np.ndarray:
    if layers is None:
        return np.arange(num_layers + 1, dtype=np.int32)
    ks = np.asarray(sorted(set(int(k) for k in np.atleast_1d(layers))), np.int32)
    if ks.size == 0 or ks.min() < 0 or ks.max() > num_layers:
        raise ValueError(f"layers must be cut layers K in 0..{num_layers} ({num_layers} = untruncated), "
                         f"got {list(np.atleast_1d(layers))}")
    return ks


def _chunks(ks: np.ndarray, num_layers: int, n_chunks: int) -> tuple[tuple[int, int, int], ...]:
    """(l0, l1, n_active): layer ranges and how many variants (sorted ks) are cut before l1."""
    n_chunks = max(1, min(int(n_chunks), num_layers))  # n_chunks copies of the layer body in the program
    bounds = np.linspace(0, num_layers, n_chunks + 1).round().astype(int)
    out = []
    for l0, l1 in zip(bounds[:-1], bounds[1:]):
        n = int((ks < l1).sum())
        if l1 > l0 and n > 0:
            out.append((int(l0), int(l1), n))
    return tuple(out)


# --------------------------------------------------------------------------- the variant-batched layer


def _variant_attention(q, own_k, own_v, own_ok, pre_k, pre_v, pre_ok, scale):
    """Softmax over [shared prefix ++ own keys] in float32.

    q (n, B, Q, H, hd); own_k/v (n, B, S, KVH, hd); own_ok (n, B, Q, S); pre_k/v (B, P, KVH, hd) shared
    by the n variants (broadcast, not copied); pre_ok (n, B, Q, P) -> (n, B, Q, H, hd).
    """
    n, b, nq, h, hd = q.shape
    g = pre_k.shape[2]
    qg = q.reshape(n, b, nq, g, h // g, hd)  # head h reads kv head h // (H / KVH)
    s_pre = jnp.einsum("nbqgrd,bpgd->nbgrqp", qg, pre_k, preferred_element_type=jnp.float32) * scale
    s_own = jnp.einsum("nbqgrd,nbsgd->nbgrqs", qg, own_k, preferred_element_type=jnp.float32) * scale
    s_pre = jnp.where(pre_ok[:, :, None, None], s_pre, _NEG)
    s_own = jnp.where(own_ok[:, :, None, None], s_own, _NEG)
    m = jnp.maximum(s_pre.max(-1, keepdims=True), s_own.max(-1, keepdims=True))
    e_pre, e_own = jnp.exp(s_pre - m), jnp.exp(s_own - m)
    z = e_pre.sum(-1, keepdims=True) + e_own.sum(-1, keepdims=True)
    dt = own_v.dtype
    o = jnp.einsum("nbgrqp,bpgd->nbqgrd", (e_pre / z).astype(dt), pre_v)
    o = o + jnp.einsum("nbgrqs,nbsgd->nbqgrd", (e_own / z).astype(dt), own_v)
    return o.reshape(n, b, nq, h, hd)


def _variant_layer(layer, h, cos, sin, own_ok, pre_k, pre_v, pre_ok, scale, own_cache=None, write_index=0):
    """`decoder_layer` for n variants' own tokens. h (n, B, Q, D); cos/sin (n*B, Q, hd);
    own_cache (k, v) each (n*B, S, KVH, hd) or None (then S = Q). Returns h_out, (k_all, v_all)."""
    n, b, nq, d = h.shape
    own_kv = []

    def attention(q, k, v):
        if own_cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(own_cache[0], k.astype(own_cache[0].dtype), write_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(own_cache[1], v.astype(own_cache[1].dtype), write_index, axis=1)
        own_kv.append((k, v))
        split = lambda t: t.reshape((n, b) + t.shape[1:])  # noqa: E731
        o = _variant_attention(split(q), split(k), split(v), own_ok, pre_k, pre_v, pre_ok, scale)
        return o.reshape(n * b, nq, *o.shape[3:])

    h_out, _, _ = decoder_layer(layer, h.reshape(n * b, nq, d), cos, sin, attention)
    return h_out.reshape(n, b, nq, d), own_kv[0]


def _prefix_ok(l, ks, pre_valid, pre_img, pre_kept, q_order):
    """(n, B, Q, P): prefix slot p is visible to own query q of variant v at layer l.
    Image slots: only below the cut (l < K) and only if not carried as an own token (kept)."""
    p = jnp.arange(pre_valid.shape[1])
    below = (l < ks)[:, None, None]  # (n, 1, 1)
    img_ok = ~pre_img[None] | (below & ~pre_kept)  # (n, B, P)
    ok = (pre_valid[None] & img_ok)[:, :, None, :]
    return ok & (p[None, None, None, :] <= q_order[..., None])


def _own_ok(q_order, k_order, k_valid):
    """(n, B, Q, S): own key s visible to own query q (real and not later)."""
    return k_valid[:, :, None, :] & (k_order[:, :, None, :] <= q_order[..., None])


# --------------------------------------------------------------------------- sweep (jit)


def _keep_sets(attn_rows, image_start, image_end, num_image, ks, keep_top_k):
    """Top-k image tokens per variant from the last query's head-averaged attention at layer K-1.
    attn_rows (L, B, H, 1, T); image blocks [image_start, image_end) (B,) of at most num_image
    tokens -> kept image indices (V, B, k) sorted, within the image block."""
    scores = attn_rows.mean(axis=2)[:, :, 0]  # (L, B, T)
    idx = image_start[:, None] + jnp.arange(num_image)[None]  # (B, N)
    inside = idx < image_end[:, None]
    idx = jnp.minimum(idx, scores.shape[-1] - 1)
    img_scores = jnp.take_along_axis(scores, jnp.broadcast_to(idx[None], (scores.shape[0],) + idx.shape), -1)
    img_scores = jnp.where(inside[None], img_scores, -jnp.inf)
    per_variant = img_scores[jnp.maximum(ks - 1, 0)]  # (V, B, N)
    _, top = jax.lax.top_k(per_variant, keep_top_k)
    return jnp.sort(top, axis=-1)


def _sweep_core(model, ids, images, mask, text_idx, text_valid, image_start, image_end, ks, *,
                prefix_len, system_len, image_max, chunks, keep_top_k, impl, for_generation):
    lm = model.language_model
    tcfg = model.config.text
    L = tcfg.num_layers
    b, t = ids.shape
    v_count = ks.shape[0]
    n_img = image_max
    x = model.embed(ids, images, impl)
    positions = model.positions(ids, mask, images)  # (B, T) or (B, T, R)
    cos_full, sin_full = model.rope_tables(positions, x.dtype, context_len=t)
    allowed = causal_allowed(mask > 0, jnp.broadcast_to(jnp.arange(t), (b, t)), t)
    bidx = jnp.arange(b)[:, None]

    # own tokens: (kept image tokens ++) text after the image; rows captured from the full forward
    if keep_top_k:
        img_rows = jnp.minimum(image_start[:, None] + jnp.arange(n_img)[None], image_end[:, None] - 1)  # (B, N)
        res_rows = jnp.concatenate([img_rows, text_idx], axis=1)  # (B, R)
    else:
        res_rows = text_idx
    last = (mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=1)).astype(jnp.int32)  # (B,) last real
    kv_rows = jnp.concatenate([jnp.broadcast_to(jnp.arange(prefix_len), (b, prefix_len)), res_rows], axis=1)
    full = lm.run_layers(x, cos_full, sin_full, allowed, impl=impl, capture=("residual", "kv"),
                         capture_rows=res_rows, attn_rows=last[:, None] if keep_top_k else None)
    kv_all_k = full.captures["k"][:, bidx, kv_rows]  # (L, B, P + R, KVH, hd)
    kv_all_v = full.captures["v"][:, bidx, kv_rows]
    pre_k, pre_v = kv_all_k[:, :, :prefix_len], kv_all_v[:, :, :prefix_len]  # (L, B, P, KVH, hd)
    res = full.captures["residual"]  # (L, B, R, D) layer inputs at the captured rows
    final = full.hidden[bidx, res_rows]  # (B, R, D)

    ta = text_idx.shape[1]
    if keep_top_k:
        kept = _keep_sets(full.attn_rows, image_start, image_end, n_img, ks, keep_top_k)  # (V, B, k)
        own_sel = jnp.concatenate([kept, jnp.broadcast_to(n_img + jnp.arange(ta), (v_count, b, ta))], -1)
        own_valid = jnp.concatenate([jnp.ones(kept.shape, bool), jnp.broadcast_to(text_valid, (v_count, b, ta))],
                                    -1)
        pre_slots = jnp.arange(prefix_len)
        kept_seq = image_start[None, :, None] + kept  # (V, B, k)
        pre_kept = (kept_seq[..., None] == pre_slots).any(-2)  # (V, B, P)
    else:
        own_sel = jnp.broadcast_to(jnp.arange(ta), (v_count, b, ta))
        own_valid = jnp.broadcast_to(text_valid, (v_count, b, ta))
        pre_kept = jnp.zeros((v_count, b, prefix_len), bool)
    own_seq = jnp.take_along_axis(jnp.broadcast_to(res_rows, (v_count,) + res_rows.shape), own_sel, -1)  # (V,B,Q)
    pre_img = ids[:, :prefix_len] == model.config.image_token_id
    slot = jnp.arange(prefix_len)[None]
    # the prefix: every token before the first image and every image token; text between images is own
    pre_valid = (mask[:, :prefix_len] > 0) & (slot < image_end[:, None]) & (pre_img | (slot < image_start[:, None]))
    gather_rows = lambda a, n: jnp.take_along_axis(a[None], own_sel[:n, :, :, None], axis=2)  # noqa: E731
    q = own_sel.shape[-1]
    # RoPE of own tokens: per variant when kept image tokens differ, else shared
    own_pos = positions[bidx[None], own_seq]  # (V, B, Q) or (V, B, Q, R): each token keeps its position
    scale = tcfg.head_dim ** -0.5
    graphdef, state = nnx.split(lm.layers)

    h = jnp.zeros((v_count, b, q, x.shape[-1]), x.dtype)
    own_k_layers = None
    if for_generation:  # own keys/values of every (variant, layer); inactive ones are the untruncated values
        own_k_layers = jnp.broadcast_to(jnp.take_along_axis(kv_all_k[:, None, :, prefix_len:],
                                                            own_sel[None, :, :, :, None, None], 3),
                                        (L, v_count, b, q) + kv_all_k.shape[-2:])
        own_v_layers = jnp.broadcast_to(jnp.take_along_axis(kv_all_v[:, None, :, prefix_len:],
                                                            own_sel[None, :, :, :, None, None], 3),
                                        (L, v_count, b, q) + kv_all_v.shape[-2:])
    # In the prompt phase a variant at a layer l >= K sees only the system slots of the prefix. A
    # variant with K > l inside an active chunk is discarded (re-injected at the next layer) and its
    # keys/values come from the injected, untruncated input: so the chunks need only [0, system_len).
    sl = system_len
    sys_valid, sys_img, sys_kept = pre_valid[:, :sl], pre_img[:, :sl], pre_kept[:, :, :sl]
    for l0, l1, n in chunks:
        xs = {"layer": jax.tree.map(lambda a: a[l0:l1], state), "l": jnp.arange(l0, l1), "res": res[l0:l1],
              "pre_k": pre_k[l0:l1, :, :sl], "pre_v": pre_v[l0:l1, :, :sl]}
        ks_n, seq_n, valid_n = ks[:n], own_seq[:n], own_valid[:n]
        cos, sin = model.rope_tables(own_pos[:n].reshape((n * b, q) + own_pos.shape[3:]), x.dtype,
                                     context_len=t)  # (n*B, Q, hd)
        own_ok = _own_ok(seq_n, seq_n, valid_n)
        pre_kept_n = sys_kept[:n]

        def body(hn, xs_l, ks_n=ks_n, seq_n=seq_n, own_ok=own_ok, pre_kept_n=pre_kept_n, cos=cos, sin=sin, n=n):
            layer = nnx.merge(graphdef, xs_l["layer"])
            l = xs_l["l"]
            x_own = jnp.take_along_axis(xs_l["res"][None], own_sel[:n, :, :, None], axis=2)  # (n, B, Q, D)
            hin = jnp.where((ks_n >= l)[:, None, None, None], x_own.astype(hn.dtype), hn)
            hin = constrain_rows(hin, lm.mesh, axes=(0, 1))  # (n, B, Q, D): variants (else rows) on "data"
            pre_ok = _prefix_ok(l, ks_n, sys_valid, sys_img, pre_kept_n, seq_n)
            out, kv = _variant_layer(layer, hin, cos, sin, own_ok, xs_l["pre_k"], xs_l["pre_v"], pre_ok, scale)
            return out, (kv if for_generation else None)

        hn, ys = jax.lax.scan(body, h[:n], xs)
        h = h.at[:n].set(hn)
        if for_generation:
            k_new = ys[0].reshape((l1 - l0, n, b) + ys[0].shape[2:])
            v_new = ys[1].reshape((l1 - l0, n, b) + ys[1].shape[2:])
            own_k_layers = own_k_layers.at[l0:l1, :n].set(k_new)
            own_v_layers = own_v_layers.at[l0:l1, :n].set(v_new)
    x_final = gather_rows(final, v_count)  # (V, B, Q, D)
    h = jnp.where((ks == L)[:, None, None, None], x_final, h)
    text_h = h[:, :, q - ta:]  # (V, B, Ta, D)
    logits = lm.logits(text_h.reshape(v_count * b, ta, -1)).reshape(v_count, b, ta, -1)
    n_text = text_valid.sum(-1)  # (B,)
    last_h = jnp.take_along_axis(text_h, (n_text - 1)[None, :, None, None], axis=2)  # (V, B, 1, D)
    # from the last hidden state, not from `logits`: when only these are returned XLA drops the rest
    last_logits = lm.logits(last_h.reshape(v_count * b, 1, -1)).reshape(v_count, b, -1)  # (V, B, vocab)
    out = {"logits": logits, "last_logits": last_logits, "next_token": jnp.argmax(last_logits, -1).astype(jnp.int32)}
    if for_generation:
        out.update(pre_k=pre_k, pre_v=pre_v, pre_valid=pre_valid, pre_img=pre_img, pre_kept=pre_kept,
                   own_k=own_k_layers, own_v=own_v_layers, own_seq=own_seq, own_valid=own_valid)
    return out


@partial(jax.jit, static_argnames=("prefix_len", "system_len", "image_max", "chunks", "keep_top_k", "impl",
                                   "all_logits"))
def _sweep_jit(model, ids, images, mask, text_idx, text_valid, image_start, image_end, ks, *, prefix_len,
               system_len, image_max, chunks, keep_top_k, impl, all_logits=True):
    out = _sweep_core(model, ids, images, mask, text_idx, text_valid, image_start, image_end, ks,
                      prefix_len=prefix_len, system_len=system_len, image_max=image_max, chunks=chunks,
                      keep_top_k=keep_top_k, impl=impl, for_generation=False)
    if not all_logits:
        del out["logits"]
    return out


def _prepare(model, input_ids, pixel_values, attention_mask, layers, keep_top_k, chunks, attn_impl, text_bucket=1,
             **image_kw):
    """Validated (ids, mask, ks, layout, images): images is the model's `image_inputs` of the batch."""
    _check_impl(attn_impl)
    cfg = model.config
    ids, mask = validate_inputs(model, input_ids, pixel_values, attention_mask, **image_kw)
    if pixel_values is None:
        raise ValueError("truncation needs pixel_values: without an image there is nothing to cut")
    if not isinstance(chunks, (int, np.integer)) or chunks < 1:
        raise ValueError(f"chunks must be a positive integer, got {chunks!r}")
    if not isinstance(text_bucket, (int, np.integer)) or text_bucket < 1:
        raise ValueError(f"text_bucket must be a positive integer, got {text_bucket!r}")
    ks = _check_layers(layers, cfg.text.num_layers)
    lay = image_layout(ids, mask, cfg.image_token_id, None, int(text_bucket))
    n_img = int((lay.image_end - lay.image_start).min())
    if keep_top_k and not lay.contiguous:
        raise ValueError("keep_top_k (FastV) needs one image per row; a row here holds several images")
    if not isinstance(keep_top_k, (int, np.integer)) or not 0 <= keep_top_k < n_img:
        raise ValueError(f"keep_top_k must be an integer in 0..{n_img - 1}, got {keep_top_k!r}")
    return ids, mask, ks, lay, model.image_inputs(ids, mask, pixel_values, **image_kw)


def truncation_sweep(model, input_ids, pixel_values, attention_mask=None, layers=None, *,
                     keep_top_k: int = 0, chunks: int = 4, attn_impl: str = "fused",
                     text_bucket: int = 1, all_logits: bool = True, check_finite: bool = True,
                     **image_kw) -> SweepOutput:
    """Logits for every cut layer K at once, at the positions after each row's image.

    input_ids/attention_mask (B, T), one image block per row; pixel_values as the family's processor
    returns them (LLaVA (B, 3, H, W); InternVL the tiles of the B images).
    layers: the K values (default 0..L). keep_top_k: FastV-style, keep that many image tokens.
    chunks: layer chunks of the triangular schedule (more: less wasted work, larger program).
    text_bucket: round T_after up to a multiple of this (extra slots are masked): batches whose text
    after the image differs in length then share one compiled program.
    Returns SweepOutput with logits (V, B, T_after, vocab): slot j of row b is the token at
    input position `positions[b, j]` (the j-th real token after the image), and last_logits
    (V, B, vocab) at each row's last token. all_logits=False returns only the latter (logits None):
    at 7B x 8 rows x 24 tokens the full logits are 0.76 GB, and copying them to the host took longer
    than the sweep itself on an H200. check_finite: NaN/Inf logits raise `jaxflow.health.NonFiniteError`
    naming the first non-finite stage.
    """
    ids, mask, ks, lay, images = _prepare(model, input_ids, pixel_values, attention_mask, layers, keep_top_k,
                                          chunks, attn_impl, text_bucket, **image_kw)
    L = model.config.text.num_layers
    out = _sweep_jit(model, jnp.asarray(ids), images, jnp.asarray(mask),
                     jnp.asarray(lay.text_idx), jnp.asarray(lay.text_valid), jnp.asarray(lay.image_start),
                     jnp.asarray(lay.image_end), jnp.asarray(ks), prefix_len=lay.prefix_len,
                     system_len=lay.system_len, image_max=lay.image_max, chunks=_chunks(ks, L, chunks),
                     keep_top_k=int(keep_top_k), impl=attn_impl, all_logits=bool(all_logits))
    last = np.asarray(out["last_logits"])
    if check_finite and not np.isfinite(last).all():
        from jaxflow.health import raise_non_finite

        raise_non_finite(model, ids, pixel_values, mask, what="the sweep's logits", **image_kw)
    positions = np.where(lay.text_valid, lay.text_idx, -1).astype(np.int32)
    return SweepOutput(logits=np.asarray(out["logits"]) if all_logits else None,
                       last_logits=last, next_token=np.asarray(out["next_token"]), layers=ks,
                       positions=positions, mask=lay.text_valid.copy())


# --------------------------------------------------------------------------- generation (jit)


@partial(jax.jit, static_argnames=("prefix_len", "system_len", "image_max", "chunks", "keep_top_k", "impl",
                                   "max_new_tokens"))
def _generate_jit(model, ids, images, mask, text_idx, text_valid, image_start, image_end, ks, eos_ids, pad_id,
                  *, prefix_len, system_len, image_max, chunks, keep_top_k, impl, max_new_tokens):
    lm = model.language_model
    tcfg = model.config.text
    b, t = ids.shape
    sw = _sweep_core(model, ids, images, mask, text_idx, text_valid, image_start, image_end, ks,
                     prefix_len=prefix_len, system_len=system_len, image_max=image_max, chunks=chunks,
                     keep_top_k=keep_top_k, impl=impl, for_generation=True)
    v_count = ks.shape[0]
    q = sw["own_seq"].shape[-1]
    s = q + max_new_tokens
    own_k = jnp.zeros((tcfg.num_layers, v_count * b, s) + sw["own_k"].shape[-2:], sw["own_k"].dtype)
    own_v = jnp.zeros_like(own_k)
    own_k = own_k.at[:, :, :q].set(sw["own_k"].reshape((tcfg.num_layers, v_count * b, q) + own_k.shape[-2:]))
    own_v = own_v.at[:, :, :q].set(sw["own_v"].reshape((tcfg.num_layers, v_count * b, q) + own_v.shape[-2:]))
    # key order: prompt own tokens keep their sequence index; generated slot j comes at t + j
    k_order = jnp.concatenate([sw["own_seq"], jnp.broadcast_to(t + jnp.arange(max_new_tokens),
                                                               (v_count, b, max_new_tokens))], -1)
    k_valid = jnp.concatenate([sw["own_valid"], jnp.ones((v_count, b, max_new_tokens), bool)], -1)
    next_pos = next_positions(model.positions(ids, mask, images), mask)  # (B,) position of the first new token
    first = sw["next_token"]  # (V, B)
    tokens = jnp.full((v_count, b, max_new_tokens), pad_id, jnp.int32).at[:, :, 0].set(first)
    done = jnp.isin(first, eos_ids)
    graphdef, state = nnx.split(lm.layers)
    scale = tcfg.head_dim ** -0.5

    def step_fn(step, prev, cache_k, cache_v):
        x = lm.embed(prev.reshape(v_count * b, 1)).reshape(v_count, b, 1, -1)
        pos = jnp.broadcast_to(next_pos + step - 1, (v_count, b)).reshape(v_count * b, 1)
        cos, sin = model.rope_tables(pos, x.dtype, context_len=t)  # (V*B, 1, hd)
        q_order = jnp.broadcast_to(t + step - 1, (v_count, b, 1))
        own_ok = _own_ok(q_order, k_order, k_valid)
        slot = q + step - 1

        def body(carry, xs_l):
            hn, ck, cv = carry
            layer = nnx.merge(graphdef, xs_l["layer"])
            l = xs_l["l"]
            pre_ok = _prefix_ok(l, ks, sw["pre_valid"], sw["pre_img"], sw["pre_kept"], q_order)
            lk = jax.lax.dynamic_index_in_dim(ck, l, keepdims=False)
            lv = jax.lax.dynamic_index_in_dim(cv, l, keepdims=False)
            out, (nk, nv) = _variant_layer(layer, hn, cos, sin, own_ok, xs_l["pre_k"], xs_l["pre_v"], pre_ok, scale,
                                           own_cache=(lk, lv), write_index=slot)
            ck = jax.lax.dynamic_update_index_in_dim(ck, nk, l, 0)
            cv = jax.lax.dynamic_update_index_in_dim(cv, nv, l, 0)
            return (out, ck, cv), None

        xs = {"layer": state, "l": jnp.arange(tcfg.num_layers), "pre_k": sw["pre_k"], "pre_v": sw["pre_v"]}
        (hn, cache_k, cache_v), _ = jax.lax.scan(body, (x, cache_k, cache_v), xs)
        logits = lm.logits(hn.reshape(v_count * b, 1, -1))[:, -1].reshape(v_count, b, -1)
        return jnp.argmax(logits, -1).astype(jnp.int32), cache_k, cache_v

    def cond(st):
        step, _, done, _, _ = st
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(st):
        step, tokens, done, ck, cv = st
        tok, ck, cv = step_fn(step, tokens[:, :, step - 1], ck, cv)
        tok = jnp.where(done, pad_id, tok)
        return step + 1, tokens.at[:, :, step].set(tok), done | jnp.isin(tok, eos_ids), ck, cv

    _, tokens, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, done, own_k, own_v))
    return tokens, jnp.isfinite(sw["last_logits"]).all()


def truncation_generate(model, input_ids, pixel_values, attention_mask=None, layers=None, *,
                        max_new_tokens: int = 32, keep_top_k: int = 0, eos_token_id=None,
                        pad_token_id: int | None = None, chunks: int = 4, attn_impl: str = "fused",
                        text_bucket: int = 1, check_finite: bool = True, **image_kw) -> TruncationGenerateOutput:
    """Greedy decoding for every cut layer K at once (batched over rows, each (K, row) stops at EOS).

    The prompt's shared prefix (system + image keys/values) is stored once; each variant keeps a
    small cache of its own tokens (text after the image and what it generates); at layers >= K the
    image keys are masked. text_bucket: as in `truncation_sweep`. Returns tokens (V, B, max_new_tokens)
    and lengths (V, B).
    """
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    ids, mask = validate_inputs(model, input_ids, pixel_values, attention_mask, new_tokens=int(max_new_tokens),
                                **image_kw)
    ids, mask = left_align(ids, mask)
    ids, mask, ks, lay, images = _prepare(model, ids, pixel_values, mask, layers, keep_top_k, chunks, attn_impl,
                                          text_bucket, **image_kw)
    cfg = model.config
    eos, pad = stop_tokens(cfg, eos_token_id, pad_token_id)
    tokens, finite = _generate_jit(
        model, jnp.asarray(ids), images, jnp.asarray(mask),
        jnp.asarray(lay.text_idx), jnp.asarray(lay.text_valid), jnp.asarray(lay.image_start),
        jnp.asarray(lay.image_end), jnp.asarray(ks), jnp.asarray(eos), jnp.int32(pad), prefix_len=lay.prefix_len,
        system_len=lay.system_len, image_max=lay.image_max, chunks=_chunks(ks, cfg.text.num_layers, chunks),
        keep_top_k=int(keep_top_k), impl=attn_impl, max_new_tokens=int(max_new_tokens))
    if check_finite and not bool(finite):
        from jaxflow.health import raise_non_finite

        raise_non_finite(model, ids, pixel_values, mask, what="the prompt's logits", **image_kw)
    tokens = np.asarray(tokens)
    is_eos = np.isin(tokens, eos)
    lengths = np.where(is_eos.any(-1), is_eos.argmax(-1) + 1, max_new_tokens).astype(np.int32)
    return TruncationGenerateOutput(tokens=tokens, lengths=lengths, layers=ks)


# --------------------------------------------------------------------------- reference path


def fastv_keep_mask(model, input_ids, pixel_values, attention_mask, truncate_at: int, keep_top_k: int, **image_kw):
    """(B, T) bool: the image tokens FastV keeps from layer K on (top-k by the last real token's
    head-averaged attention at layer K-1 of the untruncated model; layer 0 for K = 0)."""
    ids, mask, _, lay, images = _prepare(model, input_ids, pixel_values, attention_mask, [truncate_at], keep_top_k, 1,
                                         "fused", **image_kw)
    out = _attn_last_jit(model, jnp.asarray(ids), images, jnp.asarray(mask))
    kept = np.asarray(_keep_sets(out, jnp.asarray(lay.image_start), jnp.asarray(lay.image_end), lay.image_max,
                                 jnp.asarray([truncate_at]), keep_top_k))[0]  # (B, k)
    keep = np.zeros(ids.shape, bool)
    for r in range(ids.shape[0]):
        keep[r, lay.image_start[r] + kept[r]] = True
    return keep


@jax.jit
def _attn_last_jit(model, ids, images, mask):
    from jaxflow.forward import forward_core

    b, t = ids.shape
    last = (t - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=1)).astype(jnp.int32)
    return forward_core(model, ids, images, mask, attn_rows=last[:, None]).attn_rows
