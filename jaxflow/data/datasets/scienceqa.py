"""ScienceQA-IMG: ``problems.json`` + ``pid_splits.json``, the test problems that have an image.

``problems.json`` maps a problem id to ``{"question", "choices", "answer" (index), "hint",
"image" ("image.png" or null), "split", "subject", "grade", ...}``; ``pid_splits.json`` maps a
split name to its problem ids. The image of problem ``pid`` is ``{image_dir}/{pid}/{image}``
(``{image_dir}/{split}/{pid}/{image}``, the layout of the official download, also works).
"""
from __future__ import annotations

import os
import string

from jaxflow.data.datasets._common import (LETTER_ANSWER_SUFFIX, Collector, Dataset, DatasetError, Item,
                                           get_field, read_json, str_list)

PROBLEMS_FILE = "problems.json"
SPLITS_FILE = "pid_splits.json"
LETTERS = string.ascii_uppercase


def format_question(question: str, choices, hint: str = "") -> str:
    """LLaVA-1.5's ScienceQA prompt: ``"Context: {hint}\\n"`` (only when the hint is not empty),
    the question, one ``"A. choice"`` line per option, then the letter instruction."""
    context = f"Context: {hint}\n" if hint and hint.strip() else ""
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{context}{question}\n{options}{LETTER_ANSWER_SUFFIX}"


def load_scienceqa(data_dir: str, image_dir: str, *, split: str = "test", limit: int | None = None,
                   skip_bad: bool = False, check_images: bool = True) -> Dataset:
    """ScienceQA problems of one split that have an image (answers = (letter,)).

    Problems without an image are counted in ``stats.filtered``.
    """
    problems_path = os.path.join(data_dir, PROBLEMS_FILE)
    splits_path = os.path.join(data_dir, SPLITS_FILE)
    coll = Collector("scienceqa", skip_bad, limit)
    coll.files += [problems_path, splits_path]
    problems = read_json(problems_path, "ScienceQA problems")
    pid_splits = read_json(splits_path, "ScienceQA splits")
    if not isinstance(problems, dict):
        raise DatasetError("expected a JSON object mapping problem ids to problems", problems_path)
    if not isinstance(pid_splits, dict):
        raise DatasetError("expected a JSON object mapping split names to problem ids", splits_path)
    if split not in pid_splits:
        raise DatasetError(f"no split {split!r} (splits: {', '.join(map(str, pid_splits))})", splits_path)
    pids = pid_splits[split]
    if not isinstance(pids, list):
        raise DatasetError(f"split {split!r} must be a list of problem ids", splits_path)
    for pid in pids:
        if coll.full:
            break
        coll.stats.records += 1
        pid = str(pid)
        entry = f"problem {pid}"
        try:
            prob = problems.get(pid)
            if prob is None:
                raise DatasetError(f"problem {pid} of split {split!r} is not in {PROBLEMS_FILE}", splits_path)
            if not isinstance(prob, dict):
                raise DatasetError(f"expected an object, got {type(prob).__name__}", problems_path, entry=entry)
            image_name = get_field(prob, "image", str, problems_path, entry=entry, optional=True)
            if not image_name:
                coll.stats.filtered += 1
                continue
            question = get_field(prob, "question", str, problems_path, entry=entry)
            choices = str_list(prob, "choices", problems_path, entry=entry)
            if not 2 <= len(choices) <= len(LETTERS):
                raise DatasetError(f"expected 2..26 choices, got {len(choices)}", problems_path, entry=entry)
            answer = get_field(prob, "answer", int, problems_path, entry=entry)
            if not 0 <= answer < len(choices):
                raise DatasetError(f"answer index {answer} out of range for {len(choices)} choices",
                                   problems_path, entry=entry)
            hint = get_field(prob, "hint", str, problems_path, entry=entry, optional=True, default="")
        except DatasetError as e:
            coll.bad(e)
            continue
        image = os.path.join(image_dir, pid, image_name)
        if not os.path.isfile(image) and os.path.isfile(os.path.join(image_dir, split, pid, image_name)):
            image = os.path.join(image_dir, split, pid, image_name)
        meta = {k: prob.get(k) for k in ("subject", "topic", "category", "skill", "grade", "task")}
        meta.update(pid=pid, choices=list(choices), answer_index=answer, hint=hint, image_file=image_name,
                    source=f"{PROBLEMS_FILE} ({entry})")
        item = Item(
            id=pid, dataset="scienceqa", image=image, question=question,
            formatted_question=format_question(question, choices, hint), answers=(LETTERS[answer],),
            split=split, metadata=meta)
        coll.add(item, path=problems_path, entry=entry, check_image=check_images)
    return coll.result()
