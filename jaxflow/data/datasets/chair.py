"""CHAIR on COCO val2014: ``instances_val2014.json`` + ``captions_val2014.json``, N sampled images.

Both files are COCO annotation files (``images``: id, file_name; ``annotations``; ``categories``
in the instances file). They are looked up in ``data_dir`` and ``data_dir/annotations`` (where
the COCO zip puts them). ``n_images`` images are drawn without replacement from the instances
file's images, sorted by id, with ``random.Random(seed).sample`` — the same images on every
machine and Python version. ``image_ids`` names the images instead (in that order), e.g. the 500
of a paper or of OPERA's run: a list of ids or a file that ``read_image_ids`` reads.

Each item's answers are the image's ground-truth COCO classes under the default CHAIR protocol
("llava"): its instance categories plus the classes its reference captions mention (the CHAIR
convention). The metadata keeps what rebuilds the ground truth under any protocol
(``jaxflow.metrics.chair.item_ground_truth``): ``instance_names`` (the category names of the
image's instance annotations, as written in the file, sorted), ``instance_objects`` (their
classes) and ``captions`` (the reference captions); ``caption_objects`` are the classes the
captions mention under "llava".
"""
from __future__ import annotations

import json
import numbers
import os
import random
import re
from collections import defaultdict
from collections.abc import Sequence

from jaxflow.data.datasets._common import (CAPTION_PROMPT, Collector, Dataset, DatasetError, Item, read_json,
                                           require_file)
from jaxflow.metrics.chair import class_of, ground_truth_objects

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


# "123456", "000000123456.jpg", "COCO_val2014_000000123456.jpg", "val2014/COCO_val2014_000000123456.jpg"
_ID_TEXT = re.compile(r"(?:.*[/\\])?(?:COCO_[a-z]+\d{4}_)?(\d+)(?:\.(?:jpe?g|png))?", re.IGNORECASE)


def _id_from_text(text: str) -> int | None:
    m = _ID_TEXT.fullmatch(text.strip())
    return int(m.group(1)) if m else None


def read_image_ids(path: str) -> list[int]:
    """The COCO image ids listed in a file, in file order.

    Either one per line (blank lines and lines starting with "#" are skipped) or a JSON list.
    An entry is an id ("123456", JSON 123456) or a COCO file name ("COCO_val2014_000000123456.jpg",
    "000000123456.jpg", with or without a folder) -> 123456. A bad or repeated entry raises
    DatasetError naming the file and the line (JSON: the list position).
    """
    require_file(path, "image id list")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DatasetError(f"not UTF-8 text ({e.reason})", path) from None
    entries: list[tuple[object, int | None, str | None]] = []  # (value, line, entry)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"malformed JSON ({e.msg}, column {e.colno})", path, e.lineno) from None
        if not isinstance(data, list):
            raise DatasetError("expected a JSON list of image ids", path)
        entries = [(v, None, f"[{i}]") for i, v in enumerate(data)]
    else:
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if line and not line.startswith("#"):
                entries.append((line, lineno, None))
    ids: list[int] = []
    first: dict[int, str] = {}
    for value, lineno, entry in entries:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            imid = value
        elif isinstance(value, str):
            imid = _id_from_text(value)
        else:
            imid = None
        if imid is None:
            raise DatasetError(f"not a COCO image id or file name: {value!r:.60}", path, lineno, entry)
        where = f"line {lineno}" if lineno is not None else f"entry {entry}"
        if imid in first:
            raise DatasetError(f"image id {imid} repeats (first at {first[imid]})", path, lineno, entry)
        first[imid] = where
        ids.append(imid)
    if not ids:
        raise DatasetError("no image ids", path)
    return ids


