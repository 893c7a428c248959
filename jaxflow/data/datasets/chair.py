"""CHAIR on COCO val2014: ``instances_val2014.json`` + ``captions_val2014.json``, N sampled images.

Both files are COCO annotation files (``images``: id, file_name; ``annotations``; ``categories``
in the instances file). They are looked up in ``data_dir`` and ``data_dir/annotations`` (where
the COCO zip puts them). ``n_images`` images are drawn without replacement from the instances
file's images, sorted by id, with ``random.Random(seed).sample`` — the same images on every
machine and Python version. Each item's answers are the image's ground-truth COCO classes: its
instance categories plus the classes its reference captions mention (the CHAIR convention).
"""
from __future__ import annotations

import os
import random
from collections import defaultdict

from jaxflow.data.datasets._common import (CAPTION_PROMPT, Collector, Dataset, DatasetError, Item, read_json)
from jaxflow.metrics.chair import WORD_TO_CLASS, caption_objects

INSTANCES_FILE = "instances_val2014.json"
CAPTIONS_FILE = "captions_val2014.json"


def _find(data_dir: str, name: str) -> str:
    if os.path.isfile(data_dir) and os.path.basename(data_dir) == name:
        return data_dir
    for cand in (os.path.join(data_dir, name), os.path.join(data_dir, "annotations", name)):
        if os.path.isfile(cand):
            return cand
    return os.path.join(data_dir, name)  # read_json names it as missing


def _list(root, key: str, path: str) -> list:
    if not isinstance(root, dict) or not isinstance(root.get(key), list):
        raise DatasetError(f"expected a COCO annotation file with a {key!r} list", path)
    return root[key]


def load_chair(data_dir: str, image_dir: str, *, n_images: int = 500, seed: int = 0, limit: int | None = None,
               skip_bad: bool = False, check_images: bool = True) -> Dataset:
    """``n_images`` COCO val2014 images (all of them if there are fewer) with the caption instruction.

    limit keeps the first ``limit`` of the sample. Malformed annotation entries are bad records
    (named by file and list position); an annotation of an image outside the sample is not read
    beyond its ``image_id``.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    inst_path, caps_path = _find(data_dir, INSTANCES_FILE), _find(data_dir, CAPTIONS_FILE)
    coll = Collector("chair", skip_bad, limit)
    coll.files += [inst_path, caps_path]
    instances = read_json(inst_path, "COCO instances")
    captions = read_json(caps_path, "COCO captions")

    # category id -> COCO class
    categories: dict[int, str] = {}
    for i, cat in enumerate(_list(instances, "categories", inst_path)):
        name = cat.get("name") if isinstance(cat, dict) else None
        key = " ".join(str(name).split()).lower() if isinstance(name, str) else None
        if key not in WORD_TO_CLASS or not isinstance(cat.get("id"), int):
            raise DatasetError(f"category entry is not a COCO class with an id: {cat!r:.80}", inst_path,
                               entry=f"categories[{i}]")
        categories[cat["id"]] = WORD_TO_CLASS[key]

    # the images, and the sample
    images: dict[int, str] = {}
    for i, im in enumerate(_list(instances, "images", inst_path)):
        if not (isinstance(im, dict) and isinstance(im.get("id"), int) and isinstance(im.get("file_name"), str)):
            raise DatasetError(f"image entry without an integer 'id' and a 'file_name': {im!r:.80}", inst_path,
                               entry=f"images[{i}]")
        images[im["id"]] = im["file_name"]
    if not images:
        raise DatasetError("no images", inst_path)
    ids = sorted(images)
    sample = random.Random(seed).sample(ids, min(n_images, len(ids)))
    wanted = set(sample)
    coll.stats.filtered = len(ids) - len(sample)

    # ground truth of the sampled images; a bad annotation of a sampled image is a bad record
    bad: dict[int, DatasetError] = {}
    inst_classes: dict[int, set[str]] = defaultdict(set)
    for i, ann in enumerate(_list(instances, "annotations", inst_path)):
        imid = ann.get("image_id") if isinstance(ann, dict) else None
        if imid not in wanted:
            if not isinstance(imid, int):
                raise DatasetError(f"annotation without an integer 'image_id': {ann!r:.80}", inst_path,
                                   entry=f"annotations[{i}]")
            continue
        cid = ann.get("category_id")
        if cid not in categories:
            bad.setdefault(imid, DatasetError(f"unknown category_id {cid!r} (image {imid})", inst_path,
                                              entry=f"annotations[{i}]"))
            continue
        inst_classes[imid].add(categories[cid])
    gt_captions: dict[int, list[str]] = defaultdict(list)
    for i, ann in enumerate(_list(captions, "annotations", caps_path)):
        imid = ann.get("image_id") if isinstance(ann, dict) else None
        if imid not in wanted:
            if not isinstance(imid, int):
                raise DatasetError(f"caption annotation without an integer 'image_id': {ann!r:.80}", caps_path,
                                   entry=f"annotations[{i}]")
            continue
        cap = ann.get("caption")
        if not isinstance(cap, str):
            bad.setdefault(imid, DatasetError(f"caption is not a string (image {imid})", caps_path,
                                              entry=f"annotations[{i}]"))
            continue
        gt_captions[imid].append(cap)

    for imid in sample:
        if coll.full:
            break
        coll.stats.records += 1
        if imid in bad:
            coll.bad(bad[imid])
            continue
        cap_classes = {c for cap in gt_captions[imid] for _, c in caption_objects(cap)}
        gt = inst_classes[imid] | cap_classes
        item = Item(
            id=str(imid), dataset="chair", image=os.path.join(image_dir, images[imid]), question=CAPTION_PROMPT,
            formatted_question=CAPTION_PROMPT, answers=tuple(sorted(gt)), split="val2014",
            metadata={"image_id": imid, "file_name": images[imid], "captions": list(gt_captions[imid]),
                      "instance_objects": sorted(inst_classes[imid]), "caption_objects": sorted(cap_classes),
                      "source": f"{os.path.basename(inst_path)} (image {imid})"})
        coll.add(item, path=inst_path, entry=f"image {imid}", check_image=check_images)
    return coll.result()
