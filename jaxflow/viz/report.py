"""The analyze script as a library function: one image and question -> every figure, arrays, summary.

`run_analysis` answers (or teacher-forces a given answer), computes LLaVA-CAM for every layer and
method (plus one map per answer token), attention shares and image attention, and the saliency
flows, then writes into `out`:

    model_input.png            the image as the model sees it (LLaVA: after preprocessing; InternVL:
                               its tiles in their grid, then the thumbnail, from the pixel values)
    cam_{method}.png           per-layer CAM overlays
    cam_{method}_tokens.png    per-answer-token CAM overlays (a subset of layers)
    attention_shares.png       S / T / U shares per layer (paper Fig. 2A)
    attention_layer{K}.png     one layer's attention heat map and image attention (paper Fig. 2B)
    image_attention.png        per-layer attention to the image tokens on the grid
    flows.png                  per-layer saliency flows S->A, T->A, U->A, ... (paper Fig. 1 as data)
    arrays.npz                 every array behind the figures (maps on the image's own grid)
    summary.json               inputs, answer, spans, per-layer numbers, file list

Overlays are drawn on the original image (`map_image`): an InternVL map (its tiles' grids stitched)
covers the whole image, which was resized, not cropped, before tiling; a LLaVA map covers the region
the model input shows (the centre crop mapped back to the original's pixels; with pad_square the
padded square, its padding drawn in the padding colour). summary.json records the grid, the image
tokens (counted in the ids), the image size and that region ("map_box").

All files are written to a temporary folder next to `out` first and moved into place at the end, so
a failed run leaves nothing half-written.
"""
from __future__ import annotations

import os
import shutil
import time

import numpy as np

from jaxflow.analysis.attention import attention_analysis
from jaxflow.analysis.cam import METHODS, llava_cams
from jaxflow.analysis.flow import FLOWS, information_flow
from jaxflow.pipeline import answer as greedy_answer
from jaxflow.pipeline import (check_pad_square, encode, image_token_count, load_bundle, spans_summary,
                              write_json)

QUERIES = ("predicting", "answer")


class AnalyzeError(ValueError):
    """Bad analyze input; the message says what to fix."""


def _unnormalise(pixels: np.ndarray, spec) -> np.ndarray:
    """One preprocessed image (3, H, W) -> (H, W, 3) uint8 RGB for display."""
    mean, std = np.asarray(spec.image_mean)[:, None, None], np.asarray(spec.image_std)[:, None, None]
    return np.clip((pixels * std + mean) * 255.0, 0, 255).round().astype(np.uint8).transpose(1, 2, 0)


def _qwen2_vl_view(bundle, enc, row: int) -> np.ndarray:
    """A Qwen2-VL image as the model sees it: its patches put back at their places on the resized image
    (the first temporal copy), un-normalised -> (H, W, 3) uint8."""
    from jaxflow.data.qwen2_vl_image import patch_positions

    spec = bundle.image_spec
    t, gh, gw = (int(x) for x in np.asarray(enc.image_kw["image_grid_thw"])[row])
    p, c = spec.patch_size, 3
    patches = enc.rows([row])[:gh * gw].reshape(gh * gw, c, spec.temporal_patch_size, p, p)[:, :, 0]
    img = np.zeros((c, gh * p, gw * p), np.float32)
    for (r, col), patch in zip(patch_positions(gh, gw, spec.merge_size), patches):
        img[:, r * p:(r + 1) * p, col * p:(col + 1) * p] = patch
    return _unnormalise(img, spec)


def model_input_view(bundle, enc, row: int = 0, gap: int = 4) -> np.ndarray:
    """What the model sees of image `row` of `enc` (a `pipeline.EncodedImages`), (H, W, 3) uint8.
    LLaVA: the preprocessed image. Tiled families (InternVL): the tiles at their places in the grid,
    `gap` white pixels apart, then the thumbnail (if any) to the right, top-aligned."""
    if bundle.family in ("qwen2_vl", "qwen2_5_vl"):
        return _qwen2_vl_view(bundle, enc, row)
    tiles = enc.rows([row])  # (n, 3, S, S), or (1, 3, H, W)
    views = [_unnormalise(t, bundle.image_spec) for t in tiles]
    if bundle.family == "llava" or not enc.layouts:
        return views[0]
    lay = enc.layouts[row]
    th, tw = views[0].shape[:2]
    rows, cols = lay.rows, lay.cols
    grid_w = cols * tw + (cols - 1) * gap
    width = grid_w + (3 * gap + tw if lay.has_thumbnail else 0)
    height = rows * th + (rows - 1) * gap
    out = np.full((height, width, 3), 255, np.uint8)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        out[r * (th + gap):r * (th + gap) + th, c * (tw + gap):c * (tw + gap) + tw] = views[i]
    if lay.has_thumbnail:
        out[:th, grid_w + 3 * gap:] = views[rows * cols]
    return out


