"""The logit lens: what the residual stream would predict if the model stopped at each layer.

For every layer l in 0..L, the residual stream entering decoder layer l (l = 0: the embeddings, image
features included; l = L: the last layer's output) goes through the model's final norm and its
unembedding, exactly as the last layer's output does for the model's own logits:
    lens(l, t) = unembed(final_norm(h_l[t]))          (B, L+1, T, V) float32
so lens(L) is the model's logits. Every family: the decoder's `run_layers` captures the residual
entering each layer and `language_model.logits` is the final norm and the unembedding.

The full tensor is (L+1) x T x V floats per row (LLaVA-1.5-7B, 640 tokens: 2.7 GB), so it can be
made lean inside the one jit-compiled program: `positions` (B, P) keeps only those tokens (the residual
is gathered at them inside the layer scan), `top_k` returns the k most likely tokens and their
log-probabilities per (layer, position) instead of the logits, and `targets` (B, P) the log-probability
and rank of a given token per (layer, position) (what the answer's trajectory needs). With `top_k` or
`targets` alone the logits are computed one layer at a time and never leave the device.

`run_logit_lens` is what scripts/logit_lens.py does: one image and question, the answer's first token
through the layers at the last prompt position, and the top word of every image token on the grid.
"""
from __future__ import annotations

import dataclasses
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxflow.forward import _check_impl, causal_allowed, validate_inputs

LOGITS_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass
class LogitLensResult:
    """The lens at P positions per row (P = T without `positions`); L+1 layers: index l is the residual
    entering layer l, index L the last layer's output (the model's own logits)."""
    positions: np.ndarray  # (B, P) int32 the sequence position of each column
    logits: np.ndarray | None  # (B, L+1, P, V) float32 (or logits_dtype); None with top_k
    top_ids: np.ndarray | None = None  # (B, L+1, P, k) int32 the k most likely tokens, best first (top_k)
    top_logprobs: np.ndarray | None = None  # (B, L+1, P, k) float32 their log-probabilities (top_k)
    target_ids: np.ndarray | None = None  # (B, P) int32 the tracked token of each column (targets)
    target_logprobs: np.ndarray | None = None  # (B, L+1, P) float32 its log-probability (targets)
    target_ranks: np.ndarray | None = None  # (B, L+1, P) int32 how many tokens score higher (0 = top-1)

    @property
    def target_probs(self) -> np.ndarray | None:  # (B, L+1, P) float32
        return None if self.target_logprobs is None else np.exp(self.target_logprobs)


def last_positions(attention_mask) -> np.ndarray:
    """(B, T) mask -> (B, 1) int32: each row's last real token (where the next token is predicted)."""
    mask = np.asarray(attention_mask) > 0
    if mask.ndim != 2 or not mask.any(axis=1).all():
        raise ValueError("attention_mask must be (B, T) with a real token in every row")
    return (mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)).astype(np.int32)[:, None]


def _lens_stats(logits, targets, top_k):
    """logits (..., V) float32 -> what the lean outputs need: top-k ids/log-probs, target log-prob/rank
    (log-probabilities as logit - logsumexp: no second V-wide array)."""
    out = {}
    lse = jax.nn.logsumexp(logits, axis=-1)  # (...)
    if top_k:
        vals, ids = jax.lax.top_k(logits, top_k)  # (..., k)
        out["top_ids"], out["top_logprobs"] = ids.astype(jnp.int32), vals - lse[..., None]
    if targets is not None:
        t_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)  # (..., 1)
        out["target_logprobs"] = t_logit[..., 0] - lse
        out["target_ranks"] = jnp.sum(logits > t_logit, axis=-1).astype(jnp.int32)
    return out


