"""Attention knockout between token groups (Zhang et al., "Cross-modal Information Flow in Multimodal
Large Language Models", CVPR 2025), on every family.

`knockout` is one forward in which, in every selected layer, no query position of a set attends to
any key position of another set (positions and everything else unchanged): the attention edge
between the two groups is cut. `knockout_sweep` measures, for named paths (Image->Question,
Image->Last, Question->Last, Image->Answer, a region of image tokens ->Last) and every window of
`window` consecutive layers, how the probability of the answer token changes when that path is cut
in that window, batched: no Python loop of forwards.

Why the sweep is cheap: cutting edges whose queries start at position t0 cannot change any row before
t0 (attention is causal), so the clean forward runs once, keeping its keys and values, and each
variant recomputes only the rows from t0 on (for ->Last paths a single row per layer),
attending to [clean prefix ++ its own rows' keys]: the prefix is broadcast into the attention, never
copied per variant (as in the truncation sweep). Variants run in chunks (`chunk`) that bound the memory.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxflow.analysis.truncation import _variant_attention
from jaxflow.forward import ForwardOutput, _check_impl, causal_allowed, forward_core, validate_inputs
from jaxflow.models.layers import attend
from jaxflow.models.llama import decoder_layer
from jaxflow.sharding import constrain_rows

STANDARD_PATHS = ("image->question", "image->last", "question->last")
# The first recomputed row is rounded down to a multiple of this: recomputing a few unaffected rows
# changes nothing, and inputs whose paths start at nearby rows share one compiled program.
ROW_BUCKET = 16


@partial(jax.jit, static_argnames=("impl",))
def _knockout_jit(model, input_ids, images, attention_mask, queries, keys, layers, impl):
    return forward_core(model, input_ids, images, attention_mask, impl=impl, knockout=(queries, keys, layers))


def _bool(name, x, shape):
    a = np.asarray(x)
    if a.shape != tuple(shape) or a.dtype != bool:
        raise ValueError(f"{name} must be a bool array of shape {tuple(shape)}, got {a.shape} {a.dtype}")
    return a


def knockout(model, input_ids, pixel_values, attention_mask, queries, keys, layers, *, attn_impl: str = "fused",
             **image_kw) -> ForwardOutput:
    """A forward in which, in every layer l with layers[l], no position of `queries` attends to a
    position of `keys`. queries, keys: (B, T) bool; layers: (L,) bool. Returns ForwardOutput
    (logits (B, T, V) float32). Cut a set of keys that leaves a query row no key at all only if you
    mean it: such a row is treated as the kernels treat any fully masked row (as padding)."""
    _check_impl(attn_impl)
    ids, mask = validate_inputs(model, input_ids, pixel_values, attention_mask, **image_kw)
    L = model.config.text.num_layers
    q = _bool("queries", queries, ids.shape)
    k = _bool("keys", keys, ids.shape)
    lay = _bool("layers", layers, (L,))
    images = model.image_inputs(ids, mask, pixel_values, **image_kw)
    return _knockout_jit(model, jnp.asarray(ids), images, jnp.asarray(mask), jnp.asarray(q), jnp.asarray(k),
                         jnp.asarray(lay), attn_impl)


# --------------------------------------------------------------------------- token groups and paths


def last_prompt_positions(attention_mask, answer_mask=None) -> np.ndarray:
    """(B,) the last prompt position of each row: the token before the first answer token when an
    answer_mask is given, else the last real token."""
    mask = np.asarray(attention_mask) > 0
    if answer_mask is not None:
        am = np.asarray(answer_mask, bool)
        has = am.any(1)
        first = np.where(has, am.argmax(1), mask.shape[1])
        last_real = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
        return np.where(has, first - 1, last_real).astype(np.int32)
    return (mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)).astype(np.int32)


def token_groups(input_ids, attention_mask, image_token_id: int, answer_mask=None) -> dict[str, np.ndarray]:
    """(B, T) bool masks of the groups paths are made of: "image" (image tokens), "question" (the
    real tokens after a row's last image token and before its last prompt position: the question
    and the template's words around it), "last" (the last prompt position), and "answer" (answer
    tokens, when answer_mask is given)."""
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask) > 0
    b, t = ids.shape
    image = (ids == image_token_id) & mask
    last = last_prompt_positions(attention_mask, answer_mask)
    cols = np.arange(t)[None, :]
    has_image = image.any(1)
    end_img = np.where(has_image, t - 1 - np.argmax(image[:, ::-1], axis=1), -1)
    question = mask & (cols > end_img[:, None]) & (cols < last[:, None])
    groups = {"image": image, "question": question, "last": cols == last[:, None]}
    if answer_mask is not None:
        groups["answer"] = np.asarray(answer_mask, bool) & mask
    return groups


def standard_paths(groups: dict, region=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (queries, keys)} of Zhang et al.'s paths: "image->question" (question queries do not
    read image keys), "image->last", "question->last", and "image->answer" when the groups have
    answer tokens, "region->last" for a (B, T) bool mask of image tokens (e.g. an object's box)."""
    paths = {"image->question": (groups["question"], groups["image"]),
             "image->last": (groups["last"], groups["image"]),
             "question->last": (groups["last"], groups["question"])}
    if "answer" in groups and groups["answer"].any():
        paths["image->answer"] = (groups["answer"], groups["image"])
    if region is not None:
        paths["region->last"] = (groups["last"], np.asarray(region, bool) & groups["image"])
    return paths