def _check_image_ids(image_ids) -> list[int]:
    if isinstance(image_ids, (str, os.PathLike)):
        return read_image_ids(os.fspath(image_ids))
    if not isinstance(image_ids, Sequence) or isinstance(image_ids, bytes):
        raise TypeError(f"image_ids must be a list of COCO image ids or a file path, got {type(image_ids).__name__}")
    ids: list[int] = []
    seen: set[int] = set()
    for i, v in enumerate(image_ids):
        if isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0:
            imid = int(v)
        elif isinstance(v, str):
            imid = _id_from_text(v)
        else:
            imid = None
        if imid is None:
            raise ValueError(f"image_ids[{i}] is not a COCO image id or file name: {v!r:.60}")
        if imid in seen:
            raise ValueError(f"image_ids[{i}]: image id {imid} repeats")
        seen.add(imid)
        ids.append(imid)
    if not ids:
        raise ValueError("image_ids is empty")
    return ids


def load_chair(data_dir: str, image_dir: str, *, n_images: int = 500, seed: int = 0,
               image_ids: Sequence[int] | str | os.PathLike | None = None, limit: int | None = None,
               skip_bad: bool = False, check_images: bool = True) -> Dataset:
    """``n_images`` COCO val2014 images (all of them if there are fewer) with the caption instruction.

    image_ids: the images to use instead of the seeded sample, in this order (then ``n_images``
    and ``seed`` play no part): COCO image ids (ints, or id / file-name strings), or the path of
    a file for ``read_image_ids``. An id that is not in the instances file raises DatasetError
    naming it. limit keeps the first ``limit`` of the sample. Malformed annotation entries are
    bad records (named by file and list position); an annotation of an image outside the
    sample is not read beyond its ``image_id``.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    wanted_ids = _check_image_ids(image_ids) if image_ids is not None else None
    inst_path, caps_path = _find(data_dir, INSTANCES_FILE), _find(data_dir, CAPTIONS_FILE)
    coll = Collector("chair", skip_bad, limit)
    coll.files += [inst_path, caps_path]
    instances = read_json(inst_path, "COCO instances")
    captions = read_json(caps_path, "COCO captions")

    # category id -> category name (as written; a COCO class or synonym)
    categories: dict[int, str] = {}
    for i, cat in enumerate(_list(instances, "categories", inst_path)):
        name = cat.get("name") if isinstance(cat, dict) else None
        try:
            class_of(name, "corrected")
        except ValueError:
            name = None
        if name is None or not isinstance(cat.get("id"), int):
            raise DatasetError(f"category entry is not a COCO class with an id: {cat!r:.80}", inst_path,
                               entry=f"categories[{i}]")
        categories[cat["id"]] = name

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
    if wanted_ids is None:
        sample = random.Random(seed).sample(ids, min(n_images, len(ids)))
    else:
        missing = [i for i in wanted_ids if i not in images]
        if missing:
            more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
            raise DatasetError(f"{len(missing)} of the {len(wanted_ids)} image ids are not in the instances file: "
                               f"{', '.join(map(str, missing[:10]))}{more}", inst_path)
        sample = wanted_ids
    wanted = set(sample)
    coll.stats.filtered = len(ids) - len(sample)

    # ground truth of the sampled images; a bad annotation of a sampled image is a bad record
    bad: dict[int, DatasetError] = {}
    inst_names: dict[int, set[str]] = defaultdict(set)
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
        inst_names[imid].add(categories[cid])
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
        names = sorted(inst_names[imid])
        inst_classes = {class_of(n, "llava") for n in names}
        cap_classes = ground_truth_objects((), gt_captions[imid], protocol="llava")
        gt = inst_classes | cap_classes
        item = Item(
            id=str(imid), dataset="chair", image=os.path.join(image_dir, images[imid]), question=CAPTION_PROMPT,
            formatted_question=CAPTION_PROMPT, answers=tuple(sorted(gt)), split="val2014",
            metadata={"image_id": imid, "file_name": images[imid], "captions": list(gt_captions[imid]),
                      "instance_names": names,
                      "instance_objects": sorted(inst_classes), "caption_objects": sorted(cap_classes),
                      "source": f"{os.path.basename(inst_path)} (image {imid})"})
        coll.add(item, path=inst_path, entry=f"image {imid}", check_image=check_images)
    return coll.result()
