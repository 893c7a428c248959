"""The item type, the load result, errors and the file helpers shared by the loaders."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("jaxflow.data.datasets")

# LLaVA-1.5's evaluation instructions (docs/datasets.md).
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
CAPTION_PROMPT = "Please describe this image in detail."


class DatasetError(ValueError):
    """A data set file is missing or malformed, or an item is bad (e.g. its image is missing).

    ``path`` is the file at fault, ``line`` the 1-based line of a JSON-lines file (or of a JSON
    syntax error), ``entry`` the position of the entry in a JSON file's list, when known.
    """

    def __init__(self, message: str, path: str | None = None, line: int | None = None,
                 entry: str | None = None):
        self.path, self.line, self.entry, self.reason = path, line, entry, message
        where = path or ""
        if path and line is not None:
            where = f"{path}:{line}"
        if entry:
            where = f"{where} ({entry})" if where else entry
        super().__init__(f"{where}: {message}" if where else message)


@dataclasses.dataclass(frozen=True)
class Item:
    """One evaluation example.

    id: unique within the data set (POPE: "{category}/{question_id}", TextVQA: question_id,
        ScienceQA: problem id, CHAIR: COCO image id).
    image: path of the image file.
    question: the question as the data set writes it (CHAIR: the caption instruction).
    formatted_question: what LLaVA-1.5's evaluation sends as the user turn after ``<image>\\n``
        (the data set's instruction suffix included); pass it to
        ``jaxflow.data.prompts.format_prompt``.
    answers: the reference(s): POPE ("yes",) / ("no",); TextVQA the 10 human answers; ScienceQA
        (letter,); CHAIR the image's ground-truth COCO classes, sorted.
    split: POPE category (random / popular / adversarial), TextVQA set name, ScienceQA split,
        CHAIR "val2014".
    metadata: everything else (per data set; always ``source``: "file:line" or "file (entry)").
    """

    id: str
    dataset: str
    image: str
    question: str
    formatted_question: str
    answers: tuple[str, ...]
    split: str
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def answer(self) -> str:
        """The first reference answer."""
        return self.answers[0] if self.answers else ""


@dataclasses.dataclass
class LoadStats:
    """What a load read: ``records`` seen, ``loaded`` items, ``skipped`` bad records (only with
    skip_bad=True; ``problems`` says why, one message each), ``filtered`` records left out by
    design (e.g. ScienceQA problems without an image, POPE categories not asked for)."""

    records: int = 0
    loaded: int = 0
    skipped: int = 0
    filtered: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Dataset:
    """The items of one data set, with the load statistics and the files read."""

    name: str
    items: list[Item]
    stats: LoadStats
    files: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def by_id(self) -> dict[str, Item]:
        return {it.id: it for it in self.items}


class Collector:
    """Collects items; a bad record raises, or with skip_bad is counted, logged and dropped."""

    def __init__(self, name: str, skip_bad: bool, limit: int | None):
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.name, self.skip_bad, self.limit = name, skip_bad, limit
        self.items: list[Item] = []
        self.stats = LoadStats()
        self.files: list[str] = []
        self._ids: set[str] = set()

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self.items) >= self.limit

    def bad(self, err: DatasetError) -> None:
        if not self.skip_bad:
            raise err
        self.stats.skipped += 1
        self.stats.problems.append(str(err))

    def add(self, item: Item, *, path: str, line: int | None = None, entry: str | None = None,
            check_image: bool = True) -> None:
        if item.id in self._ids:
            self.bad(DatasetError(f"duplicate item id {item.id!r}", path, line, entry))
            return
        if check_image and not os.path.isfile(item.image):
            self.bad(DatasetError(f"image not found: {item.image}", path, line, entry))
            return
        self._ids.add(item.id)
        self.items.append(item)

    def result(self) -> Dataset:
        self.stats.loaded = len(self.items)
        if self.stats.skipped:
            log.warning("%s: skipped %d bad record(s) of %d (first: %s)", self.name, self.stats.skipped,
                        self.stats.records, self.stats.problems[0])
        return Dataset(self.name, self.items, self.stats, self.files)


def require_file(path: str, what: str) -> str:
    """The path, or DatasetError if it is not an existing file."""
    if not os.path.isfile(path):
        reason = "is a directory, expected a file" if os.path.isdir(path) else "file not found"
        raise DatasetError(f"{reason} ({what})", path)
    return path


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise DatasetError(f"directory not found ({what})", path)
    return path


def read_json(path: str, what: str) -> Any:
    """A whole JSON file; a syntax error names the file, line and column."""
    require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"malformed JSON ({e.msg}, column {e.colno})", path, e.lineno) from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"not UTF-8 text ({e.reason})", path) from None


def iter_json_lines(path: str, coll: Collector) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line; malformed lines go to ``coll.bad``."""
    require_file(path, "JSON lines")
    with open(path, encoding="utf-8", errors="strict") as f:
        lineno = 0
        while True:
            try:
                raw = f.readline()
            except UnicodeDecodeError as e:
                raise DatasetError(f"not UTF-8 text ({e.reason})", path, lineno + 1) from None
            if not raw:
                return
            lineno += 1
            if not raw.strip():
                continue
            coll.stats.records += 1
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                coll.bad(DatasetError(f"malformed JSON line ({e.msg}, column {e.colno})", path, lineno))
                continue
            if not isinstance(obj, dict):
                coll.bad(DatasetError(f"expected a JSON object, got {type(obj).__name__}", path, lineno))
                continue
            yield lineno, obj


def get_field(obj: dict, key: str, types, path: str, line: int | None = None, entry: str | None = None,
              *, optional: bool = False, default=None):
    """obj[key] checked against types; a missing or mistyped field raises DatasetError."""
    if key not in obj or obj[key] is None:
        if optional:
            return default
        raise DatasetError(f"missing field {key!r}", path, line, entry)
    value = obj[key]
    types_t = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types_t) or (isinstance(value, bool) and bool not in types_t):
        names = "/".join(t.__name__ for t in types_t)
        raise DatasetError(f"field {key!r} must be {names}, got {type(value).__name__} {value!r:.60}",
                           path, line, entry)
    return value


def str_list(obj: dict, key: str, path: str, line: int | None = None, entry: str | None = None,
             *, optional: bool = False) -> list[str]:
    value = get_field(obj, key, list, path, line, entry, optional=optional, default=[])
    if not all(isinstance(v, str) for v in value):
        raise DatasetError(f"field {key!r} must be a list of strings", path, line, entry)
    return value
