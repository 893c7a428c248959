"""LLaVA-CAM: Grad-CAM over the image-token grid for every decoder layer, from one backward pass.

Semantics (docs/analysis.md). The target score of a row is s = sum_t logit(p_t - 1, y_t) over its
answer tokens y (teacher forcing: prompt + answer in one forward), or the sum of log-probabilities
with score="logprob". The site is the MLP input of every decoder layer (the output of
post_attention_layernorm) at the image-token positions. A zero-valued additive delta at every
layer's site is an explicit argument of the forward (`mlp_in_delta`, (L, B, T, D)); one `jax.grad`
with respect to it gives G = ds/dh for all L layers at once. With A = h at the N image tokens:

- "paper":    alpha = mean_k ReLU(G_k) per channel; map = ReLU(mean_c alpha_c * A_c)
- "gradcam":  alpha = mean_k G_k per channel;       map = ReLU(sum_c alpha_c * A_c)
- "gradxact": map = ReLU(sum_c G_c * A_c) per token (no pooling)

Each layer's map is divided by its maximum (an all-zero map stays zero); an optional threshold then
zeroes values below it (the paper uses 0.5). SmoothGrad averages the raw (pre-normalisation) maps of
`smooth_n` noisy copies of the image (Gaussian noise of std `smooth_sigma` added to the [0, 1] image:
un-normalise with the image mean/std, add noise, re-normalise), vmapped over the copies, and
normalises the average. Per-answer-token maps (one target per answer token) come from the same
forward: the VJP is vmapped over one-hot cotangents, and the all-token map is their sum.

Grid: token k of the image block is row k // grid_w, column k % grid_w (24x24 for LLaVA-1.5). With
vision_feature_select_strategy "full" the block starts with the CLS feature: it takes part in the
channel pooling but is not drawn.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxflow.analysis._common import answer_targets, check_score, prepare, target_scores
from jaxflow.models.image_layout import place_on_grid
from jaxflow.data.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from jaxflow.forward import forward_core

METHODS = ("paper", "gradcam", "gradxact")


@dataclasses.dataclass
class CamResult:
    """LLaVA-CAM maps of a batch: one map per image (I images; with one image per row, I = B and image
    b is row b's). L = decoder layers, A = most answer tokens in a row."""
    maps: dict  # method -> (I, L, gh, gw) float32 in [0, 1] (normalised per layer, thresholded)
    raw: dict  # method -> (I, L, gh, gw) float32 >= 0, before normalisation (SmoothGrad: the average)
    token_maps: dict | None  # method -> (I, A, L, gh, gw) per answer token of the image's row (per_token=True)
    token_raw: dict | None  # method -> (I, A, L, gh, gw) before normalisation
    token_mask: np.ndarray  # (B, A) bool: which entries are real answer tokens
    token_ids: np.ndarray  # (B, A) int32 answer token ids (0 where not real)
    grids: np.ndarray  # (I, 2) int32 each image's own grid (gh, gw): maps are zero outside it
    token_positions: np.ndarray  # (B, A) int32 answer token positions p in the sequence
    scores: np.ndarray  # (B, A) float32 each answer token's logit (log-prob) under teacher forcing
    # (with SmoothGrad: the mean over the noisy copies)
    image_rows: np.ndarray | None = None  # (I,) int32 the row of each image


def raw_cam(g, h, method: str, valid=None):
    """Unnormalised CAM from site gradients g and activations h, both (..., N, D) -> (..., N) float32.
    valid (..., N) bool (broadcast) marks real image tokens: the channel weights pool over those only."""
    g, h = g.astype(jnp.float32), h.astype(jnp.float32)

    def token_mean(x):  # (..., N, D) -> (..., 1, D)
        if valid is None:
            return jnp.mean(x, axis=-2, keepdims=True)
        w = valid[..., None].astype(jnp.float32)
        return jnp.sum(x * w, axis=-2, keepdims=True) / jnp.maximum(jnp.sum(w, axis=-2, keepdims=True), 1.0)

    if method == "paper":
        alpha = token_mean(jax.nn.relu(g))  # (..., 1, D)
        return jax.nn.relu(jnp.mean(alpha * h, axis=-1))
    if method == "gradcam":
        alpha = token_mean(g)
        return jax.nn.relu(jnp.sum(alpha * h, axis=-1))
    if method == "gradxact":
        return jax.nn.relu(jnp.sum(g * h, axis=-1))
    raise ValueError(f"unknown CAM method {method!r}; choose from {METHODS}")


def normalize_cam(raw, threshold=None):
    """Divides each map (last axis) by its maximum (all-zero maps stay zero); zeroes values < threshold."""
    mx = jnp.max(raw, axis=-1, keepdims=True)
    out = jnp.where(mx > 0, raw / jnp.where(mx > 0, mx, 1.0), 0.0)
    if threshold is not None:
        out = jnp.where(out >= threshold, out, 0.0)
    return out


def noisy_copies(key, pixel_values, n: int, sigma, image_mean, image_std):
    """n noisy copies (n, B, C, H, W) of normalised pixels: Gaussian noise of std sigma on the [0, 1] image."""
    from jaxflow.models.family import noisy_copies as _noisy

    return _noisy(key, pixel_values, n, sigma, image_mean, image_std, channel_axis=-3)


def _site(model, ids, pixels, mask, img_rows, img_pos, tgt_pos, tgt_tok, tgt_valid, logprob, *, per_token,
          token_batch, impl):
    """G and h at the image tokens for every layer from one backward. Image i's tokens are at
    positions img_pos[i] (I, N) of row img_rows[i] (I,).

    Returns g (L, I, N, D) — or (A, L, I, N, D) per answer token —, h (L, I, N, D), scores (B, A)."""
    t = model.config.text
    b, n_t = ids.shape
    delta0 = jnp.zeros((t.num_layers, b, n_t, t.hidden_size), jnp.float32)

    def f(delta):
        out = forward_core(model, ids, pixels, mask, impl=impl, mlp_in_delta=delta, capture=("mlp_in",))
        s = target_scores(model, out.hidden, tgt_pos, tgt_tok, tgt_valid, logprob)  # (B, A)
        return s, out.captures["mlp_in"]

    def at_image(x):  # (L, B, T, D) -> (L, I, N, D)
        return x[:, img_rows[:, None], img_pos]

    if per_token:
        s, vjp, h = jax.vjp(f, delta0, has_aux=True)
        a = tgt_pos.shape[1]
        cot = jnp.eye(a, dtype=jnp.float32)[:, None, :] * tgt_valid[None].astype(jnp.float32)  # (A, B, A)

        def one(c):
            return at_image(vjp(c)[0])

        g = jax.lax.map(one, cot, batch_size=token_batch or a)  # vmapped backward passes, in chunks
    else:
        def total(d):
            sc, hh = f(d)
            return sc.sum(), (sc, hh)

        g, (s, h) = jax.grad(total, has_aux=True)(delta0)
        g = at_image(g)
    return g, at_image(h), s


@partial(jax.jit, static_argnames=("per_token", "smooth_n", "smooth_batch", "token_batch", "impl", "grid_hw"))
def _cam_jit(model, ids, pixels, mask, img_rows, img_pos, img_valid, cells, tgt_pos, tgt_tok, tgt_valid, logprob, key, sigma,
             mean, std, threshold, *, per_token, smooth_n, smooth_batch, token_batch, impl, grid_hw):
    """Every method's maps (they cost nothing next to the backward, so one compilation serves all)."""
    def raw_maps(pix):
        g, h, s = _site(model, ids, pix, mask, img_rows, img_pos, tgt_pos, tgt_tok, tgt_valid, logprob,
                        per_token=per_token, token_batch=token_batch, impl=impl)
        out = {}
        for m in METHODS:
            if per_token:
                out["tok_" + m] = raw_cam(g, h[None], m, img_valid)  # (A, L, I, N)
                out[m] = raw_cam(g.sum(0), h, m, img_valid)  # the all-token score's gradient is the sum
            else:
                out[m] = raw_cam(g, h, m, img_valid)  # (L, I, N): each image pools its own tokens
        return out, s

    if smooth_n:
        noisy = model.noisy_images(key, pixels, smooth_n, sigma, mean, std)
        out, s = jax.lax.map(raw_maps, noisy, batch_size=smooth_batch or smooth_n)  # vmapped, in chunks
        out, s = jax.tree.map(lambda x: x.mean(0), (out, s))
    else:
        out, s = raw_maps(pixels)
    res = {}
    for name, r in out.items():
        r = place_on_grid(jnp.moveaxis(r, -2, 0), cells, grid_hw)  # (I, L, gh, gw) or (I, A, L, gh, gw)
        res["raw_" + name] = r
        res["norm_" + name] = normalize_cam(r.reshape(*r.shape[:-2], -1), threshold).reshape(r.shape)
    return res, s


def _check(methods, threshold, smooth_n, smooth_sigma):
    if not methods:
        raise ValueError("no CAM method given")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown CAM method {m!r}; choose from {', '.join(METHODS)}")
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    if int(smooth_n) < 0:
        raise ValueError(f"smooth_n must be >= 0, got {smooth_n}")
    if smooth_n and not float(smooth_sigma) > 0:
        raise ValueError(f"smooth_sigma must be > 0, got {smooth_sigma}")


def llava_cams(model, input_ids, pixel_values, answer_mask, methods=METHODS, *, attention_mask=None,
               threshold: float | None = None, score: str = "logit", per_token: bool = False, smooth_n: int = 0,
               smooth_sigma: float = 0.15, seed: int = 0, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
               smooth_batch: int | None = None, token_batch: int | None = None,
               attn_impl: str = "fused", **image_kw) -> CamResult:
    """LLaVA-CAM for several methods (one forward and backward serves them all), every layer.

    input_ids (B, T) with the image tokens of one or more images per row (each image gets its own maps,
    its channel weights pooled over its own tokens); pixel_values as the family's processor gives them, float32
    preprocessed; answer_mask (B, T) bool marks the answer tokens (at least one per row) that follow the
    prompt; attention_mask (B, T) (left or right padding). score "logit" or "logprob". threshold zeroes
    normalised values below it. per_token adds one map per answer token (jax.vmap over cotangents;
    `token_batch` bounds how many backward passes run at once). smooth_n > 0 turns on SmoothGrad
    with noise std smooth_sigma on the [0, 1] image (image_mean / image_std: the normalisation the
    pixels went through; `smooth_batch` bounds how many copies run at once). Compiled once per input
    shape and (per_token, smooth_n, smooth_batch, token_batch, attn_impl); returns numpy arrays.
    image_kw: the family's image arguments (InternVL: tile_grids, one (rows, cols) per image, to
    stitch the tiles' maps into the original image's layout; Qwen2-VL: image_grid_thw). Maps lie on each
    image's own grid (`CamResult.grids`; smaller images are zero outside theirs).
    """
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    _check(methods, threshold, smooth_n, smooth_sigma)
    logprob = check_score(score)
    p = prepare(model, input_ids, pixel_values, attention_mask, answer_mask, require_answer=True,
                attn_impl=attn_impl, **image_kw)
    tgt_pos, tgt_tok, tgt_valid, ans_pos = answer_targets(p.input_ids, p.spans.answer)
    res, s = _cam_jit(model, jnp.asarray(p.input_ids), p.images, jnp.asarray(p.attention_mask),
                      jnp.asarray(p.image_rows), jnp.asarray(p.image_positions), jnp.asarray(p.image_valid),
                      jnp.asarray(p.layout.cells),
                      jnp.asarray(tgt_pos), jnp.asarray(tgt_tok),
                      jnp.asarray(tgt_valid), logprob, jax.random.PRNGKey(int(seed)), jnp.float32(smooth_sigma),
                      jnp.asarray(image_mean, jnp.float32), jnp.asarray(image_std, jnp.float32),
                      jnp.float32(0.0 if threshold is None else threshold), per_token=bool(per_token),
                      smooth_n=int(smooth_n), smooth_batch=None if smooth_batch is None else int(smooth_batch),
                      token_batch=None if token_batch is None else int(token_batch), impl=attn_impl,
                      grid_hw=tuple(p.grid_hw))
    pick = lambda prefix: {m: np.asarray(res[prefix + m]) for m in methods}  # noqa: E731
    return CamResult(maps=pick("norm_"), raw=pick("raw_"),
                     token_maps=pick("norm_tok_") if per_token else None,
                     token_raw=pick("raw_tok_") if per_token else None, token_mask=tgt_valid,
                     token_ids=tgt_tok, grids=p.layout.grids, token_positions=np.where(tgt_valid, ans_pos, 0).astype(np.int32),
                     scores=np.asarray(s, np.float32), image_rows=p.image_rows)


def llava_cam(model, input_ids, pixel_values, answer_mask, method: str = "paper", *, attention_mask=None,
              **kwargs) -> np.ndarray:
    """LLaVA-CAM of every decoder layer: (B, L, grid_h, grid_w) float32 in [0, 1].

    One forward and one backward pass for all layers. Keywords as `llava_cams` (threshold, score,
    smooth_n, smooth_sigma, seed, image_mean, image_std, smooth_batch, attn_impl).
    """
    if not isinstance(method, str):
        raise ValueError(f"method must be one of {METHODS}, got {method!r} (llava_cams takes several)")
    return llava_cams(model, input_ids, pixel_values, answer_mask, (method,), attention_mask=attention_mask,
                      **kwargs).maps[method]


def llava_cam_per_token(model, input_ids, pixel_values, answer_mask, method: str = "paper", *,
                        attention_mask=None, **kwargs):
    """One LLaVA-CAM per answer token, every layer: (maps (B, A, L, gh, gw), token_mask (B, A) bool).

    Token a of row b is that row's a-th answer token; its target is its own logit at the position
    before it. Entries where token_mask is False are zero. Keywords as `llava_cams`.
    """
    if not isinstance(method, str):
        raise ValueError(f"method must be one of {METHODS}, got {method!r} (llava_cams takes several)")
    kwargs["per_token"] = True
    r = llava_cams(model, input_ids, pixel_values, answer_mask, (method,), attention_mask=attention_mask, **kwargs)
    return r.token_maps[method], r.token_mask


# --------------------------------------------------------------------------- raw site values


@partial(jax.jit, static_argnames=("impl",))
def _site_jit(model, ids, pixels, mask, img_rows, img_pos, tgt_pos, tgt_tok, tgt_valid, logprob, *, impl):
    g, h, s = _site(model, ids, pixels, mask, img_rows, img_pos, tgt_pos, tgt_tok, tgt_valid, logprob, per_token=False,
                    token_batch=None, impl=impl)
    return jnp.swapaxes(g, 0, 1), jnp.swapaxes(h, 0, 1).astype(jnp.float32), s.sum(-1)


@partial(jax.jit, static_argnames=("impl",))
def _site_one_layer_jit(model, ids, pixels, mask, img_rows, img_pos, tgt_pos, tgt_tok, tgt_valid, logprob, layer, *,
                        impl):
    """One layer's G and h: a delta at that layer only, one forward and one backward (the loop's unit)."""
    t = model.config.text
    b, n_t = ids.shape

    def f(d):  # d (B, T, D)
        delta = jnp.zeros((t.num_layers, b, n_t, t.hidden_size), jnp.float32)
        delta = jax.lax.dynamic_update_index_in_dim(delta, d, layer, 0)
        out = forward_core(model, ids, pixels, mask, impl=impl, mlp_in_delta=delta, capture=("mlp_in",))
        s = target_scores(model, out.hidden, tgt_pos, tgt_tok, tgt_valid, logprob)
        h = jax.lax.dynamic_index_in_dim(out.captures["mlp_in"], layer, keepdims=False)
        return s.sum(), h

    g, h = jax.grad(f, has_aux=True)(jnp.zeros((b, n_t, t.hidden_size), jnp.float32))
    take = lambda x: x[img_rows[:, None], img_pos]  # noqa: E731  (B, T, D) -> (I, N, D)
    return take(g), take(h).astype(jnp.float32)


def cam_site(model, input_ids, pixel_values, answer_mask, *, attention_mask=None, score: str = "logit",
             per_layer_loop: bool = False, attn_impl: str = "fused", **image_kw):
    """The CAM site values: (G, h), each (I, L, N, D) float32 at the N tokens of each image (I = B with
    one image per row; `prepare(...).image_rows` says which row an image lies in), every layer.

    G = ds/dh where h is the MLP input (post_attention_layernorm output). By default from one backward
    pass; per_layer_loop=True computes each layer with its own forward and backward (the reference
    code's way: L times the work, for checking and benchmarking).
    """
    logprob = check_score(score)
    p = prepare(model, input_ids, pixel_values, attention_mask, answer_mask, require_answer=True,
                attn_impl=attn_impl, **image_kw)
    tgt_pos, tgt_tok, tgt_valid, _ = answer_targets(p.input_ids, p.spans.answer)
    args = (model, jnp.asarray(p.input_ids), p.images, jnp.asarray(p.attention_mask),
            jnp.asarray(p.image_rows), jnp.asarray(p.image_positions), jnp.asarray(tgt_pos), jnp.asarray(tgt_tok),
            jnp.asarray(tgt_valid),
            logprob)
    if not per_layer_loop:
        g, h, _ = _site_jit(*args, impl=attn_impl)
        return np.asarray(g), np.asarray(h)
    gs, hs = [], []
    for layer in range(model.config.text.num_layers):
        g, h = _site_one_layer_jit(*args, jnp.int32(layer), impl=attn_impl)
        gs.append(np.asarray(g))
        hs.append(np.asarray(h))
    return np.stack(gs, axis=1), np.stack(hs, axis=1)
