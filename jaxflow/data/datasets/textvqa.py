"""TextVQA 0.5.1 validation: ``TextVQA_0.5.1_val.json`` and the ``train_images`` folder.

The file is one JSON object whose ``data`` list holds one question per entry::

    {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what is the brand of this camera?",
     "answers": ["nous les gosses", "dakota", ...  10 answers], "ocr_tokens": ["dakota", "digital", ...], ...}

The image is ``{image_dir}/{image_id}.jpg`` (the val questions use the train_images folder).
"""
from __future__ import annotations

import os

from jaxflow.data.datasets._common import (SHORT_ANSWER_SUFFIX, Collector, Dataset, DatasetError, Item,
                                           get_field, read_json, str_list)

VAL_FILE = "TextVQA_0.5.1_val.json"
OCR_PREFIX = "\nReference OCR token: "


def format_question(question: str, ocr_tokens, ocr: bool = True) -> str:
    """LLaVA-1.5's TextVQA prompt: the question, optionally ``"Reference OCR token: a, b, c"`` on the
    next line (only when there are tokens), then the short-answer instruction."""
    ref = OCR_PREFIX + ", ".join(ocr_tokens) if ocr and ocr_tokens else ""
    return question + ref + SHORT_ANSWER_SUFFIX


def load_textvqa(data_dir: str, image_dir: str, *, ocr: bool = True, limit: int | None = None,
                 skip_bad: bool = False, check_images: bool = True) -> Dataset:
    """TextVQA questions as items (answers = the human answers, 10 per question).

    data_dir: the directory holding ``TextVQA_0.5.1_val.json``, or the JSON file itself (any
    split file of the same format with answers). ocr: put the OCR tokens in the prompt, as
    LLaVA-1.5's reported TextVQA evaluation does.
    """
    path = data_dir if os.path.isfile(data_dir) else os.path.join(data_dir, VAL_FILE)
    coll = Collector("textvqa", skip_bad, limit)
    coll.files.append(path)
    root = read_json(path, "TextVQA annotations")
    if not isinstance(root, dict) or not isinstance(root.get("data"), list):
        raise DatasetError("expected a JSON object with a 'data' list", path)
    for i, obj in enumerate(root["data"]):
        if coll.full:
            break
        coll.stats.records += 1
        entry = f"data[{i}]"
        try:
            if not isinstance(obj, dict):
                raise DatasetError(f"expected an object, got {type(obj).__name__}", path, entry=entry)
            qid = get_field(obj, "question_id", (int, str), path, entry=entry)
            entry = f"data[{i}], question_id {qid}"
            image_id = get_field(obj, "image_id", str, path, entry=entry)
            question = get_field(obj, "question", str, path, entry=entry)
            if not question.strip():
                raise DatasetError("empty question", path, entry=entry)
            answers = str_list(obj, "answers", path, entry=entry)
            if not answers:
                raise DatasetError("no answers", path, entry=entry)
            ocr_tokens = str_list(obj, "ocr_tokens", path, entry=entry, optional=True)
        except DatasetError as e:
            coll.bad(e)
            continue
        item = Item(
            id=str(qid), dataset="textvqa", image=os.path.join(image_dir, f"{image_id}.jpg"), question=question,
            formatted_question=format_question(question, ocr_tokens, ocr), answers=tuple(answers),
            split=str(obj.get("set_name") or "val"),
            metadata={"question_id": qid, "image_id": image_id, "ocr_tokens": list(ocr_tokens),
                      "image_classes": list(obj.get("image_classes") or []),
                      "source": f"{os.path.basename(path)} ({entry})"})
        coll.add(item, path=path, entry=entry, check_image=check_images)
    return coll.result()
