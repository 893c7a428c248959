"""Shared helpers of the metric functions: aligning predictions with references."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def align(predictions, references, what: str = "references") -> list[tuple[Any, Any, Any]]:
    """Pair predictions with references: ``[(id, prediction, reference), ...]`` in reference order.

    Both mappings keyed by item id (the keys must be the same set), or both sequences of the
    same length (ids are then the positions). Anything else raises ValueError or
    TypeError naming what does not match.
    """
    if isinstance(predictions, Mapping) and isinstance(references, Mapping):
        missing = [k for k in references if k not in predictions]
        extra = [k for k in predictions if k not in references]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} {what} have no prediction (e.g. {missing[:3]!r})")
            if extra:
                parts.append(f"{len(extra)} predictions have no reference (e.g. {extra[:3]!r})")
            raise ValueError("predictions and " + what + " do not match: " + "; ".join(parts))
        return [(k, predictions[k], references[k]) for k in references]
    if isinstance(predictions, Mapping) or isinstance(references, Mapping):
        raise TypeError("predictions and references must both be mappings (id -> value) or both sequences")
    if isinstance(predictions, (str, bytes)) or not isinstance(predictions, Sequence):
        raise TypeError(f"predictions must be a mapping or a sequence, got {type(predictions).__name__}")
    references = list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} {what}")
    return [(i, p, r) for i, (p, r) in enumerate(zip(predictions, references))]


def lookup(groups, ids: list, positional: bool, name: str) -> list[str] | None:
    """Per-item group labels (e.g. POPE categories) for the aligned ids, or None."""
    if groups is None:
        return None
    if isinstance(groups, Mapping):
        try:
            return [str(groups[i]) for i in ids]
        except KeyError as e:
            raise ValueError(f"{name} has no entry for item {e.args[0]!r}") from None
    groups = list(groups)
    if not positional or len(groups) != len(ids):
        raise ValueError(f"{name}: a sequence needs sequence predictions of the same length ({len(ids)})")
    return [str(g) for g in groups]


def ratio(num: float, den: float) -> float:
    """num / den, and 0.0 when den is 0 (the reference tools divide by zero there)."""
    return float(num) / float(den) if den else 0.0
