"""Do the heat maps point at what the answer is about? The pointing game and the energy-in-box share
of LLaVA-CAM maps, per layer and per method, against boxes of the asked object.

Geometry. A box is given in the original image's pixels. LLaVA: `box_to_model_frame` carries it
through the same padding, resizing and cropping the image went through, onto the preprocessed image,
which the vision tower cuts into a (grid_h, grid_w) grid of square cells (14 px for CLIP ViT-L/14)
(`box_cells`). InternVL: the image is resized whole (no crop, no padding) before it is cut into tiles,
so the stitched grid of the tiles' tokens covers the original image exactly, and the box is placed on
it by scaling alone (`image_box_cells`). Each sample is scored on its own image's grid.

- pointing game: a sample is a hit at layer l when the centre of the cell holding its map's maximum
  (the first one in row-major order if several cells tie) lies inside the box; an all-zero map (no
  maximum) is a miss. Chance: a cell drawn uniformly at random hits with probability (cells whose
  centre lies in the box) / (all cells), about the box's share of the image area.
- energy in box: sum over cells of map * (share of the cell's area inside the box), divided by the
  map's sum (0 for an all-zero map). Scale-free, so computed on the un-thresholded maps. Chance: a
  uniform map scores the box's share of the image area.

`faithfulness` averages both over samples; `FaithfulnessResult.table()` prints them per layer.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxflow.analysis.cam import METHODS


@dataclasses.dataclass(frozen=True)
class BoxSample:
    """An image, a question about one object, the object's box (x0, y0, x1, y1 in the image's own
    pixels, x1/y1 exclusive) and optionally the answer to explain (None: the model's greedy answer)."""
    image: object  # a path or a PIL image
    question: str
    box: tuple[float, float, float, float]
    answer: str | None = None


def box_cells(box, image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A box in the preprocessed image's pixels -> (coverage (gh, gw) float32: the share of each cell's
    area inside the box, centre_in (gh, gw) bool: whether each cell's centre lies inside it)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    ch, cw = image_hw[0] / gh, image_hw[1] / gw
    ys0, xs0 = np.arange(gh) * ch, np.arange(gw) * cw
    oy = np.clip(np.minimum(ys0 + ch, y1) - np.maximum(ys0, y0), 0, None) / ch  # (gh,)
    ox = np.clip(np.minimum(xs0 + cw, x1) - np.maximum(xs0, x0), 0, None) / cw  # (gw,)
    cy, cx = ys0 + ch / 2, xs0 + cw / 2
    iny = (cy >= y0) & (cy < y1)
    inx = (cx >= x0) & (cx < x1)
    return np.outer(oy, ox).astype(np.float32), np.outer(iny, inx)


def image_box_cells(box, image_wh: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A box (x0, y0, x1, y1) in the original image's pixels, on a grid that covers the whole image
    (InternVL's stitched tile grid): cell (r, c) of a (GH, GW) grid covers x in [c W/GW, (c+1) W/GW)
    and y in [r H/GH, (r+1) H/GH) of the W x H image. The box is clipped to the image. -> (coverage,
    centre_in) as `box_cells`."""
    w, h = float(image_wh[0]), float(image_wh[1])
    x0, y0, x1, y1 = (float(v) for v in box)
    clipped = (min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h))
    return box_cells(clipped, (h, w), grid_hw)


def pointing_hits(maps: np.ndarray, centre_in: np.ndarray) -> np.ndarray:
    """maps (N, L, gh, gw) >= 0, centre_in (N, gh, gw) bool -> hits (N, L) bool."""
    n, layers = maps.shape[:2]
    flat = maps.reshape(n, layers, -1)
    arg = flat.argmax(-1)  # (N, L)
    hit = np.take_along_axis(centre_in.reshape(n, 1, -1).repeat(layers, 1), arg[..., None], -1)[..., 0]
    return hit & (flat.max(-1) > 0)


def energy_in_box(maps: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """maps (N, L, gh, gw) >= 0, coverage (N, gh, gw) in [0, 1] -> share of each map's mass inside the
    box, (N, L) float32 (0 where a map is all zero)."""
    total = maps.sum((-2, -1))
    inside = (maps * coverage[:, None]).sum((-2, -1))
    return np.where(total > 0, inside / np.where(total > 0, total, 1), 0.0).astype(np.float32)


@dataclasses.dataclass
class FaithfulnessResult:
    """Per method: pointing (L,) and energy (L,) averaged over n samples; per-sample hits (N, L) and
    energies (N, L); the chance levels; and the best layer of each method by pointing accuracy."""
    methods: tuple
    num_layers: int
    n: int
    pointing: dict  # method -> (L,) float
    energy: dict  # method -> (L,) float
    hits: dict  # method -> (N, L) bool
    energies: dict  # method -> (N, L) float32
    chance_pointing: float  # mean share of cells whose centre lies in the box
    chance_energy: float  # mean share of the image area covered by the box
    answers: list  # the answer each sample's maps explain
    zero_maps: dict | None = None  # method -> (N, L) bool: the sample's map at that layer is all zero
    deletion: dict | None = None  # deletion curves (see `deletion_summary`), None when not computed

    def best_layer(self, method: str) -> int:
        return int(np.argmax(self.pointing[method]))

    def deletion_best_layer(self, method: str) -> int:
        """The layer whose map's deletion curve has the smallest area (the most faithful order)."""
        return int(np.argmin(self.deletion["auc"][method]))

    def summary(self) -> dict:
        out = self._summary()
        if self.deletion is not None:
            d = self.deletion
            out["deletion"] = {"queries": d["queries"], "steps": len(d["fractions"]) - 1,
                               "fractions": [float(f) for f in d["fractions"]],
                               "auc": {m: [float(v) for v in d["auc"][m]] for m in self.methods},
                               "auc_random": float(d["auc_random"]),
                               "best_layer": {m: self.deletion_best_layer(m) for m in self.methods},
                               "curve_random": [float(v) for v in d["curve_random"]],
                               "curve_best": {m: [float(v) for v in d["curves"][m][self.deletion_best_layer(m)]]
                                              for m in self.methods}}
        return out

    def _summary(self) -> dict:
        return {"n": self.n, "num_layers": self.num_layers, "methods": list(self.methods),
                "chance": {"pointing": self.chance_pointing, "energy": self.chance_energy},
                "per_method": {m: {"pointing": [float(v) for v in self.pointing[m]],
                                   "energy": [float(v) for v in self.energy[m]],
                                   "best_layer": self.best_layer(m),
                                   "best_pointing": float(self.pointing[m][self.best_layer(m)]),
                                   **({"all_zero_maps": [int(v) for v in np.asarray(self.zero_maps[m]).sum(0)]}
                                      if self.zero_maps else {})}
                               for m in self.methods}}

    def zero_notes(self) -> list[str]:
        """Why maps are all zero (scored 0 in both measures): one line per method that has all-zero maps
        at a layer other than the last (the last is zero for every method by the site), naming another
        method that is not all-zero at those samples and layers (if any)."""
        if not self.zero_maps:
            return []
        notes = []
        for m in self.methods:
            z = np.asarray(self.zero_maps[m])[:, :self.num_layers - 1]
            if not z.any():
                continue
            per_layer = z.sum(0)
            layers = [int(l) for l in np.flatnonzero(per_layer)]
            where = ", ".join(f"layer {l}: {int(per_layer[l])}" for l in layers)
            msg = (f"method {m} gives all-zero maps in {int(z.any(1).sum())} of {self.n} samples ({where}): every image "
                   "token's weighted channel sum is negative there, and the ReLU removes it")
            others = [o for o in self.methods if o != m]
            clean = [o for o in others if not (np.asarray(self.zero_maps[o])[:, :self.num_layers - 1] & z).any()]
            if clean:
                msg += f"; {clean[0]} is not all-zero at those samples and layers"
            elif others:
                msg += "; no other method computed here is non-zero at all of them"
            notes.append(msg)
        return notes

    def table(self) -> str:
        """Layer by layer: pointing-game accuracy and energy-in-box share of every method."""
        head = "layer " + " ".join(f"{m + ' PG':>12} {m + ' EiB':>12}" for m in self.methods)
        rows = [head]
        for layer in range(self.num_layers):
            rows.append(f"{layer:>5} " + " ".join(f"{self.pointing[m][layer]:>12.3f} {self.energy[m][layer]:>12.3f}"
                                                  for m in self.methods))
        rows.append(f"chance: pointing {self.chance_pointing:.3f}, energy {self.chance_energy:.3f} "
                    f"({self.n} samples)")
        return "\n".join(rows)


def faithfulness(bundle, samples, methods=("paper", "gradcam", "gradxact"), *, batch_size: int = 16,
                 pad_square: bool = False, max_new_tokens: int = 16, progress: bool = False,
                 attn_impl: str = "fused", deletion_steps: int = 20, deletion_queries: str = "answer",
                 seed: int = 0) -> FaithfulnessResult:
    """Pointing game and energy in box of every layer's LLaVA-CAM, for each method, over `samples`
    (`BoxSample`s). The target of a sample's maps is its answer (teacher-forced), or the model's greedy
    answer where none is given. Returns per-layer means and per-sample values.

    With deletion_steps > 0 (LLaVA's patch grid, whose cells are the image tokens in order), also the
    deletion curves (`jaxflow.analysis.deletion`): each layer's map of each method ranks the image
    tokens, which are knocked out in `deletion_steps` steps for `deletion_queries` ("answer": the
    answer-predicting positions; "text": every position after the image), against a random order
    (seeded); the answer's probability relative to its own, averaged over samples, and the area under
    it per method and layer (small = the map's top tokens carry the answer)."""
    from jaxflow.analysis.cam import llava_cams
    from jaxflow.data.image import box_to_model_frame, load_image
    from jaxflow.pipeline import answer, encode
    from jaxflow.pipeline import check_pad_square

    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be among {', '.join(METHODS)}, got {', '.join(methods) or 'none'}")
    samples = list(samples)
    if not samples:
        raise ValueError("faithfulness needs at least one sample")
    check_pad_square(bundle, pad_square)
    llava = bundle.family == "llava"  # else a grid over the whole original image (InternVL's tiles)
    out_hw = bundle.image_spec.output_hw if llava else None
    L = bundle.config.text.num_layers
    hits = {m: [] for m in methods}  # per sample (L,), each on its own image's grid
    energies = {m: [] for m in methods}
    zeros = {m: [] for m in methods}
    chance, answers, areas = [], [], []
    do_deletion = deletion_steps > 0 and llava
    curves = {f"{m}/{l}": [] for m in methods for l in range(L)}
    curves["random"] = []
    rng_seed = int(seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), desc="faithfulness", unit="sample")
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        images = [load_image(s.image) if isinstance(s.image, (str, os.PathLike)) else s.image for s in chunk]
        given = [s.answer for s in chunk]
        if any(a is None for a in given):
            missing = [j for j, a in enumerate(given) if a is None]
            gen = answer(bundle, [images[j] for j in missing], [chunk[j].question for j in missing],
                         max_new_tokens=max_new_tokens, pad_square=pad_square)
            for j, ids in zip(missing, gen.token_ids):
                given[j] = ids if ids else None
            empty = [chunk[j].question for j, a in enumerate(given) if a is None]
            if empty:
                raise ValueError(f"the model gave an empty answer to {empty[0]!r}: give the answer to explain")
        batch, enc = encode(bundle, images, [s.question for s in chunk], answers=given, pad_square=pad_square,
                            padding_side="left", with_images=True)
        res = llava_cams(bundle.model, batch.input_ids, enc.pixel_values, batch.answer_mask, methods,
                         attention_mask=batch.attention_mask, attn_impl=attn_impl, **enc.image_kw)
        for j, (s, im, a) in enumerate(zip(chunk, images, given)):
            gh, gw = (int(x) for x in res.grids[j])  # this image's grid (the batch's maps are padded)
            if llava:
                box = box_to_model_frame(s.box, im.size, bundle.image_spec, pad_square=pad_square)
                c, ctr = box_cells(box, out_hw, (gh, gw))
                areas.append(max(box[2] - box[0], 0) * max(box[3] - box[1], 0) / (out_hw[0] * out_hw[1]))
            else:
                c, ctr = image_box_cells(s.box, im.size, (gh, gw))
                x0, y0, x1, y1 = (min(max(float(v), 0.0), lim) for v, lim in zip(s.box, im.size * 2))
                areas.append(max(x1 - x0, 0) * max(y1 - y0, 0) / (im.size[0] * im.size[1]))
            chance.append(float(ctr.mean()))
            for m in methods:
                mm = res.maps[m][j:j + 1, :, :gh, :gw]  # (1, L, gh, gw)
                hits[m].append(pointing_hits(mm, ctr[None])[0])
                energies[m].append(energy_in_box(mm, c[None])[0])
                zeros[m].append(~(res.raw[m][j, :, :gh, :gw] > 0).reshape(L, -1).any(-1))
            answers.append(a if isinstance(a, str) else bundle.tokenizer.decode(a, skip_special_tokens=True))
        if do_deletion:
            from jaxflow.analysis.deletion import deletion_curves, map_rankings, random_rankings

            nb = len(chunk)
            n_tok = int(res.maps[methods[0]].shape[-2] * res.maps[methods[0]].shape[-1])
            rankings = {f"{m}/{l}": map_rankings(res.maps[m][:nb, l].reshape(nb, -1)) for m in methods for l in range(L)}
            rankings["random"] = random_rankings(nb, n_tok, seed=rng_seed + i)
            dc = deletion_curves(bundle.model, batch.input_ids, enc.pixel_values, batch.attention_mask,
                                 batch.answer_mask, rankings, steps=deletion_steps, queries=deletion_queries,
                                 attn_impl=attn_impl, **enc.image_kw)
            rel = dc.probs / np.maximum(dc.base[None, None], 1e-30)  # (R, S + 1, B)
            for r, name in enumerate(dc.names):
                curves[name].extend(rel[r].T)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    hits = {m: np.stack(hits[m]) for m in methods}  # (N, L) bool
    energies = {m: np.stack(energies[m]).astype(np.float32) for m in methods}  # (N, L)
    return FaithfulnessResult(
        methods=methods, num_layers=L, n=len(samples),
        pointing={m: hits[m].mean(0) for m in methods}, energy={m: energies[m].mean(0) for m in methods},
        hits=hits, energies=energies, chance_pointing=float(np.mean(chance)),
        chance_energy=float(np.mean(areas)), answers=answers, zero_maps={m: np.stack(zeros[m]) for m in methods},
        deletion=_deletion_summary(curves, methods, L, deletion_steps, deletion_queries) if do_deletion else None)


def _deletion_summary(curves, methods, L, steps, queries) -> dict:
    """Mean relative curves and areas: {"fractions" (S+1,), "curves": method -> (L, S+1), "auc": method ->
    (L,), "curve_random" (S+1,), "auc_random", "queries"}."""
    f = np.arange(steps + 1) / steps

    def area(c):
        return float(((c[1:] + c[:-1]) * 0.5 * np.diff(f)).sum())

    mean = {k: np.mean(np.stack(v), 0) for k, v in curves.items()}
    per = {m: np.stack([mean[f"{m}/{l}"] for l in range(L)]) for m in methods}
    # the area of each sample's curve, averaged (= the area of the mean curve: the area is linear)
    return {"fractions": f, "curves": per, "auc": {m: np.array([area(c) for c in per[m]]) for m in methods},
            "curve_random": mean["random"], "auc_random": area(mean["random"]), "queries": queries}


def plot_faithfulness(result: FaithfulnessResult, path: str, title: str | None = None) -> str:
    """Per-layer curves: pointing-game accuracy and energy-in-box share of each method, with the
    chance levels dashed. Writes a PNG atomically; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    layers = np.arange(result.num_layers)
    for ax, key, chance, label in ((axes[0], "pointing", result.chance_pointing, "pointing-game accuracy"),
                                   (axes[1], "energy", result.chance_energy, "energy-in-box share")):
        for m in result.methods:
            ax.plot(layers, getattr(result, key)[m], marker="o", label=m)
        ax.axhline(chance, ls="--", c="grey", label="chance")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or f"LLaVA-CAM faithfulness ({result.n} samples)")
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_deletion(result: FaithfulnessResult, path: str, title: str | None = None) -> str:
    """deletion.png: the answer's probability (relative to its own) against the share of image tokens
    knocked out, for each method's map at its best layer (smallest area) and a random order; and the
    area per layer. Writes a PNG atomically; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = result.deletion
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for m in result.methods:
        best = result.deletion_best_layer(m)
        axes[0].plot(d["fractions"], d["curves"][m][best], marker="o", ms=3, label=f"{m}, layer {best}")
        axes[1].plot(np.arange(result.num_layers), d["auc"][m], marker="o", label=m)
    axes[0].plot(d["fractions"], d["curve_random"], ls="--", c="grey", label="random order")
    axes[1].axhline(d["auc_random"], ls="--", c="grey", label="random order")
    axes[0].set_xlabel("share of image tokens knocked out (top of the map first)")
    axes[0].set_ylabel("P(answer) / P(answer) without knockout")
    axes[1].set_xlabel("decoder layer of the map")
    axes[1].set_ylabel("area under the deletion curve")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"deletion curves ({result.n} samples, queries: {d['queries']})")
    from jaxflow.viz.figures import save

    save(fig, path)
    plt.close(fig)
    return path


def read_box_samples(path: str, image_dir: str | None = None) -> list[BoxSample]:
    """A JSON-lines file of boxes of your own, one sample per line::

        {"image": "cat.jpg", "question": "Is there a cat in the image?", "box": [x0, y0, x1, y1], "answer": "Yes"}

    (``answer`` optional: the model's greedy answer is explained where it is missing). Relative image
    paths are taken from image_dir (default: the file's folder). A bad line raises ValueError naming
    the file and line."""
    import json

    base = image_dir or os.path.dirname(os.path.abspath(path))
    if not os.path.isfile(path):
        raise ValueError(f"boxes file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) \
                    or not isinstance(obj.get("question"), str) or not obj["question"].strip():
                raise ValueError(f"{where}: needs \"image\" and \"question\" strings")
            box = obj.get("box")
            if (not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box)
                    or not (box[2] > box[0] and box[3] > box[1])):
                raise ValueError(f"{where}: \"box\" must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1, got {box!r}")
            ans = obj.get("answer")
            if ans is not None and (not isinstance(ans, str) or not ans.strip()):
                raise ValueError(f"{where}: \"answer\" must be a non-empty string when given")
            image = obj["image"] if os.path.isabs(obj["image"]) else os.path.join(base, obj["image"])
            if not os.path.isfile(image):
                raise ValueError(f"{where}: image not found: {image}")
            out.append(BoxSample(image, obj["question"], tuple(float(v) for v in box), ans))
    if not out:
        raise ValueError(f"{path}: no samples")
    return out


def run_faithfulness(checkpoint: str | None = None, *, out: str, mesh=None, rules: str = "tp", n: int = 200, seed: int = 0,
                     methods=("paper", "gradcam", "gradxact"), boxes: str | None = None, image_dir: str | None = None,
                     batch_size: int = 16, pad_square: bool = False, template: str | None = None,
                     progress: bool = True, overwrite: bool = False, deletion_steps: int = 20,
                     deletion_queries: str = "answer") -> tuple[FaithfulnessResult, list[str]]:
    """What scripts/faithfulness.py does: the samples (`n` held-out toy samples, or the `boxes` file),
    `faithfulness`, then summary.json, per_sample.npz, faithfulness.png and report.html
    (`write_faithfulness_report`) written atomically into `out`. Raises ValueError on bad input (before anything is written)."""
    import shutil

    from jaxflow.convert import CheckpointError
    from jaxflow.pipeline import load_bundle, write_json

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    from jaxflow.outputs import check_out_dir, publish, staging_dir

    final = check_out_dir(out, overwrite=overwrite)
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    if deletion_steps < 0:
        raise ValueError(f"--deletion_steps must be >= 0 (0: no deletion curves), got {deletion_steps}")
    if deletion_queries not in ("answer", "text"):
        raise ValueError(f"--deletion_queries must be answer or text, got {deletion_queries!r}")
    methods = tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"--methods must be among {', '.join(METHODS)}, got {', '.join(methods) or 'none'}")
    if boxes is not None:
        samples = read_box_samples(boxes, image_dir)
        source = os.path.abspath(boxes)
    else:
        from jaxflow.toy.sets import faithfulness_samples

        samples = faithfulness_samples(n, seed)
        source = f"toy held-out samples (n={n}, seed={seed})"
    try:
        bundle = load_bundle(checkpoint, template=template, mesh=mesh, rules=rules)
    except (CheckpointError, OSError) as e:
        raise ValueError(str(e)) from e
    result = faithfulness(bundle, samples, methods, batch_size=batch_size, pad_square=pad_square,
                          progress=progress, deletion_steps=deletion_steps, deletion_queries=deletion_queries,
                          seed=seed)
    settings = {"samples": source, "n": result.n, "methods": list(methods), "batch_size": batch_size,
                "template": bundle.template, "pad_square": pad_square,
                "image_dir": image_dir if boxes is not None else None, "out": final, "overwrite": overwrite,
                "deletion_steps": deletion_steps if result.deletion is not None else "off",
                "deletion_queries": deletion_queries}
    tmp = staging_dir(final)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; it becomes `out`
        summary = dict(result.summary(), model=bundle.name, family=bundle.family, samples=source,
                       template=bundle.template)
        write_json(os.path.join(tmp, "summary.json"), summary)
        np.savez(os.path.join(tmp, "per_sample.npz"),
                 **{f"{m}_hits": result.hits[m] for m in methods}, **{f"{m}_energy": result.energies[m] for m in methods})
        plot_faithfulness(result, os.path.join(tmp, "faithfulness.png"),
                          title=f"{bundle.name}: LLaVA-CAM faithfulness ({result.n} samples)")
        files = ["summary.json", "per_sample.npz", "faithfulness.png", "report.html"]
        deletion_png = None
        if result.deletion is not None:
            deletion_png = plot_deletion(result, os.path.join(tmp, "deletion.png"),
                                         title=f"{bundle.name}: deletion curves ({result.n} samples, queries: "
                                               f"{deletion_queries})")
            files.insert(3, "deletion.png")
        write_faithfulness_report(os.path.join(tmp, "report.html"), result, bundle, samples, settings,
                                  figure=os.path.join(tmp, "faithfulness.png"), checkpoint=checkpoint,
                                  pad_square=pad_square, deletion_figure=deletion_png)
        publish(tmp, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result, [os.path.join(final, f) for f in files]


def write_faithfulness_report(path: str, result: FaithfulnessResult, bundle, samples, settings: dict, *,
                              figure: str | None = None, checkpoint=None, pad_square: bool = False,
                              max_samples_shown: int = 20, deletion_figure: str | None = None) -> str:
    """report.html of a faithfulness run: the model, the settings, the best layer of each method, the
    per-layer pointing-game / energy-in-box table with the chance levels, the figure, an example
    prompt as tokenised (the first sample's, with its answer), the words of the questions and given
    answers that the tokenizer does not know, and the first samples."""
    from jaxflow.pipeline import encode
    from jaxflow.viz import html_report as H

    methods = result.methods
    best = [(m, result.best_layer(m), float(result.pointing[m][result.best_layer(m)]),
             float(result.energy[m][result.best_layer(m)])) for m in methods]
    header = ["layer"] + [h for m in methods for h in (f"{m} pointing", f"{m} energy in box")]
    rows = [[layer] + [float(v) for m in methods for v in (result.pointing[m][layer], result.energy[m][layer])]
            for layer in range(result.num_layers)]
    rows.append(["chance"] + [v for _ in methods for v in (result.chance_pointing, result.chance_energy)])
    parts = [H.section("Model", H.kv_table(H.model_facts(bundle, checkpoint), ("model", ""))),
             H.section("Settings", H.kv_table(settings)),
             H.section("Best layer per method",
                       H.table(("method", "best layer (pointing)", "pointing there", "energy in box there"), best,
                               left=(0,)),
                       H.para(f"chance: pointing {result.chance_pointing:.3f} (share of cells whose centre lies in the "
                              f"box), energy {result.chance_energy:.3f} (share of the image the box covers); "
                              f"{result.n} samples")),
             H.section("Per layer", H.table(header, rows, highlight=(len(rows) - 1,)),
                       H.para("pointing: share of samples whose map's maximum lies in the box; energy in box: the "
                              "map's mass inside the box. An all-zero map scores 0 in both.")),
             H.figure(figure, "faithfulness.png: pointing and energy per layer, chance dashed") if figure else None]
    if result.deletion is not None:
        d = result.deletion
        header_d = ["layer"] + [f"{m} area" for m in methods]
        rows_d = [[layer] + [float(d["auc"][m][layer]) for m in methods] for layer in range(result.num_layers)]
        rows_d.append(["random order"] + [float(d["auc_random"])] * len(methods))
        parts.append(H.section(
            "Deletion curves", H.table(header_d, rows_d, highlight=(len(rows_d) - 1,)),
            H.para(f"Each layer's map ranks the image tokens; they are knocked out of attention, top first, in "
                   f"{len(d['fractions']) - 1} steps for the {'answer-predicting positions' if d['queries'] == 'answer' else 'positions after the image'}"
                   ", and the answer's probability (relative to its own) is followed. The area under that curve is "
                   "small when the map's top tokens carry the answer; a random order is the baseline."),
            H.figure(deletion_figure, "deletion.png: curves at each method's best layer, areas per layer")
            if deletion_figure else None))
    notes = result.zero_notes()
    if notes:
        parts.insert(3, H.section("All-zero maps", *[H.note(n) for n in notes]))
    s0 = samples[0]
    try:
        batch, _ = encode(bundle, [s0.image], [s0.question], [result.answers[0]], pad_square=pad_square)
        prompt = H.prompt_html(bundle.tokenizer, batch.input_ids[0], image_token_id=bundle.config.image_token_id,
                               attention_mask=batch.attention_mask[0], answer_mask=batch.answer_mask[0],
                               texts=[s0.question])
    except (OSError, ValueError) as e:
        prompt = H.note(f"the example prompt could not be encoded: {e}", "err")
    texts = [s.question for s in samples] + [s.answer for s in samples if s.answer]
    unknown = H.unknown_words_table(bundle.tokenizer, texts)
    parts.append(H.section("Prompt as tokenised (the first sample, with the answer explained)", prompt,
                           unknown if unknown is not None else
                           H.note("every word of the questions and given answers is known to the tokenizer", "ok")))
    shown = []
    for i, (s, a) in enumerate(zip(samples[:max_samples_shown], result.answers)):
        img = os.path.basename(os.fspath(s.image)) if isinstance(s.image, (str, os.PathLike)) else "(generated)"
        best_hits = ", ".join(f"{m}: {'hit' if result.hits[m][i, result.best_layer(m)] else 'miss'}" for m in methods)
        shown.append((i, img, s.question, a, "[" + ", ".join(f"{v:g}" for v in s.box) + "]", best_hits))
    more = f" (the first {max_samples_shown} of {len(samples)})" if len(samples) > max_samples_shown else ""
    parts.append(H.section(f"Samples{more}", H.table(("#", "image", "question", "answer explained", "box (x0, y0, x1, y1)",
                                                       "pointing at each method's best layer"), shown,
                                                      left=(1, 2, 3, 4, 5))))
    return H.write_html(path, H.page(f"jaxflow faithfulness: {bundle.name}", *parts,
                                     subtitle=f"{result.n} samples, {', '.join(methods)}"))