@partial(jax.jit, static_argnames=("impl", "top_k"))
def _lens_jit(model, ids, images, mask, rows, targets, *, impl, top_k):
    """ids/mask (B, T) int32; rows (B, P) int32 or None (every position); targets (B, P) int32 or None;
    top_k 0: the full logits (and the target statistics). Returns a dict of the requested outputs, layer
    axis second: (B, L+1, P, ...)."""
    lm = model.language_model
    b, t = ids.shape
    x = model.embed(ids, images, impl)  # (B, T, D)
    positions = model.positions(ids, mask, images)  # (B, T), or (3, B, T) / (B, T, R) by family
    cos, sin = model.rope_tables(positions, x.dtype, context_len=t)
    allowed = causal_allowed(mask > 0, jnp.broadcast_to(jnp.arange(t), (b, t)), t)
    out = lm.run_layers(x, cos, sin, allowed, impl=impl, capture=("residual",), capture_rows=rows)
    last = out.hidden if rows is None else out.hidden[jnp.arange(b)[:, None], rows]  # (B, P, D)
    stream = jnp.concatenate([out.captures["residual"], last[None]], axis=0)  # (L+1, B, P, D)
    n, _, p, d = stream.shape
    res = {}
    if not top_k:
        # (B, (L+1) * P, D) through the final norm and the unembedding: the big (B, L+1, P, V) array is
        # made in its final layout (only the D-wide stream is transposed)
        logits = lm.logits(jnp.transpose(stream, (1, 0, 2, 3)).reshape(b, n * p, d)).reshape(b, n, p, -1)
        res = _lens_stats(logits, None if targets is None else targets[:, None], 0)
        res["logits"] = logits
        return res
    # lean: one layer's (B, P, V) logits at a time, never the whole stack
    per_layer = jax.lax.map(lambda h: _lens_stats(lm.logits(h), targets, top_k), stream)  # (L+1, B, P, ...)
    return {k: jnp.swapaxes(v, 0, 1) for k, v in per_layer.items()}


def _check_positions(positions, mask):
    pos = np.asarray(positions)
    b, t = mask.shape
    if pos.ndim == 1 and b == 1:
        pos = pos[None]
    if pos.ndim != 2 or pos.shape[0] != b or pos.shape[1] < 1 or not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"positions must be a (B, P) integer array with B = {b} and P >= 1, got shape {pos.shape} "
                         f"dtype {pos.dtype}")
    if pos.min() < 0 or pos.max() >= t:
        raise ValueError(f"positions must lie in [0, {t}) (the sequence), got range [{pos.min()}, {pos.max()}]")
    pad = np.take_along_axis(mask, pos, axis=1) == 0
    if pad.any():
        r, c = (int(v) for v in np.argwhere(pad)[0])
        raise ValueError(f"positions row {r} holds position {int(pos[r, c])}, a padding token (attention_mask 0)")
    return pos.astype(np.int32)


def logit_lens(model, input_ids, pixel_values, attention_mask=None, *, positions=None, top_k: int | None = None,
               targets=None, logits_dtype: str = "float32", attn_impl: str = "fused", **image_kw) -> LogitLensResult:
    """The residual stream entering every decoder layer (and the last layer's output) through the final
    norm and the unembedding, any family, one jit-compiled program.

    input_ids (B, T) and pixel_values as the family's processor gives them (or None: text only);
    attention_mask (B, T) 1 = real token. image_kw: the family's image arguments (Qwen2-VL:
    image_grid_thw). Lean options (combine freely):
    - positions (B, P) int: only those sequence positions (real tokens), e.g. `last_positions(mask)`;
    - top_k: return `top_ids` / `top_logprobs` (B, L+1, P, k) instead of the logits (then None);
    - targets (B, P) int token ids: `target_logprobs` and `target_ranks` (B, L+1, P) of each column's token
      (rank = how many tokens have a larger logit; 0 = the lens's top-1);
    - logits_dtype "bfloat16" halves the returned logits.
    Returns LogitLensResult; logits (B, L+1, P, V), index l = the residual entering layer l, L = the
    model's logits. Logits at padding positions (positions=None) are computed but meaningless.
    """
    _check_impl(attn_impl)
    ids, mask = validate_inputs(model, input_ids, pixel_values, attention_mask, **image_kw)
    if logits_dtype not in LOGITS_DTYPES:
        raise ValueError(f"logits_dtype must be one of {LOGITS_DTYPES}, got {logits_dtype!r}")
    vocab = model.config.text.vocab_size
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or not 1 <= top_k <= vocab):
        raise ValueError(f"top_k must be an integer in 1..{vocab} (the vocabulary), got {top_k!r}")
    pos = None if positions is None else _check_positions(positions, mask)
    cols = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape) if pos is None else pos
    tgt = None
    if targets is not None:
        tgt = np.asarray(targets)
        if tgt.ndim == 1 and cols.shape[0] == 1:
            tgt = tgt[None]
        if tgt.shape != cols.shape or not np.issubdtype(tgt.dtype, np.integer):
            raise ValueError(f"targets must be a {cols.shape} integer array (one token per lens column), got shape "
                             f"{tgt.shape} dtype {tgt.dtype}")
        if tgt.min() < 0 or tgt.max() >= vocab:
            raise ValueError(f"targets must lie in [0, {vocab}), got range [{tgt.min()}, {tgt.max()}]")
        tgt = tgt.astype(np.int32)
    images = model.image_inputs(ids, mask, pixel_values, **image_kw)
    res = _lens_jit(model, jnp.asarray(ids), images, jnp.asarray(mask), None if pos is None else jnp.asarray(pos),
                    None if tgt is None else jnp.asarray(tgt), impl=attn_impl, top_k=int(top_k or 0))
    if "logits" in res and logits_dtype != "float32":  # cast on the device: half the bytes reach the host
        res["logits"] = res["logits"].astype(logits_dtype)
    res = jax.device_get(res)
    return LogitLensResult(positions=np.array(cols), logits=res.get("logits"), top_ids=res.get("top_ids"),
                           top_logprobs=res.get("top_logprobs"), target_ids=tgt,
                           target_logprobs=res.get("target_logprobs"), target_ranks=res.get("target_ranks"))


