"""TextVQA 0.5.1: ``TextVQA_0.5.1_val.json`` (or the test file) and the ``train_images`` folder.

The file is one JSON object whose ``data`` list holds one question per entry::

    {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what is the brand of this camera?",
     "answers": ["nous les gosses", "dakota", ...  10 answers], "ocr_tokens": ["dakota", "digital", ...], ...}

The image is ``{image_dir}/{image_id}.jpg`` (the val questions use the train_images folder, the
test questions test_images). Test questions have no ``answers`` (the file's ``dataset_type`` or
the entry's ``set_name`` is "test"): their items have ``answers == ()``, for
``jaxflow.metrics.textvqa.write_textvqa_submission``; they cannot be scored.

Prompts (``prompt=``):

- ``"llava"`` — LLaVA-1.5's ``llava_textvqa_val_v051_ocr.jsonl``: the question as written, then
  (``ocr``, default on, and only when there are tokens) ``"\\nReference OCR token: a, b, c"``,
  then ``"\\nAnswer the question using a single word or phrase."``.
- ``"lmms"`` — lmms-eval's ``textvqa_doc_to_text`` (default kwargs: empty pre-prompt, ``ocr``
  off): ``question.capitalize()`` (first character upper-cased, *the rest lower-cased*:
  "what does NYC say?" -> "What does nyc say?"), then with ``ocr=True`` the same OCR line (also
  when the token list is empty), then the same instruction.
"""
from __future__ import annotations

import os

from jaxflow.data.datasets._common import (SHORT_ANSWER_SUFFIX, Collector, Dataset, DatasetError, Item,
                                           get_field, read_json, str_list)

VAL_FILE = "TextVQA_0.5.1_val.json"
TEST_FILE = "TextVQA_0.5.1_test.json"
OCR_PREFIX = "\nReference OCR token: "
PROMPTS = ("llava", "lmms")


def format_question(question: str, ocr_tokens, ocr: bool | None = None, prompt: str = "llava") -> str:
    """The TextVQA prompt (module docstring). llava: the question, optionally ``"Reference OCR
    token: a, b, c"`` on the next line (only when there are tokens), then the short-answer
    instruction; lmms: the question capitalised, the OCR line (with ocr) even when empty, the
    instruction. ocr: None = the prompt's default (llava on, lmms off)."""
    if prompt not in PROMPTS:
        raise ValueError(f"unknown TextVQA prompt {prompt!r}; valid: {', '.join(PROMPTS)}")
    if prompt == "lmms":
        ref = OCR_PREFIX + ", ".join(ocr_tokens) if ocr else ""
        return question.capitalize() + ref + SHORT_ANSWER_SUFFIX
    ref = OCR_PREFIX + ", ".join(ocr_tokens) if (ocr is None or ocr) and ocr_tokens else ""
    return question + ref + SHORT_ANSWER_SUFFIX


def load_textvqa(data_dir: str, image_dir: str, *, ocr: bool | None = None, prompt: str = "llava",
                 limit: int | None = None, skip_bad: bool = False, check_images: bool = True) -> Dataset:
    """TextVQA questions as items (answers = the human answers, 10 per question; () for test).

    data_dir: the directory holding ``TextVQA_0.5.1_val.json``, or the JSON file itself (any
    split file of the same format). prompt: "llava" (default) or "lmms" (module docstring).
    ocr: put the OCR tokens in the prompt; default: on for the llava prompt (as LLaVA-1.5's
    reported TextVQA evaluation does), off for the lmms prompt (lmms-eval's default).
    """
    if prompt not in PROMPTS:
        raise ValueError(f"unknown TextVQA prompt {prompt!r}; valid: {', '.join(PROMPTS)}")
    path = data_dir if os.path.isfile(data_dir) else os.path.join(data_dir, VAL_FILE)
    coll = Collector("textvqa", skip_bad, limit)
    coll.files.append(path)
    root = read_json(path, "TextVQA annotations")
    if not isinstance(root, dict) or not isinstance(root.get("data"), list):
        raise DatasetError("expected a JSON object with a 'data' list", path)
    test_file = root.get("dataset_type") == "test"
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
            unanswered = test_file or obj.get("set_name") == "test"
            answers = str_list(obj, "answers", path, entry=entry, optional=unanswered)
            if not answers and not unanswered:
                raise DatasetError("no answers", path, entry=entry)
            ocr_tokens = str_list(obj, "ocr_tokens", path, entry=entry, optional=True)
        except DatasetError as e:
            coll.bad(e)
            continue
        item = Item(
            id=str(qid), dataset="textvqa", image=os.path.join(image_dir, f"{image_id}.jpg"), question=question,
            formatted_question=format_question(question, ocr_tokens, ocr, prompt), answers=tuple(answers),
            split=str(obj.get("set_name") or ("test" if test_file else "val")),
            metadata={"question_id": qid, "image_id": image_id, "ocr_tokens": list(ocr_tokens),
                      "image_classes": list(obj.get("image_classes") or []),
                      "source": f"{os.path.basename(path)} ({entry})"})
        coll.add(item, path=path, entry=entry, check_image=check_images)
    return coll.result()