# --------------------------------------------------------------------------- the sweep


@dataclasses.dataclass
class KnockoutSweep:
    paths: list  # path names, in order
    starts: np.ndarray  # (W,) first layer of each window
    window: int  # layers per window
    probs: np.ndarray  # (P, W, B) probability of the target token with the path cut in the window
    base: np.ndarray  # (B,) its probability in the clean forward
    targets: np.ndarray  # (B,) the target token (default: the clean forward's greedy token)
    positions: np.ndarray  # (B,) the scored position (whose next token is the target)

    @property
    def change(self) -> np.ndarray:
        """(P, W, B) relative change of the target's probability, in percent (Zhang et al.'s figure)."""
        return 100.0 * (self.probs - self.base[None, None]) / np.maximum(self.base[None, None], 1e-30)


@partial(jax.jit, static_argnames=("impl",))
def _clean_jit(model, input_ids, images, attention_mask, targets, score_rows, *, impl):
    """The clean forward, keeping what the variants reuse: embeddings x (B, T, D), RoPE tables, the
    allowed mask (B, T, T), the keys and values of every layer (L, B, T, KVH, hd); and the target's
    probability (B,) at score_rows with the targets (targets < 0: the greedy token)."""
    lm = model.language_model
    b, t = input_ids.shape
    x = model.embed(input_ids, images, impl)  # (B, T, D)
    positions = model.positions(input_ids, attention_mask, images)
    cos, sin = model.rope_tables(positions, x.dtype, context_len=t)
    allowed = causal_allowed(attention_mask > 0, jnp.broadcast_to(jnp.arange(t), (b, t)), t)  # (B, T, T)
    clean = lm.run_layers(x, cos, sin, allowed, impl=impl, capture=("kv",))
    cache = {"k": clean.captures["k"], "v": clean.captures["v"]}
    bidx = jnp.arange(b)
    logits = lm.logits(clean.hidden[bidx, score_rows][:, None])[:, 0]  # (B, V)
    tgt = jnp.where(targets < 0, jnp.argmax(logits, -1), targets)
    base = jnp.exp(jax.nn.log_softmax(logits)[bidx, tgt])
    return x, cos, sin, allowed, cache, base, tgt


def _suffix_layers(lm, x, cos, sin, allowed, pre_k, pre_v, cut, cut_layers):
    """The decoder stack on the rows from t0 on against the clean keys and values of the rows before,
    which are broadcast into the attention (`truncation._variant_attention`), never copied.

    x (B, Q, D) rows t0..T-1; cos/sin (B, Q, hd) or (B, Q, 2, hd); allowed (B, Q, T) bool;
    pre_k/v (L, B, t0, KVH, hd); cut (B, Q, T) bool edges knocked out in the layers with
    cut_layers (L,) bool. Returns the last layer's output (B, Q, D).
    """
    graphdef, state = nnx.split(lm.layers)
    scale = lm.cfg.head_dim ** -0.5
    t0 = pre_k.shape[2]

    def body(h, xs_l):
        ok = allowed & ~(cut & cut_layers[xs_l["l"]])  # (B, Q, T)

        def attention(q, k, v):  # q (B, Q, H, hd), k/v (B, Q, KVH, hd) -> (B, Q, H, hd)
            if t0 == 0:  # no clean prefix: the rows read their own keys only
                return attend(q, k, v, ok, impl="reference", scale=scale)
            o = _variant_attention(q[None], k[None], v[None], ok[None, :, :, t0:], xs_l["pre_k"], xs_l["pre_v"],
                                   ok[None, :, :, :t0], scale)
            return o[0]

        h_out, _, _ = decoder_layer(nnx.merge(graphdef, xs_l["layer"]), h, cos, sin, attention)
        return h_out, None

    xs = {"layer": state, "l": jnp.arange(pre_k.shape[0]), "pre_k": pre_k, "pre_v": pre_v}
    h, _ = jax.lax.scan(body, constrain_rows(x, lm.mesh), xs)
    return constrain_rows(h, lm.mesh)


