"""Small fixture data sets in each benchmark's real file format, with generated images.

``write_fixtures(root)`` writes, under ``root`` (about 60 KB in all)::

    coco/val2014/COCO_val2014_000000000042.jpg ...   4 images, shared by POPE and CHAIR
    coco/annotations/instances_val2014.json          COCO instances (all 80 categories, real ids)
    coco/annotations/captions_val2014.json           2 reference captions per image
    pope/coco_pope_{random,popular,adversarial}.json 4 questions each (2 yes, 2 no), JSON lines
    pope/llava_pope_test.jsonl                       the same 12 in LLaVA's format (category, no label)
    textvqa/TextVQA_0.5.1_val.json                   3 questions, 10 answers each, OCR tokens
    textvqa/train_images/{image_id}.jpg
    scienceqa/problems.json, pid_splits.json         5 problems: 3 test items with an image, 1 test
    scienceqa/images/{pid}/image.png                 problem without one, 1 train problem

and returns ``{name: (data_dir, image_dir)}`` for pope, textvqa, scienceqa and chair, ready for
``jaxflow.data.datasets.load_dataset(name, data_dir, image_dir)``. The questions use words the
tiny model's tokenizer knows. Deterministic: the same files on every call.
"""
from __future__ import annotations

import json
import os

from PIL import Image, ImageDraw

from jaxflow.data.datasets._common import SHORT_ANSWER_SUFFIX
from jaxflow.metrics.chair import COCO_CLASSES

# COCO category ids skip these numbers (91 ids, 80 classes).
_COCO_MISSING_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
COCO_CATEGORY_IDS = dict(zip(COCO_CLASSES, [i for i in range(1, 91) if i not in _COCO_MISSING_IDS]))

_COLORS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 210, 40),
           "white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128), "orange": (240, 140, 30)}