# --------------------------------------------------------------------------- one image and question


@dataclasses.dataclass
class LensReport:
    """The lens of one (image, question): the answer's first token at the last prompt position, and what
    every image token decodes to, per layer l in 0..L (l = L: the model's output). k = top_k."""
    answer: str  # the answer whose first token is tracked (the model's greedy answer unless given)
    answer_ids: list[int]  # its token ids (EOS dropped)
    answer_given: bool  # True: given by the caller; False: greedy
    first_token: int  # the tracked token: the answer's first (EOS when the greedy answer is empty)
    last_position: int  # the last prompt token's position, where the first answer token is predicted
    answer_rank: np.ndarray  # (L+1,) int32 the first token's rank in the lens at the last position (0 = top-1)
    answer_prob: np.ndarray  # (L+1,) float32 its probability there
    top_ids: np.ndarray  # (L+1, k) int32 the lens's top tokens at the last position
    top_probs: np.ndarray  # (L+1, k) float32 their probabilities
    image_positions: np.ndarray  # (N,) int32 the image's tokens in the sequence
    image_cells: np.ndarray  # (N,) int32 each token's flat cell r * gw + c on the grid; -1 = not spatial
    grid: tuple[int, int]  # (gh, gw) the image's own grid
    image_top_ids: np.ndarray  # (L+1, N, k) int32 each image token's top tokens
    image_top_probs: np.ndarray  # (L+1, N, k) float32
    image_answer_prob: np.ndarray  # (L+1, N) float32 the first answer token's probability at each image token
    input_ids: np.ndarray  # (T,) int32 the prompt (left-padded to the scripts' length bucket)
    attention_mask: np.ndarray  # (T,) int32

    @property
    def num_layers(self) -> int:
        return self.answer_rank.shape[0] - 1

    def word_grid(self, layer: int) -> np.ndarray:
        """(gh, gw) int32: the top-1 token of the image token at each cell at lens layer `layer` (-1 where
        no token lies)."""
        gh, gw = self.grid
        out = np.full(gh * gw, -1, np.int32)
        spatial = self.image_cells >= 0
        out[self.image_cells[spatial]] = self.image_top_ids[layer, spatial, 0]
        return out.reshape(gh, gw)


def token_word(tokenizer, tid: int) -> str:
    """A token as a short readable word: its decoded text, stripped, else its vocabulary entry."""
    try:
        text = tokenizer.decode([int(tid)]).strip()
    except Exception:  # noqa: BLE001 - a tokenizer that cannot decode this id: its vocabulary entry
        text = ""
    if not text:
        tok = tokenizer.convert_ids_to_tokens(int(tid))
        text = f"#{int(tid)}" if tok is None else str(tok).replace("\u2581", "_").replace("\u0120", "_")
    return text.replace("\n", "\\n")