def _suffix_inputs(x, cos, sin, allowed, cache, t0: int):
    """What every variant shares: the rows from t0 on, x (B, Q, D), cos/sin (B, Q, ...), allowed
    (B, Q, T), and the clean prefix's keys and values pre_k/v (L, B, t0, KVH, hd)."""
    return x[:, t0:], cos[:, t0:], sin[:, t0:], allowed[:, t0:], cache["k"][:, :, :t0], cache["v"][:, :, :t0]


@partial(jax.jit, static_argnames=("t0", "chunk"))
def _variants_jit(model, x, cos, sin, allowed, cache, ko_q, ko_k, ko_layers, targets, score_rows, *, t0, chunk):
    """Each variant (ko_q, ko_k (V, B, T) bool; ko_layers (V, L) bool) recomputes rows t0.. against the
    clean keys and values of rows before t0. Returns the targets' probabilities (V, B)."""
    lm = model.language_model
    bidx = jnp.arange(x.shape[0])
    xs, cs, ss, als, pre_k, pre_v = _suffix_inputs(x, cos, sin, allowed, cache, t0)

    def one(args):
        q, k, lay = args
        h = _suffix_layers(lm, xs, cs, ss, als, pre_k, pre_v, q[:, t0:, None] & k[:, None, :], lay)
        h = h[bidx, score_rows - t0]  # (B, D)
        return jax.nn.log_softmax(lm.logits(h[:, None])[:, 0])[bidx, targets]  # (B,)

    return jnp.exp(jax.lax.map(one, (ko_q, ko_k, ko_layers), batch_size=chunk))


def window_starts(num_layers: int, window: int) -> np.ndarray:
    """First layers of every window of `window` consecutive layers: 0 .. L - window."""
    if not 1 <= window <= num_layers:
        raise ValueError(f"window must be in 1..{num_layers} layers, got {window}")
    return np.arange(num_layers - window + 1)


def default_window(num_layers: int) -> int:
    """Zhang et al.'s 9 of 32 layers, scaled to the model's depth (at least 1)."""
    return max(1, round(num_layers * 9 / 32))