def _draw(path: str, size: tuple[int, int], background: str, shapes, text: str | None = None) -> None:
    """An image of coloured shapes [(kind, colour, (x0, y0, x1, y1))] and optional text."""
    im = Image.new("RGB", size, _COLORS[background])
    d = ImageDraw.Draw(im)
    for kind, color, box in shapes:
        fill = _COLORS[color]
        if kind == "circle":
            d.ellipse(box, fill=fill)
        elif kind == "square":
            d.rectangle(box, fill=fill)
        elif kind == "triangle":
            x0, y0, x1, y1 = box
            d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    if text:
        d.text((8, size[1] // 2 - 6), text, fill=_COLORS["black"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".png"):
        im.save(path, optimize=True)
    else:
        im.save(path, quality=80)


def _write_json(path: str, obj, *, indent=None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def _write_jsonl(path: str, rows) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# ---------------------------------------------------------------- COCO (POPE + CHAIR)

_COCO_IMAGES = {
    # image id: (background, shapes, instance classes, reference captions)
    42: ("green", [("circle", "red", (30, 30, 90, 90))], ["dog", "person"],
         ["A man and his dog on the green grass.", "A person standing next to a small dog."]),
    73: ("blue", [("square", "yellow", (40, 20, 120, 100))], ["bus", "car"],
         ["A yellow bus parked on the street.", "Two cars behind a big bus."]),
    74: ("white", [("triangle", "black", (20, 10, 140, 110))], ["cat", "chair", "dining table"],
         ["A cat sitting on a chair near a table.", "A black cat under the dining table."]),
    133: ("gray", [("circle", "orange", (10, 10, 60, 60)), ("square", "blue", (80, 50, 150, 110))],
          ["cup", "bottle", "book"], ["A cup and a bottle next to some books.", "Books, a bottle and a cup."]),
}


def _coco_file_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


def _write_coco(root: str) -> tuple[str, str]:
    image_dir = os.path.join(root, "coco", "val2014")
    ann_dir = os.path.join(root, "coco", "annotations")
    images, instances, captions = [], [], []
    for imid, (bg, shapes, classes, caps) in _COCO_IMAGES.items():
        name = _coco_file_name(imid)
        _draw(os.path.join(image_dir, name), (160, 120), bg, shapes)
        images.append({"license": 1, "file_name": name, "height": 120, "width": 160, "id": imid})
        for c in classes:
            instances.append({"segmentation": [[10.0, 10.0, 50.0, 10.0, 50.0, 50.0]], "area": 800.0, "iscrowd": 0,
                              "image_id": imid, "bbox": [10.0, 10.0, 40.0, 40.0],
                              "category_id": COCO_CATEGORY_IDS[c], "id": 1000 + len(instances)})
        for cap in caps:
            captions.append({"image_id": imid, "id": 5000 + len(captions), "caption": cap})
    categories = [{"supercategory": "object", "id": i, "name": n} for n, i in COCO_CATEGORY_IDS.items()]
    info = {"description": "jaxflow fixture in the COCO 2014 format", "version": "1.0", "year": 2014}
    _write_json(os.path.join(ann_dir, "instances_val2014.json"),
                {"info": info, "images": images, "licenses": [], "annotations": instances, "categories": categories})
    _write_json(os.path.join(ann_dir, "captions_val2014.json"),
                {"info": info, "images": images, "licenses": [], "annotations": captions})
    return ann_dir, image_dir


# ---------------------------------------------------------------- POPE

_POPE = {
    # split: [(image id, object, label), ...]
    "random": [(42, "dog", "yes"), (42, "train", "no"), (73, "bus", "yes"), (73, "bird", "no")],
    "popular": [(74, "cat", "yes"), (74, "person", "no"), (133, "cup", "yes"), (133, "car", "no")],
    "adversarial": [(133, "book", "yes"), (133, "table", "no"), (42, "person", "yes"), (42, "cat", "no")],
}


def _write_pope(root: str) -> str:
    data_dir = os.path.join(root, "pope")
    llava_rows = []
    for s, (split, rows) in enumerate(_POPE.items(), start=1):
        lines = []
        for k, (imid, obj, label) in enumerate(rows, start=1):
            text = f"Is there a {obj} in the image?"
            lines.append({"question_id": k, "image": _coco_file_name(imid), "text": text, "label": label})
            # LLaVA's file numbers questions per category (e.g. 20003000 in "popular") and has no label
            llava_rows.append({"question_id": s * 10_000_000 + k, "image": _coco_file_name(imid),
                               "text": text + SHORT_ANSWER_SUFFIX, "category": split})
        _write_jsonl(os.path.join(data_dir, f"coco_pope_{split}.json"), lines)
    _write_jsonl(os.path.join(data_dir, "llava_pope_test.jsonl"), llava_rows)
    return data_dir


# ---------------------------------------------------------------- TextVQA

_TEXTVQA = [
    # (question id, image id, question, answers (10), OCR tokens, drawn text)
    (34602, "0a1b2c3d4e5f6071", "what does the sign say?",
     ["stop"] * 7 + ["stop sign", "stop", "STOP"], ["stop"], "STOP"),
    (34603, "1b2c3d4e5f607182", "what number is written on the box?",
     ["42"] * 5 + ["forty two", "42", "forty-two", "42", "4"], ["42"], "42"),
    (34604, "2c3d4e5f60718293", "what is written on the sign?",
     ["blue sky"] * 3 + ["the blue sky", "sky", "blue sky", "blue", "blue sky", "sky blue", "blue skies"],
     ["blue", "sky"], "BLUE SKY"),
]


def _write_textvqa(root: str) -> tuple[str, str]:
    data_dir = os.path.join(root, "textvqa")
    image_dir = os.path.join(data_dir, "train_images")
    data = []
    for qid, imid, question, answers, ocr, text in _TEXTVQA:
        _draw(os.path.join(image_dir, f"{imid}.jpg"), (160, 120), "white",
              [("square", "yellow", (4, 40, 156, 80))], text)
        data.append({"question": question, "image_id": imid, "image_classes": ["Sign"], "flickr_original_url": "",
                     "flickr_300k_url": "", "image_width": 160, "image_height": 120, "answers": answers,
                     "question_tokens": question.rstrip("?").split(), "question_id": qid, "set_name": "val",
                     "ocr_tokens": ocr})
    _write_json(os.path.join(data_dir, "TextVQA_0.5.1_val.json"),
                {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data})
    return data_dir, image_dir


# ---------------------------------------------------------------- ScienceQA

_SCIENCEQA = {
    # pid: problem (image drawn as (background, shapes) when "image" is set)
    "1": {"question": "Which shape is red?", "choices": ["circle", "square", "triangle"], "answer": 0,
          "hint": "The picture shows three shapes.", "image": "image.png", "task": "closed choice",
          "grade": "grade2", "subject": "natural science", "topic": "shapes", "category": "Shapes",
          "skill": "Identify shapes", "lecture": "", "solution": "The red shape is a circle.", "split": "test",
          "_draw": ("white", [("circle", "red", (10, 30, 60, 80)), ("square", "blue", (70, 30, 110, 70)),
                              ("triangle", "green", (120, 30, 156, 80))])},
    "2": {"question": "What color is the square?", "choices": ["red", "blue"], "answer": 1, "hint": "",
          "image": "image.png", "task": "closed choice", "grade": "grade1", "subject": "natural science",
          "topic": "colors", "category": "Colors", "skill": "Identify colors", "lecture": "", "solution": "",
          "split": "test", "_draw": ("white", [("square", "blue", (40, 20, 120, 100))])},
    "3": {"question": "Which word is a color?", "choices": ["table", "green", "dog"], "answer": 1, "hint": "",
          "image": None, "task": "closed choice", "grade": "grade1", "subject": "language science",
          "topic": "words", "category": "Words", "skill": "Identify words", "lecture": "", "solution": "",
          "split": "test"},
    "4": {"question": "How many circles are there?", "choices": ["one", "two", "three", "four"], "answer": 1,
          "hint": "Look at the picture.", "image": "image.png", "task": "closed choice", "grade": "grade1",
          "subject": "natural science", "topic": "count", "category": "Count", "skill": "Count", "lecture": "",
          "solution": "", "split": "train",
          "_draw": ("white", [("circle", "red", (10, 10, 60, 60)), ("circle", "red", (90, 50, 140, 100))])},
    "5": {"question": "Which shape is on the left?", "choices": ["triangle", "circle", "square", "star"],
          "answer": 2, "hint": "There are two shapes.", "image": "image.png", "task": "closed choice",
          "grade": "grade2", "subject": "social science", "topic": "place", "category": "Place",
          "skill": "Left and right", "lecture": "", "solution": "", "split": "test",
          "_draw": ("gray", [("square", "yellow", (10, 30, 60, 80)), ("circle", "blue", (100, 30, 150, 80))])},
}


def _write_scienceqa(root: str) -> tuple[str, str]:
    data_dir = os.path.join(root, "scienceqa")
    image_dir = os.path.join(data_dir, "images")
    problems = {}
    for pid, prob in _SCIENCEQA.items():
        prob = dict(prob)
        drawing = prob.pop("_draw", None)
        if drawing is not None:
            _draw(os.path.join(image_dir, pid, prob["image"]), (160, 120), *drawing)
        problems[pid] = prob
    splits = {"train": ["4"], "val": [], "test": ["1", "2", "3", "5"], "trainval": ["4"], "minitrain": [],
              "minival": [], "minitest": ["1"]}
    _write_json(os.path.join(data_dir, "problems.json"), problems, indent=1)
    _write_json(os.path.join(data_dir, "pid_splits.json"), splits)
    return data_dir, image_dir


def write_fixtures(root: str) -> dict[str, tuple[str, str]]:
    """Write the four fixture data sets under root; ``{name: (data_dir, image_dir)}``."""
    os.makedirs(root, exist_ok=True)
    ann_dir, coco_images = _write_coco(root)
    return {
        "pope": (_write_pope(root), coco_images),
        "textvqa": _write_textvqa(root),
        "scienceqa": _write_scienceqa(root),
        "chair": (ann_dir, coco_images),
    }
