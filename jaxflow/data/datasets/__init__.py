"""Benchmark loaders: POPE, TextVQA, ScienceQA-IMG and CHAIR (COCO val2014), from the files as
published (formats in docs/datasets.md). Nothing is downloaded.

    from jaxflow.data.datasets import load_dataset
    ds = load_dataset("pope", "data/pope", "data/coco/val2014", limit=100)
    for item in ds:  # Item: id, image, question, formatted_question, answers, split, metadata
        prompt = format_prompt(item.formatted_question)

A missing or malformed file, a malformed record or a missing image raises ``DatasetError``
naming the file (and the line of a JSON-lines file, or the entry of a JSON file). With
``skip_bad=True`` bad records are dropped instead, counted in ``ds.stats.skipped`` with one
message each in ``ds.stats.problems``, and logged; missing or unreadable files still raise.
"""
from __future__ import annotations

import inspect

from jaxflow.data.datasets._common import (CAPTION_PROMPT, LETTER_ANSWER_SUFFIX, SHORT_ANSWER_SUFFIX, Dataset,
                                           DatasetError, Item, LoadStats)
from jaxflow.data.datasets.chair import load_chair
from jaxflow.data.datasets.pope import load_pope
from jaxflow.data.datasets.questions import QWEN_VL_CAPTION_PROMPT, qwen_vl_question, template_question
from jaxflow.data.datasets.scienceqa import load_scienceqa
from jaxflow.data.datasets.textvqa import load_textvqa
from jaxflow.data.datasets.toy import load_toy_captions, load_toy_pope

LOADERS = {"pope": load_pope, "textvqa": load_textvqa, "scienceqa": load_scienceqa, "chair": load_chair,
           "toy_pope": load_toy_pope, "toy_caption": load_toy_captions}
DATASETS = tuple(LOADERS)
BENCHMARKS = ("pope", "textvqa", "scienceqa", "chair")  # the published sets (bundled fixtures: data.fixtures)


def dataset_options(name: str) -> tuple[str, ...]:
    """The data-set-specific keyword options of ``load_dataset(name, ...)``."""
    if name not in LOADERS:
        raise ValueError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")
    params = inspect.signature(LOADERS[name]).parameters
    return tuple(p for p in params if p not in ("data_dir", "image_dir", "limit", "skip_bad", "check_images",
                                                 "seed"))


def load_dataset(name: str, data_dir: str, image_dir: str, *, limit: int | None = None, skip_bad: bool = False,
                 seed: int = 0, check_images: bool = True, **options) -> Dataset:
    """Load one benchmark: name in pope | textvqa | scienceqa | chair.

    data_dir: where the annotation files are (or, for POPE and TextVQA, the file itself);
    image_dir: the image folder. limit: keep the first N items. seed: the CHAIR image sample
    (the other sets are read in file order). check_images: fail (or skip) items whose image file
    does not exist. options, per data set:

    - pope: ``splits`` (e.g. ("adversarial",)), ``source`` ("auto" | "coco" | "llava")
    - textvqa: ``ocr`` (default True: "Reference OCR token: ..." in the prompt)
    - scienceqa: ``split`` (default "test")
    - chair: ``n_images`` (default 500)
    - toy_pope: ``splits``; toy_caption: none (files written by ``jaxflow.toy.sets``)
    """
    valid = dataset_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) for {name}: {', '.join(unknown)}; valid: {', '.join(valid) or 'none'}")
    kwargs = dict(options, limit=limit, skip_bad=skip_bad, check_images=check_images)
    if name == "chair":
        kwargs["seed"] = seed
    return LOADERS[name](data_dir, image_dir, **kwargs)


__all__ = [
    "template_question", "qwen_vl_question", "QWEN_VL_CAPTION_PROMPT",
    "load_dataset", "dataset_options", "DATASETS", "BENCHMARKS", "LOADERS", "Dataset", "DatasetError", "Item", "LoadStats",
    "load_pope", "load_textvqa", "load_scienceqa", "load_chair", "load_toy_pope", "load_toy_captions",
    "SHORT_ANSWER_SUFFIX", "LETTER_ANSWER_SUFFIX", "CAPTION_PROMPT",
]