def lens_report(bundle, image, question: str, answer: str | None = None, *, top_k: int = 5, max_new_tokens: int = 8,
                pad_square: bool = False) -> LensReport:
    """The logit lens of one image (a path or PIL image) and question, one jit program for the lens:
    the answer's first token (greedy unless `answer` is given) at the last prompt position, and the top
    `top_k` tokens of every image token, per layer."""
    from jaxflow.analysis._common import prepare
    from jaxflow.generate import generate
    from jaxflow.pipeline import SCRIPT_LENGTH_BUCKET, encode

    model = bundle.model
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    batch, enc = encode(bundle, [image], [question], pad_square=pad_square, with_images=True,
                        length_bucket=SCRIPT_LENGTH_BUCKET)
    ids, mask = batch.input_ids, batch.attention_mask  # (1, T)
    eos = tuple(model.config.text.eos_token_id)
    if answer is None:
        gen = generate(model, ids, enc.pixel_values, mask, max_new_tokens=max_new_tokens, **enc.image_kw)
        toks = [int(t) for t in gen.tokens[0, :gen.lengths[0]]]
        answer_ids = [t for t in toks if t not in eos]
        text = bundle.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        first = toks[0]
    else:
        answer_ids = list(bundle.tokenizer(answer, add_special_tokens=False).input_ids)
        if not answer_ids:
            raise ValueError(f"answer {answer!r} tokenises to no tokens (leave it out to follow the greedy answer)")
        text, first = answer, answer_ids[0]
    p = prepare(model, ids, enc.pixel_values, mask, **enc.image_kw)
    lay = p.layout
    n = int(lay.valid[0].sum())
    img_pos = lay.positions[0, :n]
    last = int(last_positions(mask)[0, 0])
    cols = np.concatenate([img_pos, [last]]).astype(np.int32)[None]  # (1, N + 1)
    lens = logit_lens(model, ids, enc.pixel_values, mask, positions=cols,
                      top_k=int(min(top_k, model.config.text.vocab_size)),
                      targets=np.full(cols.shape, first, np.int32), **enc.image_kw)
    probs = np.exp(lens.top_logprobs[0])  # (L+1, N + 1, k)
    return LensReport(answer=text, answer_ids=answer_ids, answer_given=answer is not None, first_token=int(first),
                      last_position=last, answer_rank=lens.target_ranks[0, :, -1],
                      answer_prob=np.exp(lens.target_logprobs[0, :, -1]), top_ids=lens.top_ids[0, :, -1],
                      top_probs=probs[:, -1], image_positions=img_pos.astype(np.int32),
                      image_cells=lay.cells[0, :n].astype(np.int32), grid=tuple(int(v) for v in lay.grids[0]),
                      image_top_ids=lens.top_ids[0, :, :n], image_top_probs=probs[:, :n],
                      image_answer_prob=np.exp(lens.target_logprobs[0, :, :n]), input_ids=ids[0].astype(np.int32),
                      attention_mask=mask[0].astype(np.int32))


def default_layers(num_layers: int, k: int = 4) -> list[int]:
    """`k` lens layers evenly spaced over 0..num_layers (both ends included)."""
    return sorted({int(round(x)) for x in np.linspace(0, num_layers, min(k, num_layers + 1))})


def lens_summary(report: LensReport, tokenizer, layers, *, words: int = 8) -> dict:
    """The JSON summary of a LensReport: per layer the answer's rank and probability and the top tokens
    at the last prompt position; per shown layer the most frequent top words of the image tokens."""
    word = lambda t: token_word(tokenizer, t)  # noqa: E731
    L = report.num_layers
    image_words = {}
    for l in layers:
        top1 = report.image_top_ids[l, report.image_cells >= 0, 0]
        u, c = np.unique(top1, return_counts=True)
        order = np.argsort(-c, kind="stable")[:words]
        image_words[str(l)] = [{"token": word(u[i]), "id": int(u[i]), "count": int(c[i])} for i in order]
    return {
        "answer": report.answer, "answer_ids": report.answer_ids, "answer_given": report.answer_given,
        "first_token": {"id": report.first_token, "token": word(report.first_token)},
        "last_position": report.last_position, "num_layers": L,
        "layers": "index l: the residual stream entering decoder layer l through the final norm and the unembedding; "
                  f"l = {L}: the last layer's output (the model's logits)",
        "answer_rank": report.answer_rank.tolist(), "answer_probability": report.answer_prob.tolist(),
        "first_layer_top1": next((int(l) for l in range(L + 1) if report.answer_rank[l] == 0), None),
        "top_tokens": [[{"token": word(t), "id": int(t), "probability": float(pr)}
                        for t, pr in zip(report.top_ids[l], report.top_probs[l])] for l in range(L + 1)],
        "image_tokens": {"grid": list(report.grid), "count": int(report.image_positions.size),
                         "spatial": int((report.image_cells >= 0).sum()), "shown_layers": list(layers),
                         "top_words": image_words},
    }


