"""The demo as a library function: answer one question about one image and describe the tokens.

Works on every model family. model_input.png is what the model sees (`viz.report.model_input_view`:
LLaVA's preprocessed image; InternVL's tiles in their grid and the thumbnail); the analyses' overlays
are drawn on the original image (`viz.report.map_image`). summary.json's "grid" and
"num_image_tokens" are the image's own (from its tokens), not a per-model constant."""
from __future__ import annotations

import os
import shutil

import numpy as np
from PIL import Image

from jaxflow.pipeline import SCRIPT_LENGTH_BUCKET, answer, encode, load_bundle, spans_summary, write_json


class DemoError(ValueError):
    """Bad demo input; the message says what to fix."""


def model_view(pixels: np.ndarray, spec) -> Image.Image:
    """Un-normalises one preprocessed image (3, H, W) (LLaVA's image, one InternVL tile) back to RGB for
    display."""
    mean, std = np.asarray(spec.image_mean)[:, None, None], np.asarray(spec.image_std)[:, None, None]
    rgb = np.clip((pixels * std + mean) * 255.0, 0, 255).round().astype(np.uint8)
    return Image.fromarray(rgb.transpose(1, 2, 0))


def run_demo(checkpoint, image, question, *, out, mesh=None, rules="tp", template=None, max_new_tokens=16, pad_square=False,
             analyses=True, progress=print, overwrite=False):
    """Greedy answer + S/T/U/A spans (summary.json, model_input.png in `out`); with `analyses`, also
    every instrument (LLaVA-CAM, attention shares, flows: `out/analysis`), the truncation sweep
    (`out/truncation`), attention knockout (`out/knockout`) and the logit lens (`out/logit_lens`). `out` follows `jaxflow.outputs`: a folder holding files jaxflow did not write
    is refused unless `overwrite`, and even then only jaxflow's own outputs are replaced."""
    from jaxflow.outputs import check_out_dir
    from jaxflow.convert import CheckpointError
    from jaxflow.pipeline import check_pad_square

    if not question or not question.strip():
        raise DemoError("--question is empty")
    final = check_out_dir(out, overwrite=overwrite, error=DemoError)
    if os.path.isdir(image):
        raise DemoError(f"--image {image} is a folder, not an image file: pass one image file")
    if not os.path.isfile(image):
        raise DemoError(f"image not found: {image}")
    try:
        bundle = load_bundle(checkpoint, template=template, mesh=mesh, rules=rules)
        check_pad_square(bundle, pad_square, DemoError)
    except DemoError:
        raise
    except (CheckpointError, ValueError, OSError) as e:
        raise DemoError(str(e)) from e
    template = bundle.template
    try:
        ans = answer(bundle, [image], [question], max_new_tokens=max_new_tokens, pad_square=pad_square,
                     length_bucket=SCRIPT_LENGTH_BUCKET)  # the analyses' bucket: one generate program for both
    except (OSError, ValueError) as e:
        raise DemoError(str(e)) from e
    text, ids = ans.texts[0], ans.token_ids[0]
    batch, enc = encode(bundle, [image], [question], [ids] if ids else None, pad_square=pad_square,
                        with_images=True)
    spans = spans_summary(batch, bundle.config.image_token_id)
    from jaxflow.outputs import staging_dir

    out = staging_dir(final, DemoError)
    try:
        return _write_demo(out, final, bundle, image, question, template, text, ids, batch, enc, spans,
                           checkpoint, max_new_tokens, pad_square, analyses, progress, overwrite)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def image_grid(bundle, batch, enc, row: int = 0) -> tuple[int, int]:
    """(gh, gw) of row `row`'s image grid, as the analyses place its maps (the model's own geometry of
    the image's tokens: LLaVA's patch grid, InternVL's stitched tile grids)."""
    from jaxflow.models.image_layout import image_layout

    geoms = bundle.model.image_geometries(batch.input_ids, batch.attention_mask, enc.pixel_values, **enc.image_kw)
    lay = image_layout(batch.input_ids, batch.attention_mask, bundle.config.image_token_id, geoms)
    return int(lay.grids[row, 0]), int(lay.grids[row, 1])


def _write_demo(out, final, bundle, image, question, template, text, ids, batch, enc, spans, checkpoint,
                max_new_tokens, pad_square, analyses, progress, overwrite):
    from jaxflow.pipeline import image_token_count
    from jaxflow.viz.report import model_input_view

    Image.fromarray(model_input_view(bundle, enc, 0)).save(os.path.join(out, "model_input.png"))
    result = {
        "model": bundle.name, "family": bundle.family, "image": os.path.abspath(image), "question": question,
        "template": template, "answer": text, "answer_ids": ids, "input_ids": batch.input_ids[0].tolist(),
        "spans": spans,
        "num_image_tokens": image_token_count(batch.input_ids[0], batch.attention_mask[0],
                                              bundle.config.image_token_id),
        "grid": list(image_grid(bundle, batch, enc, 0)),
        "out": final,
    }
    if enc.layouts and bundle.family == "internvl":  # a tiled image: its tile grid and whether a thumbnail follows
        lay = enc.layouts[0]
        result["tiles"] = {"rows": lay.rows, "cols": lay.cols, "thumbnail": bool(lay.has_thumbnail)}
    if analyses:
        from jaxflow.analysis.sweep_report import run_sweep_report
        from jaxflow.viz.report import AnalyzeError, run_analysis

        try:
            run_analysis(checkpoint, image, question, out=os.path.join(out, "analysis"), template=template,
                         max_new_tokens=max_new_tokens, pad_square=pad_square, progress=progress, bundle=bundle)
            if progress:
                progress("truncation sweep: every cut layer K in one program, then each K's answer "
                         "(compiles on first use, from the cache afterwards)")
            report, _ = run_sweep_report(checkpoint, image, question, out=os.path.join(out, "truncation"),
                                         template=template, max_new_tokens=max_new_tokens, pad_square=pad_square,
                                         bundle=bundle)
            from jaxflow.analysis.knockout_report import run_knockout_report
            from jaxflow.analysis.logit_lens import run_logit_lens

            if progress:
                progress("attention knockout: Image->Question, Image->Last, Question->Last in every window of layers")
            ko, _ = run_knockout_report(checkpoint, image, question, out=os.path.join(out, "knockout"),
                                        template=template, pad_square=pad_square, bundle=bundle)
            if progress:
                progress("logit lens: what every layer's residual already predicts")
            lens, _, _ = run_logit_lens(checkpoint, image, question, out=os.path.join(out, "logit_lens"),
                                        template=template, pad_square=pad_square, bundle=bundle,
                                        max_new_tokens=max_new_tokens)
        except (AnalyzeError, ValueError) as e:
            raise DemoError(str(e)) from e
        result["knockout"] = {"out": os.path.join(result["out"], "knockout"), "window": ko.window,
                              "window_starts": ko.starts.tolist(),
                              "change_percent": {n: ko.change[i, :, 0].round(2).tolist()
                                                 for i, n in enumerate(ko.paths)}}
        result["logit_lens"] = {"out": os.path.join(result["out"], "logit_lens")}
        result["analysis"] = os.path.join(result["out"], "analysis")
        result["truncation"] = {"out": os.path.join(result["out"], "truncation"), "cliff_layer": report.cliff,
                                "answers": dict(zip(map(int, report.layers), report.answers))}
    write_json(os.path.join(out, "summary.json"), result)
    from jaxflow.outputs import publish

    publish(out, final, overwrite=overwrite, error=DemoError)
    return result