def map_image(bundle, image, *, pad_square: bool = False):
    """The original image (a path or PIL image) as a `figures.MapImage`: with the region, in its pixels,
    that the analyses' image grid covers. LLaVA: the centre crop mapped back through the resizing
    (`data.image.model_input_box`; with pad_square the padded square, drawn in the padding colour).
    InternVL (and any family that resizes the whole image into tiles): the whole image."""
    from PIL import Image

    from jaxflow.data.image import load_image, mean_background, model_input_box
    from jaxflow.viz.figures import MapImage

    pil = image if isinstance(image, Image.Image) else load_image(image)
    rgb = np.asarray(pil.convert("RGB"), np.uint8)
    if bundle.family != "llava":
        check_pad_square(bundle, pad_square)
        return MapImage(rgb)
    spec = bundle.image_spec
    fill = mean_background(spec) if pad_square else (0, 0, 0)  # expand2square's colour; the crop's zero padding
    return MapImage(rgb, model_input_box(pil.size, spec, pad_square=pad_square), tuple(int(v) for v in fill[:3]))


def _label(tokenizer, tid: int) -> str:
    tok = tokenizer.convert_ids_to_tokens(int(tid))
    return str(tok).replace("\u2581", "_").replace("\n", "\\n")


def _layer_subset(n_layers: int, k: int = 8) -> list[int]:
    if n_layers <= k:
        return list(range(n_layers))
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, k)})


def _check_inputs(image, question, methods, smooth_n, threshold, score, heads, queries, layer):
    if question is None or not str(question).strip():
        raise AnalyzeError("--question is empty")
    if not image or not os.path.isfile(image):
        raise AnalyzeError(f"image not found: {image}")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise AnalyzeError(f"unknown CAM method(s) {bad or methods}; choose from {', '.join(METHODS)}")
    if smooth_n < 0:
        raise AnalyzeError(f"--smooth_n must be >= 0, got {smooth_n}")
    if threshold is not None and not 0 <= threshold <= 1:
        raise AnalyzeError(f"--threshold must lie in [0, 1], got {threshold}")
    if score not in ("logit", "logprob"):
        raise AnalyzeError(f"--score must be logit or logprob, got {score!r}")
    if heads not in ("mean", "max"):
        raise AnalyzeError(f"--heads must be mean or max, got {heads!r}")
    if queries not in QUERIES:
        raise AnalyzeError(f"--queries must be one of {QUERIES}, got {queries!r}")
    if layer is not None and layer < 0:
        raise AnalyzeError(f"--layer must be >= 0, got {layer}")


def _load_tokenizer(checkpoint):
    from jaxflow.convert import load_tokenizer

    if checkpoint is None:
        from jaxflow.pipeline import default_checkpoint

        return load_tokenizer(default_checkpoint())
    from jaxflow.convert.checkpoint import read_marker

    read_marker(os.path.abspath(checkpoint))  # a missing or incomplete checkpoint fails here, with its reason
    return load_tokenizer(checkpoint)


