"""Non-finite outputs: where a forward first turns NaN or Inf, and the one-line error that says so.

Generation and the truncation sweep check, inside their compiled programs, that the prompt's logits
are finite (one reduction over (B, vocab) values, nothing measurable); only when they are not is the
model run again, on the host's request, layer by layer (`first_non_finite`) to name the first stage
whose output is not finite: the image features, the token embeddings, a decoder layer, or the final
norm and unembedding. Broken weights are usually caught earlier, at load (`jaxflow.load(verify=True)`);
this catches what loading cannot see, e.g. float16 activations that overflow.
"""
from __future__ import annotations

import numpy as np


class NonFiniteError(ValueError):
    """The model produced NaN or Inf; the message names the first stage that did."""


def _finite_by_stage(model, ids, images, mask):
    """Per stage, whether its output is finite at every real token: image features (), embeddings (),
    each layer's output (L,), logits ()."""
    import jax.numpy as jnp

    from jaxflow.forward import forward_core

    real = (mask > 0)[..., None]  # (B, T, 1)
    ok = lambda a: jnp.all(jnp.isfinite(a) | ~real)  # noqa: E731  (B, T, D) -> ()
    feats = jnp.all(jnp.isfinite(model.encode_images(images, "reference"))) if images is not None else jnp.bool_(True)
    emb = ok(model.embed(ids, images, "reference"))
    out = forward_core(model, ids, images, mask, impl="reference", capture=("residual",))
    res = out.captures["residual"]  # (L, B, T, D): each layer's input
    layers = jnp.concatenate([_layers_finite(res[1:], real), ok(out.hidden)[None]])  # (L,) each layer's output
    return feats, emb, layers, ok(out.logits)


def _finite_by_stage_jit(*args):
    """`_finite_by_stage` under one module-level jit (a jit made per call would retrace every time)."""
    global _FINITE_JIT
    if _FINITE_JIT is None:
        import jax

        _FINITE_JIT = jax.jit(_finite_by_stage)
    return _FINITE_JIT(*args)


_FINITE_JIT = None


def _layers_finite(res, real):
    """res (L, B, T, D), real (B, T, 1) -> (L,) bool."""
    import jax.numpy as jnp

    return jnp.all(jnp.isfinite(res) | ~real[None], axis=(1, 2, 3))


def first_non_finite(model, input_ids, pixel_values, attention_mask=None, **image_kw) -> str | None:
    """The first stage of the forward whose output holds NaN/Inf at a real token, as words (e.g.
    "decoder layer 3 of 32"), or None when the whole forward is finite. input_ids/attention_mask (B, T).
    One compiled pass of the reference path, returning only a finite flag per stage."""
    import jax.numpy as jnp

    ids = np.asarray(input_ids, np.int32)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    images = model.image_inputs(ids, mask, pixel_values, **image_kw) if pixel_values is not None else None
    feats, emb, layers, logits = _finite_by_stage_jit(model, jnp.asarray(ids), images, jnp.asarray(mask))
    if not bool(feats):
        return "the image features (vision tower and projector)"
    if not bool(emb):
        return "the token embeddings"
    layers = np.asarray(layers)
    if not layers.all():
        first = int(np.argmin(layers))
        return f"decoder layer {first} of {layers.size} (its output)"
    if not bool(logits):
        return "the final norm and unembedding (logits)"
    return None


def raise_non_finite(model, input_ids, pixel_values, attention_mask=None, what: str = "the logits", **image_kw):
    """Raises NonFiniteError naming the first non-finite stage (called once outputs were found non-finite)."""
    where = first_non_finite(model, input_ids, pixel_values, attention_mask, **image_kw)
    dtype = getattr(getattr(model, "dtype", None), "name", None) or str(getattr(model, "dtype", ""))
    hint = ("float16 activations may overflow: load the model in bfloat16 or float32 (--dtype)"
            if "float16" in dtype and "bfloat16" not in dtype else
            "the weights may be broken: reload with jaxflow.load(path, verify=True) or convert the checkpoint again")
    raise NonFiniteError(f"{what} are NaN/Inf; the first non-finite output is "
                         f"{where or 'in a stage the reference path computes finitely (the fused attention kernel)'}"
                         f": {hint}")
