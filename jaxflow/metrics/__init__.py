"""Benchmark metrics: pure functions of (predictions, references) returning dicts of floats.

- ``pope_metrics`` (POPE: accuracy, precision, recall, F1, yes-ratio; LLaVA or exact parsing)
- ``textvqa_accuracy`` (VQA soft accuracy with the standard answer normalisation)
- ``scienceqa_accuracy`` (option-letter accuracy, LLaVA's parsing)
- ``chair_metrics`` (CHAIR_s, CHAIR_i, recall)
- ``toy_caption_metrics`` (CHAIR over the toy shapes' (colour, shape) objects)

``score(dataset, predictions, items, protocol=...)`` applies the right one to items of
``jaxflow.data.datasets.load_dataset``. Every metric takes a scoring ``protocol``:

- ``"llava"`` (default): exactly what LLaVA's evaluation scripts compute (``eval_pope.py``,
  ``eval_textvqa.py`` + ``m4c_evaluator.py``, ``eval_science_qa.py``) and, for CHAIR, the reference
  ``chair.py`` (LisaAnne/Hallucination), quirks included: what published tables report;
- ``"lmms"``: lmms-eval's task utilities, where they differ;
- ``"corrected"``: our documented fixes of those quirks.

See docs/datasets.md for each protocol's rules with worked examples.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from jaxflow.metrics.chair import (analyse_caption, caption_objects, chair_metrics, chair_score_items,
                                   ground_truth_objects)
from jaxflow.metrics.pope import parse_yes_no, pope_metrics
from jaxflow.metrics.scienceqa import parse_letter, scienceqa_accuracy
from jaxflow.metrics.singularize import singularize
from jaxflow.metrics.textvqa import normalize_answer, textvqa_accuracy, vqa_accuracy, write_textvqa_submission
from jaxflow.metrics.toy_caption import analyse_toy_caption, toy_caption_metrics, toy_mentions

DATASETS = ("pope", "textvqa", "scienceqa", "chair", "toy_pope", "toy_caption")
PROTOCOLS = ("llava", "lmms", "corrected")
DEFAULT_PROTOCOL = "llava"

# The headline metric of each data set (what a truncation curve plots by default).
PRIMARY_METRIC = {"pope": "f1", "textvqa": "accuracy", "scienceqa": "accuracy", "chair": "chair_s", "toy_pope": "f1",
                  "toy_caption": "chair_s"}


def check_protocol(protocol: str) -> str:
    """The protocol name, or ValueError (one line) naming the valid ones."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown scoring protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    return protocol


def score(dataset: str, predictions: Mapping[str, str], items: Sequence, *,
          protocol: str = DEFAULT_PROTOCOL) -> dict[str, float]:
    """Score predictions (item id -> generated text) against data set items (objects with ``id``,
    ``answers``, ``split`` and ``metadata``, as the loaders return them) under a scoring ``protocol``
    (llava | lmms | corrected); every item needs a prediction and every prediction an item.

    pope: ``pope_metrics`` (plain keys, per category ``"{split}/..."``, ``"macro/..."``) and the same
    with exact-match parsing (keys prefixed ``"exact/"``); textvqa: ``textvqa_accuracy``; scienceqa:
    ``scienceqa_accuracy`` with per-subject accuracies (and ``img/accuracy`` when text-only problems
    are among the items); chair: ``chair_score_items`` (ground truth rebuilt from each item's
    annotations with the protocol's parsing). The toy sets have one protocol: toy_pope is scored as
    POPE under ``protocol``, toy_caption by ``toy_caption_metrics``.
    """
    check_protocol(protocol)
    items = list(items)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("items have duplicate ids")
    if dataset in ("pope", "toy_pope"):
        labels = {it.id: it.answers[0] for it in items}
        cats = {it.id: it.split for it in items}
        out = pope_metrics(predictions, labels, cats, protocol=protocol)
        out.update({f"exact/{k}": v for k, v in
                    pope_metrics(predictions, labels, cats, protocol=protocol, parsing="exact").items()})
        return out
    if dataset == "textvqa":
        unanswered = [it.id for it in items if not it.answers]
        if unanswered:
            raise ValueError(f"{len(unanswered)} TextVQA item(s) have no reference answers (e.g. "
                             f"{unanswered[0]!r}: the test split): write an EvalAI submission file with "
                             "jaxflow.metrics.write_textvqa_submission instead of scoring")
        # LLaVA's script finds answers by (image id, question): reproduced where the items carry both
        keys = {it.id: (it.metadata.get("image_id"), getattr(it, "question", None)) for it in items}
        if any(i is None or q is None for i, q in keys.values()):
            keys = None
        return textvqa_accuracy(predictions, {it.id: list(it.answers) for it in items}, protocol=protocol,
                                annotation_keys=keys)
    if dataset == "scienceqa":
        has_image = {it.id: bool(it.metadata.get("has_image", True)) for it in items}
        return scienceqa_accuracy(
            predictions, {it.id: it.answers[0] for it in items},
            num_choices={it.id: len(it.metadata["choices"]) for it in items},
            categories={it.id: it.metadata.get("subject") or "unknown" for it in items},
            protocol=protocol, has_image=None if all(has_image.values()) else has_image)
    if dataset == "chair":
        return chair_score_items(predictions, items, protocol=protocol)
    if dataset == "toy_caption":
        return toy_caption_metrics(predictions, {it.id: list(it.answers) for it in items})
    raise ValueError(f"unknown data set {dataset!r}; valid: {', '.join(DATASETS)}")


__all__ = [
    "DATASETS", "PROTOCOLS", "DEFAULT_PROTOCOL", "PRIMARY_METRIC", "score", "check_protocol",
    "write_textvqa_submission", "chair_score_items", "toy_caption_metrics", "toy_mentions", "analyse_toy_caption",
    "pope_metrics", "parse_yes_no",
    "textvqa_accuracy", "vqa_accuracy", "normalize_answer",
    "scienceqa_accuracy", "parse_letter",
    "chair_metrics", "caption_objects", "ground_truth_objects", "analyse_caption", "singularize",
]