def run_analysis(checkpoint, image, question, *, out, answer=None, methods=("paper", "gradcam"), smooth_n=0,
                 smooth_sigma=0.15, threshold=None, score="logit", template=None, max_new_tokens=8,
                 pad_square=False, heads="mean", queries="predicting", layer=None, max_token_maps=8, seed=0,
                 progress=print, overwrite=False) -> dict:
    """Runs every analysis on one (image, question[, answer]) and writes figures, arrays.npz and
    summary.json into `out` (`jaxflow.outputs`: a folder holding files jaxflow did not write is refused
    unless `overwrite`; an earlier run's outputs are replaced, none left stale). Returns the summary
    dict. Raises AnalyzeError on bad input."""
    from jaxflow.outputs import check_out_dir
    from jaxflow.convert import CheckpointError
    from jaxflow.viz import figures as V

    methods = tuple(methods)
    _check_inputs(image, question, methods, smooth_n, threshold, score, heads, queries, layer)
    final = check_out_dir(out, overwrite=overwrite, error=AnalyzeError)
    t_start = time.time()
    say = progress or (lambda *_: None)

    def step(msg):
        say(f"[{time.time() - t_start:6.1f}s] {msg}")

    try:  # the tokenizer first: a bad answer fails before a large model is loaded
        tok = _load_tokenizer(checkpoint)
        if answer is not None:
            answer_ids = list(tok(answer, add_special_tokens=False).input_ids)
            if not answer_ids:
                raise AnalyzeError(f"--answer {answer!r} tokenises to no tokens (leave it out to explain the "
                                   "model's greedy answer)")
        step(f"loading {'the embedded toy model' if checkpoint is None else checkpoint}")
        bundle = load_bundle(checkpoint, template=template)
        template = bundle.template
        check_pad_square(bundle, pad_square, AnalyzeError)
    except AnalyzeError:
        raise
    except (CheckpointError, ValueError, OSError) as e:
        raise AnalyzeError(str(e)) from e
    cfg = bundle.config
    L = cfg.text.num_layers
    if layer is not None and layer >= L:
        raise AnalyzeError(f"--layer {layer} is out of range: the model has {L} decoder layers (0..{L - 1})")
    tok = bundle.tokenizer
    try:
        if answer is None:
            step(f"generating the greedy answer (up to {max_new_tokens} tokens)")
            ans = greedy_answer(bundle, [image], [question], max_new_tokens=max_new_tokens, pad_square=pad_square)
            answer_ids, answer_text = ans.token_ids[0], ans.texts[0]
            if not answer_ids:
                raise AnalyzeError("the model's greedy answer is empty (it stopped at once); pass --answer")
        else:
            answer_text = answer
        batch, enc = encode(bundle, [image], [question], [answer_ids], pad_square=pad_square, with_images=True)
        frame = map_image(bundle, image, pad_square=pad_square)
    except AnalyzeError:
        raise
    except (OSError, ValueError) as e:
        raise AnalyzeError(str(e)) from e
    pixels, image_kw = enc.pixel_values, enc.image_kw
    ids, mask, amask = batch.input_ids, batch.attention_mask, batch.answer_mask
    n_image = image_token_count(ids[0], mask[0], cfg.image_token_id)
    answer_labels = [_label(tok, t) for t in answer_ids]
    step(f"answer: {answer_text!r} ({len(answer_ids)} tokens); sequence of {ids.shape[1]} tokens, "
         f"{n_image} image tokens, {L} layers")

    step(f"LLaVA-CAM ({', '.join(methods)}), all layers and per answer token"
         + (f", SmoothGrad over {smooth_n} noisy copies" if smooth_n else "") + " (compiles on first use)")
    cams = llava_cams(bundle.model, ids, pixels, amask, methods, attention_mask=mask, threshold=threshold,
                      score=score, per_token=True, smooth_n=smooth_n, smooth_sigma=smooth_sigma, seed=seed,
                      image_mean=bundle.image_spec.image_mean, image_std=bundle.image_spec.image_std, **image_kw)
    pred = np.zeros_like(amask)
    pos = np.flatnonzero(amask[0])
    pred[0, pos - 1] = True
    qmask = pred if queries == "predicting" else amask
    step(f"attention shares of the {'answer-predicting' if queries == 'predicting' else 'answer'} queries")
    att = attention_analysis(bundle.model, ids, pixels, qmask, attention_mask=mask, answer_mask=amask, heads=heads,
                             **image_kw)
    step("information-flow saliency")
    flow = information_flow(bundle.model, ids, pixels, amask, attention_mask=mask, score=score, **image_kw)
    gh, gw = (int(x) for x in cams.grids[0])  # the image's own grid (the batch's maps are padded to the largest)
    cam_maps = {m: cams.maps[m][0][..., :gh, :gw] for m in methods}  # (L, gh, gw)
    cam_raw = {m: cams.raw[m][0][..., :gh, :gw] for m in methods}
    cam_tokens = {m: cams.token_maps[m][0][..., :gh, :gw] for m in methods}  # (A, L, gh, gw)
    image_att = att.image_maps[0][..., :gh, :gw]  # (L, gh, gw)

    shares = att.shares[0]  # (L, 3)
    heat_layer = int(np.argmax(shares[:, 1])) if layer is None else int(layer)
    q_valid = att.query_mask[0]
    q_pos = att.query_positions[0][q_valid]
    q_labels = [f"{p}: {_label(tok, ids[0, p])}" for p in q_pos]
    spans = spans_summary(batch, cfg.image_token_id)[0]
    view = model_input_view(bundle, enc, 0)
    n_tok = min(len(answer_ids), max_token_maps)
    subset = _layer_subset(L)
    qa = f"Q: {' '.join(question.split())}   A: {' '.join(answer_text.split())}"
    if len(qa) > 100:
        qa = qa[:97] + "..."

    from jaxflow.outputs import publish, staging_dir

    tmp = staging_dir(final, AnalyzeError)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; it becomes `out`
        step(f"writing figures and arrays to {out}")
        files = []

        def fig_out(fig, name):
            V.save(fig, os.path.join(tmp, name))
            files.append(name)

        from PIL import Image

        Image.fromarray(view).save(os.path.join(tmp, "model_input.png"))
        files.append("model_input.png")
        smooth_note = (f", SmoothGrad n={smooth_n} σ={smooth_sigma}" if smooth_n else "") + \
            (f", threshold {threshold}" if threshold is not None else "") + (", log-prob score" if score == "logprob" else "")
        for m in methods:
            fig_out(V.layer_grid_figure(frame, cam_maps[m], title=f"LLaVA-CAM ({m}{smooth_note}) of the answer "
                                        f"score, every layer\n{qa}"), f"cam_{m}.png")
            fig_out(V.token_grid_figure(frame, cam_tokens[m][:n_tok], answer_labels[:n_tok],
                                        layers=subset, title=f"LLaVA-CAM ({m}{smooth_note}) per answer token\n{qa}"),
                    f"cam_{m}_tokens.png")
        qname = "answer-predicting" if queries == "predicting" else "answer"
        fig_out(V.shares_figure(shares, title=f"Attention of the {qname} tokens to S / T / U "
                                f"(heads {heads})\n{qa}"), "attention_shares.png")
        fig_out(V.attention_heatmap_figure(att.rows[0, heat_layer][q_valid], q_labels, spans, frame,
                                           image_att[heat_layer], layer=heat_layer,
                                           title=f"Attention of the {qname} tokens"),
                f"attention_layer{heat_layer}.png")
        fig_out(V.layer_grid_figure(frame, image_att, title=f"Attention of the {qname} tokens to the "
                                    f"image, every layer (heads {heads})\n{qa}", normalise=True,
                                    cbar_label="attention, min to max per layer"), "image_attention.png")
        fig_out(V.flows_figure({k: v[0] for k, v in flow.flows.items()},
                               title=f"Information flow (saliency |Σ_h A·∂s/∂A|) per layer\n{qa}"), "flows.png")

        arrays = {
            "input_ids": ids[0], "attention_mask": mask[0], "answer_mask": amask[0],
            "answer_ids": np.asarray(answer_ids, np.int32), "token_scores": cams.scores[0][:len(answer_ids)],
            "attention_shares": shares, "attention_query_shares": att.query_shares[0][:, q_valid],
            "attention_query_positions": q_pos, "attention_rows": att.rows[0][:, q_valid],
            "image_attention": image_att, "saliency": flow.saliency[0][:, flow.query_mask[0]],
            "saliency_query_positions": flow.query_positions[0][flow.query_mask[0]],
            "saliency_query_is_answer": flow.query_is_answer[0][flow.query_mask[0]],
        }
        for m in methods:
            arrays[f"cam_{m}"] = cam_maps[m]
            arrays[f"cam_{m}_raw"] = cam_raw[m]
            arrays[f"cam_{m}_tokens"] = cam_tokens[m][:len(answer_ids)]
        for k, v in flow.flows.items():
            arrays["flow_" + k.replace("->", "_to_")] = v[0]
        tmp_npz = os.path.join(tmp, "arrays.tmp.npz")
        np.savez_compressed(tmp_npz, **arrays)
        os.replace(tmp_npz, os.path.join(tmp, "arrays.npz"))
        files.append("arrays.npz")

        summary = {
            "model": bundle.name, "image": os.path.abspath(image), "question": question, "template": template,
            "answer": answer_text, "answer_given": answer is not None, "answer_ids": [int(t) for t in answer_ids],
            "answer_tokens": answer_labels, "token_scores": [float(x) for x in arrays["token_scores"]],
            "score": score, "methods": list(methods), "threshold": threshold, "smooth_n": int(smooth_n),
            "smooth_sigma": float(smooth_sigma) if smooth_n else None, "heads": heads, "queries": queries,
            "num_layers": L, "grid": [gh, gw], "num_image_tokens": n_image, "family": bundle.family,
            "image_size": [int(frame.image.shape[1]), int(frame.image.shape[0])],
            "map_box": [round(float(v), 4) for v in frame.map_box],
            "sequence_length": int(ids.shape[1]), "spans": spans, "heatmap_layer": heat_layer,
            "attention_shares": {g: [float(x) for x in shares[:, k]] for k, g in enumerate("STU")},
            "flows": {k: [float(x) for x in v[0]] for k, v in flow.flows.items()},
            "cam_peak": {m: [[int(i) for i in np.unravel_index(np.argmax(cam_maps[m][l]), (gh, gw))]
                             for l in range(L)] for m in methods},
            "arrays": {k: list(np.shape(v)) for k, v in arrays.items()},
            "files": sorted(files + ["summary.json"]),
            "seconds": round(time.time() - t_start, 2),
        }
        write_json(os.path.join(tmp, "summary.json"), summary)
        publish(tmp, final, overwrite=overwrite, error=AnalyzeError)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["out"] = os.path.abspath(out)
    step(f"done: {len(summary['files'])} files in {out}")
    return summary


__all__ = ["AnalyzeError", "run_analysis", "map_image", "model_input_view", "FLOWS", "QUERIES"]
