"""What scripts/knockout.py does: the attention-knockout sweep of one (image, question), its figure
(the answer's probability change against layer, one line per path, as in Zhang et al.), arrays and a
self-contained report."""
from __future__ import annotations

import os
import shutil
import time

import numpy as np

from jaxflow.analysis.knockout import KnockoutSweep, knockout_sweep, standard_paths, token_groups


def plot_knockout(sweep: KnockoutSweep, path: str, *, title: str = "", row: int = 0) -> str:
    """knockout.png: relative change (%) of the answer's probability against the window's first
    layer, one line per path, for batch row `row`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (the integer locator)

    fig, ax = plt.subplots(figsize=(7, 4))
    for p, name in enumerate(sweep.paths):
        ax.plot(sweep.starts, sweep.change[p, :, row], marker="o", ms=3, label=name)
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel(f"first layer of the knocked-out window ({sweep.window} layer{'s' if sweep.window > 1 else ''})")
    ax.set_ylabel("change of P(answer) (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_region(text: str) -> tuple[float, float, float, float]:
    """"x0,y0,x1,y1" (the image's own pixels) -> a box; ValueError (one line) when malformed."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
        raise ValueError(f"--region must be x0,y0,x1,y1 in the image's pixels with x0 < x1 and y0 < y1, got {text!r}")
    return box


def region_tokens(bundle, batch, enc, image_wh: tuple[int, int], box, *, pad_square: bool = False) -> np.ndarray:
    """(B, T) bool: the image tokens whose cell centre lies inside `box` (x0, y0, x1, y1 in the
    original image's pixels; one image per row, the same box for every row). Where no cell centre
    falls in a small box, the cells it overlaps. LLaVA: the box is carried into the cropped model
    frame; the other families' grids cover the whole image (tiles stitched back), so it is scaled.
    ValueError when the box misses the image the model sees."""
    from jaxflow.analysis.faithfulness import box_cells, image_box_cells
    from jaxflow.data.image import box_to_model_frame
    from jaxflow.models.image_layout import image_layout

    ids, mask = np.asarray(batch.input_ids), np.asarray(batch.attention_mask)
    lay = image_layout(ids, mask, bundle.config.image_token_id,
                       bundle.model.image_geometries(ids, mask, enc.pixel_values, **enc.image_kw))
    region = np.zeros(ids.shape, bool)
    for i in range(lay.positions.shape[0]):
        gh, gw = (int(x) for x in lay.grids[i])
        if bundle.family == "llava":
            mbox = box_to_model_frame(box, image_wh, bundle.image_spec, pad_square=pad_square)
            cover, centre = box_cells(mbox, bundle.image_spec.output_hw, (gh, gw))
        else:
            cover, centre = image_box_cells(box, image_wh, (gh, gw))
        inside = centre if centre.any() else cover > 0
        if not inside.any():
            raise ValueError(f"--region {tuple(box)} lies outside the image the model sees "
                             f"({image_wh[0]}x{image_wh[1]} px, after cropping): give a box inside it")
        cells = lay.cells[i]  # (N,) flat cell on the batch grid (r * GW + c), -1 = not spatial
        _, GW = lay.grid_hw
        ok = lay.valid[i] & (cells >= 0)
        r, c = np.where(ok, cells // GW, 0), np.where(ok, cells % GW, 0)
        hit = ok & (r < gh) & (c < gw) & inside[np.minimum(r, gh - 1), np.minimum(c, gw - 1)]
        region[lay.rows[i], lay.positions[i][hit]] = True
    return region


def run_knockout_report(checkpoint, image, question, *, out, mesh=None, rules="tp", window=None, template=None, pad_square=False,
                        overwrite=False, progress=None, bundle=None, region=None) -> tuple[KnockoutSweep, list[str]]:
    """The knockout sweep of one image and question with the standard paths (Image->Question,
    Image->Last, Question->Last, and Region->Last when `region` (x0, y0, x1, y1 in the image's own
    pixels, e.g. an object's box) is given) and every window of `window` layers; writes knockout.json,
    knockout.npz, knockout.png and report.html into `out` (`jaxflow.outputs` policy). Returns
    (KnockoutSweep, [paths written]). Raises ValueError (one line) on bad input."""
    from jaxflow.outputs import check_out_dir, publish, staging_dir
    from jaxflow.pipeline import bundle_for, check_pad_square, encode, write_json
    from jaxflow.viz import html_report as H

    t_start = time.time()

    def say(msg):
        if progress:
            progress(f"[{time.time() - t_start:6.1f}s] {msg}")

    if not question or not question.strip():
        raise ValueError("--question is empty")
    if os.path.isdir(image):
        raise ValueError(f"--image {image} is a folder, not an image file: pass one image file")
    if not os.path.isfile(image):
        raise ValueError(f"image not found: {image}")
    if isinstance(region, str):
        region = parse_region(region)
    final = check_out_dir(out, overwrite=overwrite)
    bundle = bundle_for(checkpoint, bundle, template=template, progress=say, mesh=mesh, rules=rules)
    check_pad_square(bundle, pad_square, ValueError)
    L = bundle.config.text.num_layers
    if window is not None and not 1 <= int(window) <= L:
        raise ValueError(f"--window must be in 1..{L} (the model has {L} decoder layers), got {window}")
    batch, enc = encode(bundle, [image], [question], pad_square=pad_square, with_images=True)
    groups = token_groups(batch.input_ids, batch.attention_mask, bundle.config.image_token_id)
    region_mask = None
    if region is not None:
        from jaxflow.data.image import load_image

        region = tuple(float(v) for v in region)
        region_mask = region_tokens(bundle, batch, enc, load_image(image).size, region, pad_square=pad_square)
        say(f"region {region}: {int(region_mask.sum())} of {int(groups['image'].sum())} image tokens")
    paths = standard_paths(groups, region=region_mask)
    say(f"knockout sweep: {len(paths)} paths x every window, one program (compiles on first use)")
    sweep = knockout_sweep(bundle.model, batch.input_ids, enc.pixel_values, batch.attention_mask, paths,
                           window=window, **enc.image_kw)
    target = int(sweep.targets[0])
    answer = bundle.tokenizer.decode([target]).strip()
    say("writing knockout.json, knockout.npz, knockout.png and report.html")
    tmp = staging_dir(final, ValueError)
    try:
        os.chmod(tmp, 0o755)
        data = {"model": bundle.name, "family": bundle.family, "image": os.path.abspath(image), "question": question,
                "answer_token": answer, "answer_token_id": target, "p_answer": float(sweep.base[0]),
                "region": None if region is None else list(region),
                "region_tokens": None if region_mask is None else int(region_mask.sum()),
                "window": sweep.window, "window_starts": sweep.starts.tolist(), "paths": sweep.paths,
                "p_knocked_out": {n: sweep.probs[i, :, 0].tolist() for i, n in enumerate(sweep.paths)},
                "change_percent": {n: sweep.change[i, :, 0].tolist() for i, n in enumerate(sweep.paths)}}
        write_json(os.path.join(tmp, "knockout.json"), data)
        np.savez(os.path.join(tmp, "knockout.npz"), probs=sweep.probs, base=sweep.base, starts=sweep.starts,
                 change=sweep.change, targets=sweep.targets, paths=np.asarray(sweep.paths))
        title = f"{bundle.name}: {question!r} -> {answer!r}"
        plot_knockout(sweep, os.path.join(tmp, "knockout.png"), title=title if len(title) < 110 else title[:107] + "...")
        header = ["first layer"] + [f"{n} (%)" for n in sweep.paths]
        rows = [[int(s)] + [float(sweep.change[p, j, 0]) for p in range(len(sweep.paths))]
                for j, s in enumerate(sweep.starts)]
        parts = [H.section("Result", H.kv_table({"answer token": answer, "P(answer), no knockout": float(sweep.base[0]),
                                                 "window": f"{sweep.window} layer(s)", "paths": ", ".join(sweep.paths)})),
                 H.section("Change of P(answer) per window", H.table(header, rows)),
                 H.figure(os.path.join(tmp, "knockout.png"), "knockout.png"),
                 H.section("Model", H.kv_table(H.model_facts(bundle, checkpoint), ("model", ""))),
                 H.section("How to read it", H.para(
                     "Each path A->B is cut in a window of consecutive layers: in those layers no query of group B "
                     "attends to a key of group A (positions unchanged). Image: the image tokens; Question: the "
                     "text after the image up to the last prompt position; Last: the last prompt position, whose "
                     "next-token distribution gives P(answer), the probability of the untruncated greedy answer's "
                     "first token. Region: the image tokens whose cell centre lies in the given box. A large drop in a "
                     "window means the answer depends on that flow there."))]
        H.write_html(os.path.join(tmp, "report.html"), H.page(f"jaxflow attention knockout: {bundle.name}", *parts,
                                                              subtitle=os.path.basename(image)))
        publish(tmp, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sweep, [os.path.join(out, f) for f in ("knockout.json", "knockout.npz", "knockout.png", "report.html")]