def knockout_sweep(model, input_ids, pixel_values, attention_mask, paths: dict, *, window: int | None = None,
                   targets=None, score_positions=None, chunk: int = 8, attn_impl: str = "fused",
                   **image_kw) -> KnockoutSweep:
    """The target token's probability with each path cut in each window of `window` consecutive
    layers: one clean forward, then every (path, window) of the batch in one jit program per group of
    paths whose queries start at the same row (two programs for the standard paths: the ->Last paths
    recompute one row per layer, Image->Question the rows from the question on).

    paths: {name: (queries (B, T) bool, keys (B, T) bool)} (e.g. `standard_paths(token_groups(...))`).
    window: layers per window (default `default_window(L)`: 9 for 32 layers). targets (B,) int: the
    token whose probability is read (default: the clean forward's greedy token at the scored
    position); score_positions (B,) int: the position whose next-token distribution is read
    (default: each row's last real token). chunk: variants computed together (memory). attn_impl:
    the clean forward's attention; the variants' few rows use an explicit float32 softmax.
    """
    _check_impl(attn_impl)
    ids, mask = validate_inputs(model, input_ids, pixel_values, attention_mask, **image_kw)
    if not paths:
        raise ValueError("no paths to knock out: pass {name: (queries, keys)}")
    L = model.config.text.num_layers
    window = default_window(L) if window is None else int(window)
    starts = window_starts(L, window)
    names = list(paths)
    qs, ks = [], []
    for name in names:
        q, k = paths[name]
        qs.append(_bool(f"paths[{name!r}] queries", q, ids.shape))
        ks.append(_bool(f"paths[{name!r}] keys", k, ids.shape))
    rows = last_prompt_positions(mask) if score_positions is None else np.asarray(score_positions, np.int32)
    if rows.shape != (ids.shape[0],) or (rows < 0).any() or (rows >= ids.shape[1]).any():
        raise ValueError(f"score_positions must be ({ids.shape[0]},) positions in 0..{ids.shape[1] - 1}")
    tg = np.full(ids.shape[0], -1, np.int32) if targets is None else np.asarray(targets, np.int32)
    if tg.shape != (ids.shape[0],):
        raise ValueError(f"targets must have shape ({ids.shape[0]},), got {tg.shape}")
    lay = np.zeros((len(starts), L), bool)
    for i, s in enumerate(starts):
        lay[i, s:s + window] = True
    images = model.image_inputs(ids, mask, pixel_values, **image_kw)
    rows_j = jnp.asarray(rows)
    x, cos, sin, allowed, cache, base, tgt = _clean_jit(model, jnp.asarray(ids), images, jnp.asarray(mask),
                                                        jnp.asarray(tg), rows_j, impl=attn_impl)
    # rows before the first one a path's queries touch are the clean forward's: each path recomputes
    # only its own suffix (one row for the ->Last paths); paths with the same first row run together
    groups: dict[int, list[int]] = {}
    for i, q in enumerate(qs):
        touched = np.flatnonzero(q.any(0))
        t0 = min(int(touched[0]) if touched.size else ids.shape[1], int(rows.min()))
        groups.setdefault(t0 // ROW_BUCKET * ROW_BUCKET, []).append(i)
    probs = np.zeros((len(names), len(starts), ids.shape[0]))
    for t0, members in groups.items():
        ko_q = np.repeat(np.stack([qs[i] for i in members]), len(starts), axis=0)  # (V, B, T), path-major
        ko_k = np.repeat(np.stack([ks[i] for i in members]), len(starts), axis=0)
        ko_l = np.tile(lay, (len(members), 1))  # (V, L)
        V = len(ko_l)
        p = _variants_jit(model, x, cos, sin, allowed, cache, jnp.asarray(ko_q), jnp.asarray(ko_k), jnp.asarray(ko_l),
                          tgt, rows_j, t0=t0, chunk=max(1, min(int(chunk), V)))
        probs[members] = np.asarray(p, np.float64).reshape(len(members), len(starts), -1)
    return KnockoutSweep(paths=names, starts=starts, window=window, probs=probs, base=np.asarray(base, np.float64),
                         targets=np.asarray(tgt), positions=rows)


def knockout_sweep_loop(model, input_ids, pixel_values, attention_mask, paths: dict, *, window: int | None = None,
                        targets=None, score_positions=None, attn_impl: str = "fused", **image_kw) -> np.ndarray:
    """The same probabilities (P, W, B) by one `knockout` forward per (path, window): the reference
    (and the loop a peer would run) that `knockout_sweep` is checked and timed against."""
    ids, mask = validate_inputs(model, input_ids, pixel_values, attention_mask, **image_kw)
    L = model.config.text.num_layers
    window = default_window(L) if window is None else int(window)
    starts = window_starts(L, window)
    rows = last_prompt_positions(mask) if score_positions is None else np.asarray(score_positions, np.int32)
    bidx = np.arange(ids.shape[0])
    from jaxflow.forward import forward

    if targets is None:
        clean = np.asarray(forward(model, ids, pixel_values, mask, attn_impl=attn_impl, **image_kw).logits)
        targets = clean[bidx, rows].argmax(-1)
    out = np.zeros((len(paths), len(starts), ids.shape[0]))
    for i, (q, k) in enumerate(paths.values()):
        for j, s in enumerate(starts):
            lay = np.zeros(L, bool)
            lay[s:s + window] = True
            lg = np.asarray(knockout(model, ids, pixel_values, mask, q, k, lay, attn_impl=attn_impl,
                                     **image_kw).logits, np.float64)[bidx, rows]
            lg = lg - lg.max(-1, keepdims=True)
            p = np.exp(lg) / np.exp(lg).sum(-1, keepdims=True)
            out[i, j] = p[bidx, np.asarray(targets)]
    return out
