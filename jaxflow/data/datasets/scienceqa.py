"""ScienceQA-IMG: ``problems.json`` + ``pid_splits.json``, the test problems that have an image.

``problems.json`` maps a problem id to ``{"question", "choices", "answer" (index), "hint",
"image" ("image.png" or null), "split", "subject", "grade", ...}``; ``pid_splits.json`` maps a
split name to its problem ids. The image of problem ``pid`` is ``{image_dir}/{pid}/{image}``
(``{image_dir}/{split}/{pid}/{image}``, the layout of the official download, also works).

``with_text_only=True`` also loads the problems without an image (LLaVA's ``eval_science_qa.py``
scores all 4,241 test problems and prints the accuracy over all of them next to the IMG
accuracy over the 2,017 with an image). Such an item has ``image == ""`` (no file; the runner
cannot run it, so route these items to a text-only path) and ``metadata["has_image"] is False``;
every item has ``metadata["has_image"]``.

Prompts (``prompt=``): ``"llava"`` — LLaVA-1.5's: ``"Context: {hint}\\n"`` when the hint is not
empty or white space, the question, one ``"A. choice"`` line per option, then
``"\\nAnswer with the option's letter from the given choices directly."``; ``"lmms"`` —
lmms-eval's ``sqa_doc_to_text`` (default format): the same, except that any non-empty hint,
white space only included, gets its "Context:" line.
"""
from __future__ import annotations

import os
import string

from jaxflow.data.datasets._common import (LETTER_ANSWER_SUFFIX, Collector, Dataset, DatasetError, Item,
                                           get_field, read_json, str_list)

PROBLEMS_FILE = "problems.json"
SPLITS_FILE = "pid_splits.json"
LETTERS = string.ascii_uppercase
PROMPTS = ("llava", "lmms")


def format_question(question: str, choices, hint: str = "", prompt: str = "llava") -> str:
    """The ScienceQA prompt: ``"Context: {hint}\\n"`` (llava: only when the hint is not empty or
    white space; lmms: when it is not empty), the question, one ``"A. choice"`` line per option,
    then the letter instruction."""
    if prompt not in PROMPTS:
        raise ValueError(f"unknown ScienceQA prompt {prompt!r}; valid: {', '.join(PROMPTS)}")
    has_context = bool(hint) if prompt == "lmms" else bool(hint and hint.strip())
    context = f"Context: {hint}\n" if has_context else ""
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{context}{question}\n{options}{LETTER_ANSWER_SUFFIX}"


def load_scienceqa(data_dir: str, image_dir: str, *, split: str = "test", with_text_only: bool = False,
                   prompt: str = "llava", limit: int | None = None, skip_bad: bool = False,
                   check_images: bool = True) -> Dataset:
    """ScienceQA problems of one split that have an image (answers = (letter,)).

    Problems without an image are counted in ``stats.filtered``, or with ``with_text_only``
    loaded too (``image == ""``, ``metadata["has_image"] is False``). prompt: "llava" (default)
    or "lmms" (module docstring).
    """
    if prompt not in PROMPTS:
        raise ValueError(f"unknown ScienceQA prompt {prompt!r}; valid: {', '.join(PROMPTS)}")
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
            if not image_name and not with_text_only:
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
        image = ""
        if image_name:
            image = os.path.join(image_dir, pid, image_name)
            if not os.path.isfile(image) and os.path.isfile(os.path.join(image_dir, split, pid, image_name)):
                image = os.path.join(image_dir, split, pid, image_name)
        meta = {k: prob.get(k) for k in ("subject", "topic", "category", "skill", "grade", "task")}
        meta.update(pid=pid, choices=list(choices), answer_index=answer, hint=hint, image_file=image_name or None,
                    has_image=bool(image_name), source=f"{PROBLEMS_FILE} ({entry})")
        item = Item(
            id=pid, dataset="scienceqa", image=image, question=question,
            formatted_question=format_question(question, choices, hint, prompt), answers=(LETTERS[answer],),
            split=split, metadata=meta)
        coll.add(item, path=problems_path, entry=entry, check_image=check_images and bool(image_name))
    return coll.result()
