"""The toy shapes sets (written by `jaxflow.toy.sets`): ``toy_pope`` reads POPE's files and asks the
bare question (the toy model was trained without LLaVA's answer-format suffix); ``toy_caption``
reads ``toy_captions.jsonl``::

    {"id": "toy00000", "image": "toy_caption_00000.png", "objects": [{"color": "red", "shape": "circle", "box": [x0, y0, x1, y1]}, ...]}

Its items' answers are the image's objects as "colour shape" strings, sorted.
"""
from __future__ import annotations

import dataclasses
import os

from jaxflow.data.datasets._common import (Collector, Dataset, DatasetError, Item, get_field, iter_json_lines,
                                           require_dir)
from jaxflow.data.datasets.pope import load_pope

CAPTION_FILE = "toy_captions.jsonl"
TOY_CAPTION_QUESTION = "Describe the image."


def load_toy_pope(data_dir: str, image_dir: str, *, splits=None, limit: int | None = None, skip_bad: bool = False,
                  check_images: bool = True) -> Dataset:
    """POPE-format toy questions; formatted_question is the question itself (no suffix)."""
    ds = load_pope(data_dir, image_dir, splits=splits, limit=limit, skip_bad=skip_bad, check_images=check_images)
    items = [dataclasses.replace(it, dataset="toy_pope", formatted_question=it.question) for it in ds.items]
    return Dataset("toy_pope", items, ds.stats, ds.files)


def load_toy_captions(data_dir: str, image_dir: str, *, limit: int | None = None, skip_bad: bool = False,
                      check_images: bool = True) -> Dataset:
    """``toy_captions.jsonl`` (in data_dir, or data_dir is the file) -> caption items."""
    path = data_dir if os.path.isfile(data_dir) else os.path.join(require_dir(data_dir, "toy caption data"),
                                                                   CAPTION_FILE)
    coll = Collector("toy_caption", skip_bad, limit)
    coll.files.append(path)
    for line, obj in iter_json_lines(path, coll):
        try:
            iid = get_field(obj, "id", (str, int), path, line)
            image = get_field(obj, "image", str, path, line)
            objects = get_field(obj, "objects", list, path, line)
            names = []
            for o in objects:
                if not isinstance(o, dict):
                    raise DatasetError("every entry of 'objects' must be an object", path, line)
                names.append(f"{get_field(o, 'color', str, path, line)} {get_field(o, 'shape', str, path, line)}")
        except DatasetError as e:
            coll.bad(e)
            continue
        item = Item(id=str(iid), dataset="toy_caption", image=os.path.join(image_dir, image),
                    question=TOY_CAPTION_QUESTION, formatted_question=TOY_CAPTION_QUESTION,
                    answers=tuple(sorted(names)), split="toy",
                    metadata={"objects": objects, "source": f"{os.path.basename(path)}:{line}"})
        coll.add(item, path=path, line=line, check_image=check_images)
        if coll.full:
            break
    return coll.result()
