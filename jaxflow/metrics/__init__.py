"""Benchmark metrics: pure functions of (predictions, references) returning dicts of floats.

- ``pope_metrics`` (POPE: accuracy, precision, recall, F1, yes-ratio; LLaVA or exact parsing)
- ``textvqa_accuracy`` (VQA soft accuracy with the standard answer normalisation)
- ``scienceqa_accuracy`` (option-letter accuracy, LLaVA's parsing)
- ``chair_metrics`` (CHAIR_s, CHAIR_i, recall)
- ``toy_caption_metrics`` (CHAIR over the toy shapes' (colour, shape) objects)

``score(dataset, predictions, items)`` applies the right one to items of
``jaxflow.data.datasets.load_dataset``. See docs/datasets.md for the conventions.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from jaxflow.metrics.chair import analyse_caption, caption_objects, chair_metrics, ground_truth_objects
from jaxflow.metrics.pope import parse_yes_no, pope_metrics
from jaxflow.metrics.scienceqa import parse_letter, scienceqa_accuracy
from jaxflow.metrics.singularize import singularize
from jaxflow.metrics.textvqa import normalize_answer, textvqa_accuracy, vqa_accuracy
from jaxflow.metrics.toy_caption import analyse_toy_caption, toy_caption_metrics, toy_mentions

DATASETS = ("pope", "textvqa", "scienceqa", "chair", "toy_pope", "toy_caption")

# The headline metric of each data set (what a truncation curve plots by default).
PRIMARY_METRIC = {"pope": "f1", "textvqa": "accuracy", "scienceqa": "accuracy", "chair": "chair_s", "toy_pope": "f1",
                  "toy_caption": "chair_s"}


def score(dataset: str, predictions: Mapping[str, str], items: Sequence) -> dict[str, float]:
    """Score predictions (item id -> generated text) against data set items (objects with ``id``,
    ``answers``, ``split`` and ``metadata``, as the loaders return them); every item needs a
    prediction and every prediction an item.

    pope: ``pope_metrics`` with LLaVA parsing (plain keys, per category ``"{split}/..."``) and
    with exact-match parsing (the same keys prefixed ``"exact/"``); textvqa: ``textvqa_accuracy``;
    scienceqa: ``scienceqa_accuracy`` with per-subject accuracies; chair: ``chair_metrics``.
    """
    items = list(items)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("items have duplicate ids")
    if dataset in ("pope", "toy_pope"):
        labels = {it.id: it.answers[0] for it in items}
        cats = {it.id: it.split for it in items}
        out = pope_metrics(predictions, labels, cats, parsing="llava")
        out.update({f"exact/{k}": v for k, v in pope_metrics(predictions, labels, cats, parsing="exact").items()})
        return out
    if dataset == "textvqa":
        return textvqa_accuracy(predictions, {it.id: list(it.answers) for it in items})
    if dataset == "scienceqa":
        return scienceqa_accuracy(
            predictions, {it.id: it.answers[0] for it in items},
            num_choices={it.id: len(it.metadata["choices"]) for it in items},
            categories={it.id: it.metadata.get("subject") or "unknown" for it in items})
    if dataset == "chair":
        return chair_metrics(predictions, {it.id: list(it.answers) for it in items})
    if dataset == "toy_caption":
        return toy_caption_metrics(predictions, {it.id: list(it.answers) for it in items})
    raise ValueError(f"unknown data set {dataset!r}; valid: {', '.join(DATASETS)}")


__all__ = [
    "DATASETS", "PRIMARY_METRIC", "score", "toy_caption_metrics", "toy_mentions", "analyse_toy_caption",
    "pope_metrics", "parse_yes_no",
    "textvqa_accuracy", "vqa_accuracy", "normalize_answer",
    "scienceqa_accuracy", "parse_letter",
    "chair_metrics", "caption_objects", "ground_truth_objects", "analyse_caption", "singularize",
]