def run_logit_lens(checkpoint, image, question: str, *, out: str, mesh=None, rules: str = "tp", answer: str | None = None, top_k: int = 5,
                   layers=None, max_new_tokens: int = 8, template: str | None = None, pad_square: bool = False,
                   overwrite: bool = False, progress=None, bundle=None):
    """What scripts/logit_lens.py does: `lens_report` of one image and question, then answer_lens.png
    (the answer's first token: rank and probability per layer at the last prompt position),
    image_tokens.png (the top word of every image token on the image's grid at `layers`, default four
    evenly spaced), lens.npz and summary.json, published into `out` by `jaxflow.outputs` (a folder
    holding files jaxflow did not write is refused unless `overwrite`). Everything is checked before
    any computation; bad input raises ValueError (one line). `bundle`: an already loaded checkpoint.
    Returns (LensReport, summary dict, [paths written])."""
    import shutil

    from jaxflow.outputs import check_out_dir, publish, staging_dir
    from jaxflow.pipeline import bundle_for, check_pad_square, write_json
    from jaxflow.viz.logit_lens import answer_lens_figure, image_tokens_figure
    from jaxflow.viz.figures import save
    from jaxflow.viz.report import map_image

    t_start = time.time()

    def say(msg):
        if progress:
            progress(f"[{time.time() - t_start:6.1f}s] {msg}")

    if question is None or not str(question).strip():
        raise ValueError("--question is empty")
    if not image or not os.path.isfile(image):
        raise ValueError(f"image not found: {image}")
    if answer is not None and not answer.strip():
        raise ValueError("--answer is empty (leave it out to follow the model's greedy answer)")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {top_k}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    try:
        layers = None if layers is None else sorted({int(l) for l in layers})
    except (TypeError, ValueError) as e:
        raise ValueError(f"--layers must be integers: {e}") from e
    if layers is not None and not layers:
        raise ValueError("--layers is empty: name lens layers, or leave it out for four evenly spaced ones")
    final = check_out_dir(out, overwrite=overwrite)
    bundle = bundle_for(checkpoint, bundle, template=template, progress=say, mesh=mesh, rules=rules)
    check_pad_square(bundle, pad_square)
    L = bundle.config.text.num_layers
    if layers is not None and (layers[0] < 0 or layers[-1] > L):
        raise ValueError(f"--layers must be lens layers in 0..{L} ({L} = the last layer's output), got {layers}")
    layers = default_layers(L) if layers is None else layers
    say("greedy answer, then the lens at every layer (compiles on first use, from the cache afterwards)"
        if answer is None else "the lens at every layer (compiles on first use, from the cache afterwards)")
    report = lens_report(bundle, image, question, answer, top_k=top_k, max_new_tokens=max_new_tokens,
                         pad_square=pad_square)
    tok = bundle.tokenizer
    summary = {"model": bundle.name, "family": bundle.family, "image": os.path.abspath(image), "question": question,
               **lens_summary(report, tok, layers),
               "settings": {"top_k": top_k, "max_new_tokens": max_new_tokens, "template": bundle.template,
                            "pad_square": pad_square, "layers": layers}}
    files = ["answer_lens.png", "image_tokens.png", "lens.npz", "summary.json"]
    summary["files"] = files
    say(f"writing {', '.join(files)}")
    tmp = staging_dir(final)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; it becomes `out`
        word = lambda t: token_word(tok, t)  # noqa: E731
        save(answer_lens_figure(report, word, title=f"{bundle.name}: {question!r} -> {report.answer!r}"),
             os.path.join(tmp, "answer_lens.png"))
        save(image_tokens_figure(report, word, layers, map_image(bundle, image, pad_square=pad_square),
                                 title=f"{bundle.name}: the logit lens's top word of each image token"),
             os.path.join(tmp, "image_tokens.png"))
        np.savez(os.path.join(tmp, "lens.npz"), answer_rank=report.answer_rank, answer_prob=report.answer_prob,
                 top_ids=report.top_ids, top_probs=report.top_probs, image_positions=report.image_positions,
                 image_cells=report.image_cells, grid=np.asarray(report.grid, np.int32),
                 image_top_ids=report.image_top_ids, image_top_probs=report.image_top_probs,
                 image_answer_prob=report.image_answer_prob, input_ids=report.input_ids,
                 attention_mask=report.attention_mask, first_token=np.int32(report.first_token),
                 last_position=np.int32(report.last_position))
        write_json(os.path.join(tmp, "summary.json"), summary)
        publish(tmp, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report, summary, [os.path.join(out, f) for f in files]
