"""POPE: ``coco_pope_{random,popular,adversarial}.json`` or LLaVA's ``llava_pope_test.jsonl``.

Both are JSON lines, one question per line::

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"}

LLaVA's file has all three splits with a ``category`` per line and the instruction already
appended to ``text``; where its lines carry no ``label``, the label is looked up in the
``coco_pope_{category}.json`` next to it by (image, question). Images are COCO val2014 files in
``image_dir``.
"""
from __future__ import annotations

import os
import re

from jaxflow.data.datasets._common import (SHORT_ANSWER_SUFFIX, Collector, Dataset, DatasetError, Item,
                                           get_field, iter_json_lines, require_dir, require_file)

SPLITS = ("random", "popular", "adversarial")
LLAVA_FILE = "llava_pope_test.jsonl"
SOURCES = ("auto", "coco", "llava")
_SPLIT_FROM_NAME = re.compile(r"coco_pope_(\w+)\.json[l]?$")


def split_file(split: str) -> str:
    """The file name of one POPE split, ``coco_pope_{split}.json``."""
    return f"coco_pope_{split}.json"


def _strip_suffix(text: str) -> str:
    return text[: -len(SHORT_ANSWER_SUFFIX)] if text.endswith(SHORT_ANSWER_SUFFIX) else text


def _resolve(data_dir: str, splits, source: str) -> list[tuple[str, str | None]]:
    """[(file, split or None (= from the lines)), ...]."""
    if source not in SOURCES:
        raise ValueError(f"unknown POPE source {source!r}; valid: {', '.join(SOURCES)}")
    if os.path.isfile(data_dir):
        m = _SPLIT_FROM_NAME.search(os.path.basename(data_dir))
        return [(data_dir, m.group(1) if m else None)]
    require_dir(data_dir, "POPE data directory")
    if source == "auto":
        if any(os.path.isfile(os.path.join(data_dir, split_file(s))) for s in (splits or SPLITS)):
            source = "coco"
        elif os.path.isfile(os.path.join(data_dir, LLAVA_FILE)):
            source = "llava"
        else:
            wanted = ", ".join(split_file(s) for s in (splits or SPLITS))
            raise DatasetError(f"no POPE file found (expected one of {wanted} or {LLAVA_FILE})", data_dir)
    if source == "llava":
        return [(require_file(os.path.join(data_dir, LLAVA_FILE), "LLaVA POPE questions"), None)]
    if splits:
        return [(require_file(os.path.join(data_dir, split_file(s)), f"POPE {s} split"), s) for s in splits]
    found = [(os.path.join(data_dir, split_file(s)), s) for s in SPLITS]
    return [(p, s) for p, s in found if os.path.isfile(p)]


class _LabelIndex:
    """Labels of ``coco_pope_{category}.json`` by (image, question), for label-less LLaVA lines."""

    def __init__(self, directory: str):
        self.directory = directory
        self._by_cat: dict[str, dict[tuple[str, str], str]] = {}

    def get(self, category: str, image: str, question: str, path: str, line: int) -> str | None:
        if category not in self._by_cat:
            label_file = os.path.join(self.directory, split_file(category))
            if not os.path.isfile(label_file):
                raise DatasetError(f"file not found (the labels of {os.path.basename(path)}, whose line {line} "
                                   f"has no 'label', are read from coco_pope_{{category}}.json)", label_file)
            index: dict[tuple[str, str], str] = {}
            scratch = Collector("pope-labels", skip_bad=True, limit=None)
            for _, obj in iter_json_lines(label_file, scratch):
                im, tx, lb = obj.get("image"), obj.get("text"), obj.get("label")
                if isinstance(im, str) and isinstance(tx, str) and isinstance(lb, str):
                    index[(im, _strip_suffix(tx).strip())] = lb
            self._by_cat[category] = index
        return self._by_cat[category].get((image, question.strip()))


def load_pope(data_dir: str, image_dir: str, *, splits=None, source: str = "auto", limit: int | None = None,
              skip_bad: bool = False, check_images: bool = True) -> Dataset:
    """POPE questions as items (answers = (label,), split = category).

    data_dir: the directory with the POPE files, or one file. splits: the categories to keep, a
    sequence or a comma-separated string (default: every split whose ``coco_pope_*.json`` exists;
    with LLaVA's file, all). source: "coco" (the per-split files), "llava" (``llava_pope_test.jsonl``)
    or "auto" (the per-split files if any exist, else LLaVA's).
    """
    if isinstance(splits, str):
        splits = [s.strip() for s in splits.split(",") if s.strip()]
    splits = tuple(splits) if splits else None
    coll = Collector("pope", skip_bad, limit)
    files = _resolve(data_dir, splits, source)
    if not files:
        raise DatasetError("no POPE file found", data_dir)
    for path, file_split in files:
        if coll.full:
            break
        coll.files.append(path)
        labels = _LabelIndex(os.path.dirname(os.path.abspath(path)))
        for line, obj in iter_json_lines(path, coll):
            try:
                qid = get_field(obj, "question_id", (int, str), path, line)
                image = get_field(obj, "image", str, path, line)
                text = get_field(obj, "text", str, path, line)
                category = get_field(obj, "category", str, path, line, optional=True) or file_split or "default"
                if splits and category not in splits:
                    coll.stats.filtered += 1
                    continue
                question = _strip_suffix(text)
                if not question.strip():
                    raise DatasetError("empty question text", path, line)
                label = get_field(obj, "label", str, path, line, optional=True)
                if label is None:
                    label = labels.get(category, image, question, path, line)
                    if label is None:
                        raise DatasetError(f"no 'label', and no line of {split_file(category)} has this image "
                                           f"and question", path, line)
                label = label.strip().lower()
                if label not in ("yes", "no"):
                    raise DatasetError(f"label must be 'yes' or 'no', got {label!r}", path, line)
            except DatasetError as e:
                if e.path != path:  # a missing labels file is not a per-item problem
                    raise
                coll.bad(e)
                continue
            item = Item(
                id=f"{category}/{qid}", dataset="pope", image=os.path.join(image_dir, image),
                question=question, formatted_question=question + SHORT_ANSWER_SUFFIX, answers=(label,),
                split=category,
                metadata={"question_id": qid, "image_file": image, "source": f"{os.path.basename(path)}:{line}"})
            coll.add(item, path=path, line=line, check_image=check_images)
            if coll.full:
                break
    return coll.result()
