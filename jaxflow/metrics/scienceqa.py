"""ScienceQA(-IMG) multiple-choice accuracy from the letter the model answers.

``style="llava"`` follows LLaVA's ``llava/eval/eval_science_qa.py``: new lines become ". ", then

1. the stripped text is a single option letter ("B"), or
2. the text starts with a letter, ".", and a space ("B. Paris"), or
3. the text contains "The answer is X." / "The answer is X";

else the answer is unparsed (counted wrong). The letter must be one of the problem's options
(A.. for its number of choices; the reference's option list stops at E). "B." alone, "(B)" and
"B)" do not parse in the reference.

``style="lenient"`` accepts in addition a leading letter followed by ".", ")" or ":" and then a
space or the end ("B.", "B)", "(B) Paris", "B: Paris"). The reference behaviour is the default.
"""
from __future__ import annotations

import re
import string

from jaxflow.metrics._common import align, lookup, ratio

STYLES = ("llava", "lenient")
LETTERS = string.ascii_uppercase
_REFERENCE_OPTIONS = "ABCDE"
_ANSWER_IS_DOT = re.compile(r"The answer is ([A-E])\.")
_ANSWER_IS = re.compile(r"The answer is ([A-E])")
_LENIENT_LEAD = re.compile(r"^\(?([A-Z])(?:[.):](?:\s|$)|\)|$)")


def parse_letter(text: str, num_choices: int | None = None, *, style: str = "llava") -> str | None:
    """The option letter a prediction picks, or None if it does not parse (or names no option)."""
    if not isinstance(text, str):
        raise TypeError(f"a prediction must be a string, got {type(text).__name__}")
    if style not in STYLES:
        raise ValueError(f"unknown ScienceQA parsing style {style!r}; valid: {', '.join(STYLES)}")
    options = LETTERS[:num_choices] if num_choices else _REFERENCE_OPTIONS
    if style == "llava":
        options = "".join(c for c in options if c in _REFERENCE_OPTIONS)
    t = text.replace("\n", ". ")
    letter = None
    if t.strip() in options and len(t.strip()) == 1:
        letter = t.strip()
    elif len(t) >= 3 and t[0] in options and t[1:3] == ". ":
        letter = t[0]
    elif style == "lenient" and (m := _LENIENT_LEAD.match(t.strip())):
        letter = m.group(1)
    elif "The answer is " in t:
        m = _ANSWER_IS_DOT.search(t) or _ANSWER_IS.search(t)
        letter = m.group(1) if m else None
    return letter if letter is not None and letter in options else None


def scienceqa_accuracy(predictions, references, num_choices=None, categories=None, *,
                       style: str = "llava") -> dict[str, float]:
    """Letter accuracy. predictions: id -> text; references: id -> correct letter ("A".."E") or
    option index (int); num_choices: optional id -> number of choices (restricts the letters a
    prediction may name); categories: optional id -> group (e.g. subject) for per-group accuracy.
    Returns ``accuracy``, ``n``, ``unparsed_ratio`` and ``"{group}/accuracy"`` / ``"{group}/n"``.
    """
    rows = align(predictions, references, "answers")
    ids = [r[0] for r in rows]
    positional = not hasattr(predictions, "keys")
    counts = None
    if num_choices is not None:
        counts = [int(c) for c in lookup(num_choices, ids, positional, "num_choices")]
    correct, unparsed = [], 0
    for i, (_, pred, ref) in enumerate(rows):
        gold = LETTERS[ref] if isinstance(ref, int) else str(ref).strip().upper()
        if len(gold) != 1 or gold not in LETTERS:
            raise ValueError(f"a ScienceQA reference must be a letter or an index, got {ref!r}")
        letter = parse_letter(pred, counts[i] if counts else None, style=style)
        unparsed += letter is None
        correct.append(letter == gold)
    out = {"accuracy": ratio(sum(correct), len(rows)), "n": float(len(rows)),
           "unparsed_ratio": ratio(unparsed, len(rows))}
    groups = lookup(categories, ids, positional, "categories")
    if groups is not None:
        for g in dict.fromkeys(groups):
            sel = [c for c, gg in zip(correct, groups) if gg == g]
            out[f"{g}/accuracy"] = ratio(sum(sel), len(sel))
            out[f"{g}/n"] = float(len(sel))
    return out
