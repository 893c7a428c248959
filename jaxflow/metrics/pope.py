"""POPE (Li et al., EMNLP 2023): yes/no object probing, scored as binary classification.

"yes" is the positive class. Two answer parsings:

- ``"llava"`` — LLaVA's ``llava/eval/eval_pope.py`` (identical to POPE's own ``evaluate.py``):
  keep the text before the first "." (if any), delete commas, split on single spaces; the answer
  is "no" if one of the words is exactly ``No``, ``no`` or ``not``, else "yes". Everything parses,
  and the rule is case-sensitive and word-exact: "NO", "Nope" and "isn't" parse as "yes".
  ``contractions=True`` also counts words ending in "n't" (as the rule is often described; the
  reference code does not).
- ``"exact"`` — lower-cased exact match: strip white space and one trailing "." / "!", then
  "yes" or "no"; anything else is *unparsed*: never correct, and not a "yes".

Metrics (fractions in [0, 1]): accuracy = (TP + TN) / N, precision = TP / (TP + FP), recall =
TP / (TP + FN), F1, yes_ratio = predicted "yes" / N, unparsed_ratio; 0.0 where a denominator is
0 (the reference divides by zero). With categories (POPE's random / popular / adversarial splits),
``"{category}/{metric}"`` for each, the pooled metrics over all items under the plain names, and
``"macro/{metric}"`` — the mean over categories (how LLaVA-1.5's paper averages POPE F1).
"""
from __future__ import annotations

from jaxflow.metrics._common import align, lookup, ratio

PARSINGS = ("llava", "exact")
_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def parse_yes_no(text: str, parsing: str = "llava", *, contractions: bool = False) -> str:
    """One answer -> "yes", "no", or (exact parsing only) "other"."""
    if not isinstance(text, str):
        raise TypeError(f"an answer must be a string, got {type(text).__name__}")
    if parsing == "llava":
        if "." in text:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        if "No" in words or "not" in words or "no" in words:
            return "no"
        if contractions and any(w.endswith(("n't", "n’t")) for w in words):
            return "no"
        return "yes"
    if parsing == "exact":
        t = text.strip().lower()
        if t.endswith((".", "!")):
            t = t[:-1].rstrip()
        return t if t in ("yes", "no") else "other"
    raise ValueError(f"unknown POPE parsing {parsing!r}; valid: {', '.join(PARSINGS)}")


def _label(value) -> str:
    v = str(value).strip().lower()
    if v not in ("yes", "no"):
        raise ValueError(f"a POPE label must be 'yes' or 'no', got {value!r}")
    return v


def _scores(pairs: list[tuple[str, str]]) -> dict[str, float]:
    tp = sum(p == "yes" and y == "yes" for p, y in pairs)
    fp = sum(p == "yes" and y == "no" for p, y in pairs)
    tn = sum(p == "no" and y == "no" for p, y in pairs)
    fn = sum(p != "yes" and y == "yes" for p, y in pairs)
    other = sum(p == "other" for p, _ in pairs)
    n = len(pairs)
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "accuracy": ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": ratio(2 * precision * recall, precision + recall),
        "yes_ratio": ratio(tp + fp, n),
        "unparsed_ratio": ratio(other, n),
        "n": float(n), "tp": float(tp), "fp": float(fp), "tn": float(tn), "fn": float(fn),
    }


def pope_metrics(predictions, references, categories=None, *, parsing: str = "llava",
                 contractions: bool = False) -> dict[str, float]:
    """POPE metrics of answers against "yes"/"no" labels.

    predictions: id -> answer text; references: id -> label (or both sequences, aligned);
    categories: optional id -> split/category (or a sequence aligned with sequence inputs).
    """
    rows = align(predictions, references, "labels")
    ids = [r[0] for r in rows]
    pairs = [(parse_yes_no(p, parsing, contractions=contractions), _label(y)) for _, p, y in rows]
    out = _scores(pairs)
    cats = lookup(categories, ids, not hasattr(predictions, "keys"), "categories")
    if cats is not None:
        names = list(dict.fromkeys(cats))
        per = {}
        for c in names:
            per[c] = _scores([pr for pr, cc in zip(pairs, cats) if cc == c])
            out.update({f"{c}/{k}": v for k, v in per[c].items()})
        for k in _METRICS:
            out[f"macro/{k}"] = sum(per[c][k] for c in names) / len(names) if names else 0.0
    return out
