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
    report.html                one self-contained page (`viz.html_report`): the figures embedded, the
                               per-layer numbers in tables, the settings, the model, the prompt as
                               tokenised (unknown tokens flagged) and why a CAM method's maps are all
                               zero where they are (`cam_zero_notes`)

Several images (`items=`: a folder or a JSON-lines file, `read_items`) run in batches; each item's files
go to `out/<index>_<image stem>/`, and one report.html (a summary table, then a section per item) and
items.json to `out`.

Overlays are drawn on the original image (`map_image`): an InternVL map (its tiles' grids stitched)
covers the whole image, which was resized, not cropped, before tiling; a LLaVA map covers the region
the model input shows (the centre crop mapped back to the original's pixels; with pad_square the
padded square, its padding drawn in the padding colour). summary.json records the grid, the image
tokens (counted in the ids), the image size and that region ("map_box").

All files are written to a temporary folder next to `out` first and moved into place at the end, so
a failed run leaves nothing half-written.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time

import numpy as np

from jaxflow.analysis.attention import attention_analysis
from jaxflow.analysis.cam import METHODS, llava_cams
from jaxflow.analysis.flow import FLOWS, information_flow
from jaxflow.pipeline import SCRIPT_LENGTH_BUCKET
from jaxflow.pipeline import answer as greedy_answer
from jaxflow.pipeline import bundle_for, check_pad_square, encode, image_token_count, spans_summary, write_json

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


# --------------------------------------------------------------------------- several images


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Item:
    """One (image, question[, answer]) of a batch run; `name` is its output sub-folder (index + image
    stem), `source` where it came from (the folder, or "file.jsonl:LINE")."""
    image: str
    question: str
    answer: str | None = None
    name: str = ""
    source: str = ""


def _safe_stem(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"
    return stem[:60]


def item_names(images) -> list[str]:
    """Sub-folder names of a batch's items: index (zero-padded) + the image's file stem, e.g. 00_cat."""
    width = max(2, len(str(max(len(images) - 1, 0))))
    return [f"{i:0{width}d}_{_safe_stem(im)}" for i, im in enumerate(images)]


def _check_readable(path: str, where: str, error) -> None:
    from PIL import Image

    if not os.path.isfile(path):
        raise error(f"{where}image not found: {path}")
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file
        msg = " ".join(str(e).split()) or type(e).__name__
        raise error(f"{where}cannot read image {path}: {msg}") from None


def read_items(images: str, question: str | None = None, *, error=ValueError) -> list[Item]:
    """The items of `--images`: a folder (every image file in it, by name, each with `question`) or a
    JSON-lines file of {"image": path, "question": text[, "answer": text]} objects (relative paths
    resolved against the file's folder; blank lines skipped). Every image is checked (exists and
    reads as an image) here, before any computation; any problem raises `error` with one line (a
    bad line is named as FILE:LINE)."""
    if images is None or not str(images).strip():
        raise error("--images is empty")
    path = os.fspath(images)
    if not os.path.exists(path):
        raise error(f"--images not found: {path}")
    items: list[Item] = []
    if os.path.isdir(path):
        if question is None or not str(question).strip():
            raise error("--question is empty")
        files = sorted(f for f in os.listdir(path) if not f.startswith(".")
                       and f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, f)))
        if not files:
            raise error(f"--images {path}: the folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        for f in files:
            full = os.path.join(path, f)
            _check_readable(full, "", error)
            items.append(Item(full, question, source=path))
    else:
        base = os.path.dirname(os.path.abspath(path))
        try:
            with open(path, encoding="utf-8") as fh:
                lines = fh.readlines()
        except (OSError, UnicodeDecodeError) as e:
            raise error(f"--images {path}: cannot read it as a JSON-lines file: {getattr(e, 'strerror', None) or e}"
                        ) from None
        for line_no, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}: "
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise error(f"{where}malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not obj["image"].strip():
                raise error(f'{where}each line must be an object with an "image" path and a "question"')
            q = obj.get("question")
            if not isinstance(q, str) or not q.strip():
                raise error(f'{where}"question" must be a non-empty string')
            ans = obj.get("answer")
            if ans is not None and (not isinstance(ans, str) or not ans.strip()):
                raise error(f'{where}"answer" must be a non-empty string when given')
            img = obj["image"] if os.path.isabs(obj["image"]) else os.path.join(base, obj["image"])
            _check_readable(img, where, error)
            items.append(Item(img, q, ans, source=f"{path}:{line_no}"))
        if not items:
            raise error(f"--images {path}: no items (an empty JSON-lines file)")
    names = item_names([it.image for it in items])
    return [dataclasses.replace(it, name=n) for it, n in zip(items, names)]


def as_items(items, question: str | None = None, *, error=ValueError) -> list[Item]:
    """`items` as a list of `Item`s: a folder or JSON-lines path (`read_items`), or a sequence of
    Items, (image, question[, answer]) tuples or {"image", "question"[, "answer"]} dicts (each image
    checked). Names are given where missing."""
    if isinstance(items, (str, os.PathLike)):
        return read_items(os.fspath(items), question, error=error)
    out = []
    for i, it in enumerate(items):
        if isinstance(it, Item):
            pass
        elif isinstance(it, dict):
            it = Item(it.get("image"), it.get("question", question), it.get("answer"), source=f"item {i}")
        else:
            it = Item(*it, source=f"item {i}")
        if not isinstance(it.image, (str, os.PathLike)):
            raise error(f"item {i}: the image must be a file path, got {type(it.image).__name__}")
        if not isinstance(it.question, str) or not it.question.strip():
            raise error(f"item {i}: the question is empty")
        _check_readable(os.fspath(it.image), f"item {i}: ", error)
        out.append(dataclasses.replace(it, image=os.fspath(it.image)))
    if not out:
        raise error("no items to analyse")
    names = item_names([it.image for it in out])
    return [it if it.name else dataclasses.replace(it, name=n) for it, n in zip(out, names)]


# --------------------------------------------------------------------------- all-zero CAM maps


def _layer_list(layers) -> str:
    """[0, 1, 2, 5] -> "layers 0-2, 5"; [3] -> "layer 3"."""
    layers = sorted(int(x) for x in layers)
    runs, start = [], None
    for i, l in enumerate(layers):
        if start is None:
            start = l
        if i + 1 == len(layers) or layers[i + 1] != l + 1:
            runs.append(str(start) if start == l else f"{start}-{l}")
            start = None
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(runs)


def zero_layers(raw_maps) -> list[int]:
    """Layers whose raw map (L, gh, gw) (before normalisation) is zero everywhere."""
    raw = np.asarray(raw_maps)
    return [int(l) for l in range(raw.shape[0]) if not (raw[l] > 0).any()]


def cam_zero_notes(cams, image: int = 0, *, skip_last: bool = True) -> list[str]:
    """Why a method's maps are all zero, from a `CamResult` (its raw maps; nothing is recomputed): one
    line per method with all-zero maps at some layer, naming another computed method that is not
    all-zero there (if any). The last layer is left out with `skip_last` (zero for every method by
    the site: its image positions reach no answer logit; docs/analysis.md)."""
    methods = list(cams.raw)
    zero = {m: zero_layers(cams.raw[m][image]) for m in methods}
    n_layers = np.asarray(cams.raw[methods[0]]).shape[1] if methods else 0
    notes = []
    for m in methods:
        layers = [l for l in zero[m] if not (skip_last and l == n_layers - 1)]
        if not layers:
            continue
        msg = (f"method {m} gives all-zero maps at {_layer_list(layers)}: every image token's weighted channel "
               "sum is negative there, and the ReLU removes it")
        others = [o for o in methods if o != m]
        full = [o for o in others if not set(layers) & set(zero[o])]
        if full:
            msg += f"; {full[0]} is not all-zero at {'that layer' if len(layers) == 1 else 'those layers'}"
        else:
            part = [(o, [l for l in layers if l not in zero[o]]) for o in others]
            part = [p for p in part if p[1]]
            if part:
                o, ls = max(part, key=lambda p: len(p[1]))
                msg += f"; {o} is not all-zero at {_layer_list(ls)}"
            else:
                missing = [x for x in METHODS if x not in methods]
                msg += ("; no other method computed here is non-zero there" if others else "")
                if missing:
                    msg += f" (try --methods {','.join([m] + missing)})"
        notes.append(msg)
    return notes


# --------------------------------------------------------------------------- the analysis


def _check_inputs(image, question, methods, smooth_n, threshold, score, heads, queries, layer, batch_size=1, *,
                  single=True):
    if single:
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
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise AnalyzeError(f"--batch_size must be >= 1, got {batch_size}")


def _load_tokenizer(checkpoint):
    from jaxflow.convert import load_tokenizer

    if checkpoint is None:
        from jaxflow.pipeline import default_checkpoint

        return load_tokenizer(default_checkpoint())
    from jaxflow.convert.checkpoint import read_marker

    read_marker(os.path.abspath(checkpoint))  # a missing or incomplete checkpoint fails here, with its reason
    return load_tokenizer(checkpoint)


def _answer_ids(tok, text: str, where: str = "") -> list[int]:
    ids = list(tok(text, add_special_tokens=False).input_ids)
    if not ids:
        raise AnalyzeError(f"{where}--answer {text!r} tokenises to no tokens (leave it out to explain the "
                           "model's greedy answer)")
    return ids


def run_analysis(checkpoint, image, question, *, out, mesh=None, rules="tp", answer=None, methods=("paper", "gradcam"), smooth_n=0,
                 smooth_sigma=0.15, threshold=None, score="logit", template=None, max_new_tokens=8,
                 pad_square=False, heads="mean", queries="predicting", layer=None, max_token_maps=8, seed=0,
                 progress=print, overwrite=False, items=None, batch_size=8, bundle=None) -> dict:
    """Runs every analysis on one (image, question[, answer]) and writes figures, arrays.npz,
    summary.json and report.html into `out` (`jaxflow.outputs`: a folder holding files jaxflow did not
    write is refused unless `overwrite`; an earlier run's outputs are replaced, none left stale).
    Returns the summary dict. Raises AnalyzeError on bad input.

    Several images: pass `items` (with image=None): a folder or JSON-lines path (`read_items`; a
    folder's images all get `question`) or a sequence of `Item`s / (image, question[, answer]) tuples.
    They run in batches of `batch_size`; each item's files go to `out/<index>_<image stem>/`, with one
    report.html (a summary table, then one section per item) and items.json at the top of `out`.
    Every input is checked before any computation. Returns {"items": [each item's summary],
    "files": [top-level entries], "out": ..., "report": path of report.html}. An item's "answer" (or
    `answer`, for every item) is explained instead of the greedy answer."""
    from jaxflow.outputs import check_out_dir
    from jaxflow.convert import CheckpointError

    methods = tuple(methods)
    multi = items is not None
    if multi and image is not None:
        raise AnalyzeError("--image and --images are mutually exclusive: pass one")
    _check_inputs(image, question, methods, smooth_n, threshold, score, heads, queries, layer, batch_size,
                  single=not multi)
    if multi:
        item_list = as_items(items, question, error=AnalyzeError)
    else:
        item_list = [Item(image, question, answer, name="", source="--image")]
    final = check_out_dir(out, overwrite=overwrite, error=AnalyzeError)
    t_start = time.time()
    say = progress or (lambda *_: None)

    def step(msg):
        say(f"[{time.time() - t_start:6.1f}s] {msg}")

    try:  # the tokenizer first: a bad answer fails before a large model is loaded
        tok = _load_tokenizer(checkpoint)
        given = {}
        for it in item_list:
            text = it.answer if it.answer is not None else answer
            if text is not None:
                given[it.name] = (text, _answer_ids(tok, text, f"{it.source}: " if multi else ""))
        bundle = bundle_for(checkpoint, bundle, template=template, progress=step, mesh=mesh, rules=rules)
        template = bundle.template
        check_pad_square(bundle, pad_square, AnalyzeError)
    except AnalyzeError:
        raise
    except (CheckpointError, ValueError, OSError) as e:
        raise AnalyzeError(str(e)) from e
    L = bundle.config.text.num_layers
    if layer is not None and layer >= L:
        raise AnalyzeError(f"--layer {layer} is out of range: the model has {L} decoder layers (0..{L - 1})")
    opts = dict(methods=methods, smooth_n=smooth_n, smooth_sigma=smooth_sigma, threshold=threshold, score=score,
                max_new_tokens=max_new_tokens, pad_square=pad_square, heads=heads, queries=queries, layer=layer,
                max_token_maps=max_token_maps, seed=seed)
    settings = {"methods": list(methods), "answer": answer if answer is not None else "the model's greedy answer",
                "max_new_tokens": max_new_tokens, "score": score, "heads": heads, "queries": queries,
                "heat-map layer": layer if layer is not None else "the largest image share",
                "threshold": threshold, "smooth_n": smooth_n, "smooth_sigma": smooth_sigma if smooth_n else None,
                "seed": seed, "template": template, "pad_square": pad_square, "max_token_maps": max_token_maps}
    if multi:
        settings = {"images": os.fspath(items) if isinstance(items, (str, os.PathLike)) else f"{len(item_list)} items",
                    "question": question, "items": len(item_list), "batch_size": batch_size, **settings}
    settings.update(out=os.path.abspath(out), overwrite=overwrite)

    from jaxflow.outputs import publish, staging_dir
    from jaxflow.viz import html_report as H

    tmp = staging_dir(final, AnalyzeError)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; it becomes `out`
        summaries, sections = [], []
        for start in range(0, len(item_list), batch_size):
            chunk = item_list[start:start + batch_size]
            if multi:
                step(f"items {start}..{start + len(chunk) - 1} of {len(item_list)}")
            rows = _compute(bundle, chunk, given, opts, step)
            for it, row in zip(chunk, rows):
                folder = os.path.join(tmp, it.name) if multi else tmp
                os.makedirs(folder, exist_ok=True)
                for msg in row["zero_notes"]:
                    say(f"note: {it.name + ': ' if multi else ''}{msg}")
                s, sec = _write_item(bundle, it, row, folder, opts, step, multi=multi,
                                     anchor=f"item-{it.name}" if multi else "result")
                s["out"] = os.path.abspath(os.path.join(out, it.name) if multi else out)
                summaries.append(s)
                sections.append(sec)
        step(f"writing report.html to {out}")
        subtitle = (f"{len(item_list)} items" if multi else f"{os.path.basename(image)}") + \
            f", {time.strftime('%Y-%m-%d %H:%M:%S')}, {time.time() - t_start:.1f} s"
        parts = [H.section("Model", H.kv_table(H.model_facts(bundle, checkpoint), ("model", ""))),
                 H.section("Settings", H.kv_table(settings))]
        if multi:
            parts.append(H.section("Summary", _summary_table(summaries, item_list)))
        parts += sections
        H.write_html(os.path.join(tmp, "report.html"),
                     H.page(f"jaxflow analyze: {bundle.name}", *parts, subtitle=subtitle))
        if multi:
            write_json(os.path.join(tmp, "items.json"),
                       {"model": bundle.name, "items": [{"index": i, "folder": it.name, "image": os.path.abspath(it.image),
                                                         "question": it.question, "answer": s["answer"],
                                                         "source": it.source}
                                                        for i, (it, s) in enumerate(zip(item_list, summaries))]})
        else:
            s = summaries[0]
            s["files"] = sorted(s["files"] + ["report.html"])
            s["seconds"] = round(time.time() - t_start, 2)
            write_json(os.path.join(tmp, "summary.json"), {k: v for k, v in s.items() if k != "out"})
        entries = publish(tmp, final, overwrite=overwrite, error=AnalyzeError)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not multi:
        step(f"done: {len(summaries[0]['files'])} files in {out}")
        return summaries[0]
    step(f"done: {len(item_list)} items in {out}")
    return {"items": summaries, "files": entries, "out": os.path.abspath(out),
            "report": os.path.join(os.path.abspath(out), "report.html")}


def _compute(bundle, chunk, given, opts, step) -> list[dict]:
    """Every analysis of a batch of items at once; returns per item (row) its arrays and numbers, on
    its own grid, padding removed (positions count from the row's first real token)."""
    cfg = bundle.config
    L = cfg.text.num_layers
    methods, pad_square = opts["methods"], opts["pad_square"]
    images = [it.image for it in chunk]
    questions = [it.question for it in chunk]
    answer_ids, answer_texts = [None] * len(chunk), [None] * len(chunk)
    for j, it in enumerate(chunk):
        if it.name in given:
            answer_texts[j], answer_ids[j] = given[it.name]
    try:
        todo = [j for j, a in enumerate(answer_ids) if a is None]
        if todo:
            step(f"generating the greedy answer{'s' if len(todo) > 1 else ''} (up to {opts['max_new_tokens']} tokens)")
            ans = greedy_answer(bundle, [images[j] for j in todo], [questions[j] for j in todo],
                                max_new_tokens=opts["max_new_tokens"], pad_square=pad_square,
                                length_bucket=SCRIPT_LENGTH_BUCKET)
            for j, ids, text in zip(todo, ans.token_ids, ans.texts):
                if not ids:
                    where = f"item {chunk[j].name}: " if chunk[j].name else ""
                    raise AnalyzeError(f"{where}the model's greedy answer is empty (it stopped at once); pass --answer")
                answer_ids[j], answer_texts[j] = ids, text
        batch, enc = encode(bundle, images, questions, answer_ids, pad_square=pad_square, with_images=True,
                            length_bucket=SCRIPT_LENGTH_BUCKET)  # similar lengths share compiled programs
        frames = [map_image(bundle, im, pad_square=pad_square) for im in images]
    except AnalyzeError:
        raise
    except (OSError, ValueError) as e:
        raise AnalyzeError(str(e)) from e
    pixels, image_kw = enc.pixel_values, enc.image_kw
    ids, mask, amask = batch.input_ids, batch.attention_mask, batch.answer_mask
    n_rows = len(chunk)
    step(f"{'answer' if n_rows == 1 else f'{n_rows} answers'}: "
         + "; ".join(f"{t!r} ({len(a)} tokens)" for t, a in zip(answer_texts, answer_ids))
         + f"; sequence of {ids.shape[1]} tokens, {L} layers")
    smooth_n = opts["smooth_n"]
    step(f"LLaVA-CAM ({', '.join(methods)}), all layers and per answer token"
         + (f", SmoothGrad over {smooth_n} noisy copies" if smooth_n else "") + " (compiles on first use)")
    cams = llava_cams(bundle.model, ids, pixels, amask, methods, attention_mask=mask, threshold=opts["threshold"],
                      score=opts["score"], per_token=True, smooth_n=smooth_n, smooth_sigma=opts["smooth_sigma"],
                      seed=opts["seed"], image_mean=bundle.image_spec.image_mean,
                      image_std=bundle.image_spec.image_std, **image_kw)
    pred = np.zeros_like(amask)
    for b in range(n_rows):
        pos = np.flatnonzero(amask[b])
        pred[b, pos - 1] = True
    queries = opts["queries"]
    qmask = pred if queries == "predicting" else amask
    step(f"attention shares of the {'answer-predicting' if queries == 'predicting' else 'answer'} queries")
    att = attention_analysis(bundle.model, ids, pixels, qmask, attention_mask=mask, answer_mask=amask,
                             heads=opts["heads"], **image_kw)
    step("information-flow saliency")
    flow = information_flow(bundle.model, ids, pixels, amask, attention_mask=mask, score=opts["score"], **image_kw)
    spans_all = spans_summary(batch, cfg.image_token_id)
    image_rows = (np.arange(n_rows) if cams.image_rows is None else np.asarray(cams.image_rows))
    out = []
    for b in range(n_rows):
        i = int(np.flatnonzero(image_rows == b)[0])  # the row's (first) image
        real = np.flatnonzero(mask[b] > 0)
        off = int(real[0]) if real.size and real[-1] - real[0] + 1 == real.size else 0  # left padding to drop
        gh, gw = (int(x) for x in cams.grids[i])  # the image's own grid (the batch's maps are padded to the largest)
        q_valid = att.query_mask[b]
        f_valid = flow.query_mask[b]
        n_ans = len(answer_ids[b])
        arrays = {
            "input_ids": ids[b, off:], "attention_mask": mask[b, off:], "answer_mask": amask[b, off:],
            "answer_ids": np.asarray(answer_ids[b], np.int32), "token_scores": cams.scores[b][:n_ans],
            "attention_shares": att.shares[b], "attention_query_shares": att.query_shares[b][:, q_valid],
            "attention_query_positions": att.query_positions[b][q_valid] - off,
            "attention_rows": att.rows[b][:, q_valid][..., off:],
            "image_attention": att.image_maps[i][..., :gh, :gw],
            "saliency": flow.saliency[b][:, f_valid][..., off:],
            "saliency_query_positions": flow.query_positions[b][f_valid] - off,
            "saliency_query_is_answer": flow.query_is_answer[b][f_valid],
        }
        for m in methods:
            arrays[f"cam_{m}"] = cams.maps[m][i][..., :gh, :gw]  # (L, gh, gw)
            arrays[f"cam_{m}_raw"] = cams.raw[m][i][..., :gh, :gw]
            arrays[f"cam_{m}_tokens"] = cams.token_maps[m][i][..., :gh, :gw][:n_ans]  # (A, L, gh, gw)
        for k, v in flow.flows.items():
            arrays["flow_" + k.replace("->", "_to_")] = v[b]
        spans = {g: (None if r is None else [r[0] - off, r[1] - off]) for g, r in spans_all[b].items()}
        out.append({
            "arrays": arrays, "answer_text": answer_texts[b], "answer_ids": answer_ids[b],
            "answer_given": chunk[b].name in given, "grid": (gh, gw), "spans": spans, "frame": frames[b],
            "view": model_input_view(bundle, enc, b), "flows": {k: v[b] for k, v in flow.flows.items()},
            "n_image": image_token_count(ids[b], mask[b], cfg.image_token_id),
            "zero_notes": cam_zero_notes(cams, i),
        })
    return out


def _write_item(bundle, it, row, folder, opts, step, *, multi: bool, anchor: str):
    """One item's figures, arrays.npz and (with several items) summary.json in `folder`; returns its
    summary dict and its report section."""
    from PIL import Image

    from jaxflow.viz import figures as V
    from jaxflow.viz import html_report as H

    methods, L = opts["methods"], bundle.config.text.num_layers
    tok = bundle.tokenizer
    a = row["arrays"]
    gh, gw = row["grid"]
    frame, spans = row["frame"], row["spans"]
    answer_ids, answer_text, question = row["answer_ids"], row["answer_text"], it.question
    shares = a["attention_shares"]
    layer = opts["layer"]
    heat_layer = int(np.argmax(shares[:, 1])) if layer is None else int(layer)
    q_pos = a["attention_query_positions"]
    ids = a["input_ids"]
    q_labels = [f"{p}: {_label(tok, ids[p])}" for p in q_pos]
    answer_labels = [_label(tok, t) for t in answer_ids]
    n_tok = min(len(answer_ids), opts["max_token_maps"])
    subset = _layer_subset(L)
    qa = f"Q: {' '.join(question.split())}   A: {' '.join(answer_text.split())}"
    if len(qa) > 100:
        qa = qa[:97] + "..."
    smooth_n, smooth_sigma, threshold, score = opts["smooth_n"], opts["smooth_sigma"], opts["threshold"], opts["score"]
    heads, queries = opts["heads"], opts["queries"]
    step(f"writing figures and arrays{' of ' + it.name if multi else ''}")
    files, captions = [], {}

    def fig_out(fig, name, caption):
        V.save(fig, os.path.join(folder, name))
        files.append(name)
        captions[name] = caption

    Image.fromarray(row["view"]).save(os.path.join(folder, "model_input.png"))
    files.append("model_input.png")
    captions["model_input.png"] = "what the model sees (un-normalised model input)"
    smooth_note = (f", SmoothGrad n={smooth_n} σ={smooth_sigma}" if smooth_n else "") + \
        (f", threshold {threshold}" if threshold is not None else "") + (", log-prob score" if score == "logprob" else "")
    for m in methods:
        fig_out(V.layer_grid_figure(frame, a[f"cam_{m}"], title=f"LLaVA-CAM ({m}{smooth_note}) of the answer "
                                    f"score, every layer\n{qa}"), f"cam_{m}.png", f"LLaVA-CAM ({m}), every layer")
        fig_out(V.token_grid_figure(frame, a[f"cam_{m}_tokens"][:n_tok], answer_labels[:n_tok],
                                    layers=subset, title=f"LLaVA-CAM ({m}{smooth_note}) per answer token\n{qa}"),
                f"cam_{m}_tokens.png", f"LLaVA-CAM ({m}) per answer token")
    qname = "answer-predicting" if queries == "predicting" else "answer"
    fig_out(V.shares_figure(shares, title=f"Attention of the {qname} tokens to S / T / U "
                            f"(heads {heads})\n{qa}"), "attention_shares.png", "attention shares S / T / U per layer")
    fig_out(V.attention_heatmap_figure(a["attention_rows"][heat_layer], q_labels, spans, frame,
                                       a["image_attention"][heat_layer], layer=heat_layer,
                                       title=f"Attention of the {qname} tokens"),
            f"attention_layer{heat_layer}.png", f"layer {heat_layer}: attention over every key, and to the image")
    fig_out(V.layer_grid_figure(frame, a["image_attention"], title=f"Attention of the {qname} tokens to the "
                                f"image, every layer (heads {heads})\n{qa}", normalise=True,
                                cbar_label="attention, min to max per layer"), "image_attention.png",
            "attention to the image tokens, every layer")
    fig_out(V.flows_figure(row["flows"], title=f"Information flow (saliency |Σ_h A·∂s/∂A|) per layer\n{qa}"),
            "flows.png", "information flow per layer")
    tmp_npz = os.path.join(folder, "arrays.tmp.npz")
    np.savez_compressed(tmp_npz, **a)
    os.replace(tmp_npz, os.path.join(folder, "arrays.npz"))
    files.append("arrays.npz")

    cam_peak = {m: [[int(i) for i in np.unravel_index(np.argmax(a[f"cam_{m}"][l]), (gh, gw))] for l in range(L)]
                for m in methods}
    summary = {
        "model": bundle.name, "image": os.path.abspath(it.image), "question": question, "template": bundle.template,
        "answer": answer_text, "answer_given": row["answer_given"], "answer_ids": [int(t) for t in answer_ids],
        "answer_tokens": answer_labels, "token_scores": [float(x) for x in a["token_scores"]],
        "score": score, "methods": list(methods), "threshold": threshold, "smooth_n": int(smooth_n),
        "smooth_sigma": float(smooth_sigma) if smooth_n else None, "heads": heads, "queries": queries,
        "num_layers": L, "grid": [gh, gw], "num_image_tokens": row["n_image"], "family": bundle.family,
        "image_size": [int(frame.image.shape[1]), int(frame.image.shape[0])],
        "map_box": [round(float(v), 4) for v in frame.map_box],
        "sequence_length": int(ids.shape[0]), "spans": spans, "heatmap_layer": heat_layer,
        "attention_shares": {g: [float(x) for x in shares[:, k]] for k, g in enumerate("STU")},
        "flows": {k: [float(x) for x in v] for k, v in row["flows"].items()},
        "cam_peak": cam_peak,
        "cam_zero_layers": {m: zero_layers(a[f"cam_{m}_raw"]) for m in methods},
        "cam_notes": row["zero_notes"],
        "arrays": {k: list(np.shape(v)) for k, v in a.items()},
        "files": sorted(files + ["summary.json"]),
    }
    if multi:
        write_json(os.path.join(folder, "summary.json"), {k: v for k, v in summary.items() if k != "out"})

    # the report's section
    zero = summary["cam_zero_layers"]
    header = ["layer", "share S", "share T", "share U", "flow S→A", "flow T→A", "flow U→A"]
    header += [f"CAM {m} peak (row, col)" for m in methods]
    rows, hl = [], []
    for l in range(L):
        r = [l, *[float(x) for x in shares[l]], *(float(row["flows"][k][l]) for k in ("S->A", "T->A", "U->A"))]
        for m in methods:
            if l in zero[m]:
                r.append("all zero (last layer)" if l == L - 1 else "all zero")
            else:
                r.append(f"({cam_peak[m][l][0]}, {cam_peak[m][l][1]})")
        rows.append(r)
        if l == heat_layer:
            hl.append(l)
    tok_rows = [(j, lab, int(t), float(sc)) for j, (lab, t, sc) in
                enumerate(zip(answer_labels, answer_ids, a["token_scores"]))]
    facts = {"image": os.path.abspath(it.image), "question": question,
             "answer": f"{answer_text} ({'given' if row['answer_given'] else 'greedy'}, {len(answer_ids)} tokens)",
             "sequence": f"{int(ids.shape[0])} tokens, {row['n_image']} image tokens, grid {gh} x {gw}",
             "image size": f"{summary['image_size'][0]} x {summary['image_size'][1]} px; the maps cover the box "
                           f"{summary['map_box']}",
             "heat-map layer": heat_layer}
    if multi:
        facts["files"] = f"{it.name}/ ({', '.join(summary['files'])})"
    notes = [H.note(n) for n in row["zero_notes"]]
    prompt = H.prompt_html(tok, ids, image_token_id=bundle.config.image_token_id, attention_mask=a["attention_mask"],
                           answer_mask=a["answer_mask"],
                           texts=[question] + ([answer_text] if row["answer_given"] else []))
    figs = [H.figure(os.path.join(folder, f), f"{f}: {captions[f]}") for f in files if f.endswith(".png")]
    title = f"{it.name}: {os.path.basename(it.image)}" if multi else "Result"
    sec = H.section(title, H.kv_table(facts, ("item", "")), *notes,
                    H.section("Prompt as tokenised", prompt, level=3),
                    H.section("Per layer", H.table(header, rows, highlight=hl),
                              H.para(f"Shares: attention of the {qname} queries to S (system), T (image), U (user); "
                                     "flows: saliency |Σ_h A·∂s/∂A| into the answer. The highlighted row is the "
                                     "heat-map layer. The last layer's maps are zero for every method: its image "
                                     "positions reach no answer logit."), level=3),
                    H.section("Answer tokens", H.table(("#", "token", "id", "score (logit)" if score == "logit"
                                                        else "score (log-prob)"), tok_rows, left=(1,)), level=3),
                    H.section("Figures", *figs, level=3), anchor=anchor)
    return summary, sec


def _summary_table(summaries, items):
    from jaxflow.viz import html_report as H

    rows = []
    for it, s in zip(items, summaries):
        t = s["attention_shares"]["T"]
        fl = s["flows"]["T->A"]
        rows.append((H.link(it.name, f"item-{it.name}"), os.path.basename(it.image), it.question, s["answer"],
                     int(np.argmax(t)), float(max(t)), int(np.argmax(fl)),
                     "; ".join(f"{m}: all zero at {_layer_list(ls)}" for m, ls in
                               ((m, [l for l in z if l != s["num_layers"] - 1]) for m, z in s["cam_zero_layers"].items())
                               if ls) or "\u2013"))
    return H.table(("item", "image", "question", "answer", "layer of max T share", "max T share",
                    "layer of max T→A flow", "CAM maps all zero (last layer aside)"), rows, left=(0, 1, 2, 3, 7))


__all__ = ["AnalyzeError", "run_analysis", "map_image", "model_input_view", "FLOWS", "QUERIES", "Item",
           "read_items", "as_items", "item_names", "cam_zero_notes", "zero_layers", "IMAGE_EXTENSIONS"]
