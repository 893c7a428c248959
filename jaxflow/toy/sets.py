"""Held-out toy evaluation sets written in real file formats, so the evaluation runner reads them
like any benchmark:

- ``toy_pope``: ``coco_pope_{random,popular,adversarial}.json`` (POPE's JSON lines: question_id,
  image, text, label), balanced yes/no, and ``boxes.jsonl`` (every image's objects with boxes);
- ``toy_caption``: ``toy_captions.jsonl`` (id, image, objects with colour, shape and box), scored
  CHAIR-style over (colour, shape) mentions.

Images are PNGs in ``images/``. The seed space is disjoint from training's (`jaxflow.toy.data`), and
the same (n, seed) writes the same files.
"""
from __future__ import annotations

import json
import os

import numpy as np

from jaxflow.toy import data as toy_data

_POPE_SEED = 20_000_003
_CAPTION_SEED = 30_000_001


def _obj(o: toy_data.ToyObject) -> dict:
    return {"color": o.color, "shape": o.shape, "box": list(o.box)}


def _write_lines(path: str, rows) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def toy_pope_examples(n_per_split: int = 100, seed: int = 0) -> dict[str, list]:
    """The held-out existence questions of the toy POPE set, in memory: {split: n_per_split
    ToyExamples, alternating yes/no (yes first)}; what `write_toy_pope` writes for the same arguments."""
    if n_per_split < 1:
        raise ValueError(f"n_per_split must be >= 1, got {n_per_split}")
    out = {}
    for si, split in enumerate(toy_data.POPE_SPLITS):
        rng = np.random.default_rng([seed + _POPE_SEED, si])
        out[split] = [toy_data.make_example(rng, kind="existence", split=split, label=(i % 2 == 0))
                      for i in range(n_per_split)]
    return out


def write_toy_pope(root: str, n_per_split: int = 100, seed: int = 0) -> tuple[str, str]:
    """Writes root/pope/coco_pope_{split}.json (n_per_split questions each, alternating yes/no, one
    image per question) and root/pope/boxes.jsonl; images in root/images. Returns (data_dir, image_dir)."""
    examples = toy_pope_examples(n_per_split, seed)
    data_dir, image_dir = os.path.join(root, "pope"), os.path.join(root, "images")
    os.makedirs(data_dir, exist_ok=True)
    os.makedirs(image_dir, exist_ok=True)
    boxes = []
    for split in toy_data.POPE_SPLITS:
        rows = []
        for i, ex in enumerate(examples[split]):
            name = f"toy_pope_{split}_{i:05d}.png"
            ex.image.save(os.path.join(image_dir, name))
            rows.append({"question_id": i + 1, "image": name, "text": ex.question, "label": ex.answer.lower()})
            boxes.append({"image": name, "objects": [_obj(o) for o in ex.objects],
                          "target": None if ex.target is None else _obj(ex.target)})
        _write_lines(os.path.join(data_dir, f"coco_pope_{split}.json"), rows)
    _write_lines(os.path.join(data_dir, "boxes.jsonl"), boxes)
    return data_dir, image_dir


def write_toy_captions(root: str, n: int = 100, seed: int = 0) -> tuple[str, str]:
    """Writes root/caption/toy_captions.jsonl (n images with their objects); images in root/images.
    Returns (data_dir, image_dir)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    data_dir, image_dir = os.path.join(root, "caption"), os.path.join(root, "images")
    os.makedirs(data_dir, exist_ok=True)
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng([seed + _CAPTION_SEED])
    rows = []
    for i in range(n):
        ex = toy_data.make_example(rng, kind="caption")
        name = f"toy_caption_{i:05d}.png"
        ex.image.save(os.path.join(image_dir, name))
        rows.append({"id": f"toy{i:05d}", "image": name, "objects": [_obj(o) for o in ex.objects],
                     "caption": ex.answer})
    _write_lines(os.path.join(data_dir, "toy_captions.jsonl"), rows)
    return data_dir, image_dir


def write_toy_sets(root: str, n: int = 100, seed: int = 0) -> dict[str, tuple[str, str]]:
    """Both sets under root: {"toy_pope": (data_dir, image_dir), "toy_caption": (...)}; n questions per
    POPE split and n captions."""
    return {"toy_pope": write_toy_pope(root, n, seed), "toy_caption": write_toy_captions(root, n, seed)}


_FAITH_SEED = 40_000_037


def faithfulness_samples(n: int = 200, seed: int = 0):
    """Held-out toy samples whose answer is about one object, with its box (`BoxSample`s for
    `jaxflow.analysis.faithfulness`): existence questions answered "Yes" and attribute questions,
    alternating. The answer given is the gold one (the maps explain it)."""
    from jaxflow.analysis.faithfulness import BoxSample

    rng = np.random.default_rng([seed + _FAITH_SEED])
    out = []
    for i in range(n):
        ex = toy_data.make_example(rng, kind="existence", label=True) if i % 2 == 0 else \
            toy_data.make_example(rng, kind="attribute")
        out.append(BoxSample(ex.image, ex.question, tuple(ex.target.box), ex.answer))
    return out
