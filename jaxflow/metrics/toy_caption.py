"""CHAIR for the toy shapes captions: the objects are (colour, shape) pairs.

A caption mentions an object each time a colour word is directly followed by a shape word ("a red
circle"); a mention is hallucinated when the image has no object of that colour and shape.
CHAIR_i = hallucinated mentions / all mentions (0 when there are none), CHAIR_s = share of captions
with at least one hallucinated mention, recall = share of the images' objects mentioned, and
exact = share of captions whose set of mentions equals the image's objects, and empty_ratio = share
of captions that mention no object at all. An empty caption (or one naming no coloured shape)
hallucinates nothing, so it lowers CHAIR_s and CHAIR_i; only recall (0 for it) shows what it
missed, which is why every summary of a caption set reports recall and empty_ratio beside CHAIR.
"""
from __future__ import annotations

import re

from jaxflow.metrics._common import align, ratio
from jaxflow.toy.data import COLORS, SHAPES

_MENTION = re.compile(r"\b(" + "|".join(COLORS) + r")\s+(" + "|".join(SHAPES) + r")s?\b")


def toy_mentions(caption: str) -> list[str]:
    """The "colour shape" mentions of a caption, in order."""
    return [f"{c} {s}" for c, s in _MENTION.findall(caption.lower())]


def analyse_toy_caption(caption: str, objects) -> dict:
    """{"mentioned": [...], "hallucinated": [...], "covered": [...]} for one caption and the image's
    objects ("colour shape" strings)."""
    gt = set(objects)
    mentioned = toy_mentions(caption)
    return {"mentioned": mentioned, "hallucinated": [m for m in mentioned if m not in gt],
            "covered": sorted(gt & set(mentioned))}


def toy_caption_metrics(predictions, references) -> dict[str, float]:
    """predictions: id -> caption; references: id -> the image's objects ("colour shape" strings)."""
    rows = align(predictions, references)
    mentions = halluc = bad = gt = covered = exact = empty = 0
    for _, pred, objs in rows:
        a = analyse_toy_caption(pred, objs)
        mentions += len(a["mentioned"])
        halluc += len(a["hallucinated"])
        bad += bool(a["hallucinated"])
        gt += len(set(objs))
        covered += len(a["covered"])
        exact += set(a["mentioned"]) == set(objs)
        empty += not a["mentioned"]
    n = len(rows)
    return {"chair_s": ratio(bad, n), "chair_i": ratio(halluc, mentions), "recall": ratio(covered, gt),
            "exact": ratio(exact, n), "empty_ratio": ratio(empty, n)}
