"""ScienceQA(-IMG) multiple-choice accuracy from the option letter the model answers.

Every function takes ``protocol``: ``"llava"`` (default), ``"lmms"`` or ``"corrected"``. A
prediction either names an option letter or is *unparsed*; an unparsed prediction, or a letter
that is not one of the problem's options, is counted wrong. In the examples the problem has four
choices (A-D) and the correct answer is B.

``"llava"`` — exactly LLaVA's ``llava/eval/eval_science_qa.py``. The text is used as it is (not
stripped, new lines kept); the first rule that applies gives the letter:

1. the whole text is one of "A", "B", "C", "D", "E": ``"B"`` -> B; but ``" B"``, ``"B\\n"`` and
   ``"b"`` are not (no stripping, no lower case);
2. the text is at least 3 characters and starts with one of A-E followed by ". ":
   ``"B. Paris"`` -> B; but ``"B."`` (2 characters), ``"B.\\nParis"``, ``"B\\nbecause"``,
   ``"(B)"``, ``"B)"`` and ``"B: x"`` are not;
3. the regular expression ``The answer is ([A-Z]).`` (case-sensitive; its "." is any character
   but a new line) matches exactly once: ``"The answer is B."`` -> B, ``"So. The answer is B,
   clearly"`` -> B; but ``"The answer is B"`` at the very end (no character after the letter),
   ``"The answer is B\\n"`` (a new line is no "."), ``"The answer is b."`` and ``"The answer is A.
   The answer is B."`` (two matches) are not.

Otherwise the answer is "FAILED" (unparsed). The letter must then be one of the first
len(choices) letters of A-E (``get_pred_idx``): ``"E"`` or ``"The answer is F."`` with four choices
are wrong (and counted unparsed here). The reference scores every test problem (4,241, text-only
ones included) and prints ``Accuracy`` over all of them and ``IMG-Accuracy`` over those with an
image (``'<image>' in prompt``); see ``has_image`` of ``scienceqa_accuracy``. Note that LLaVA's
generation script (``model_vqa_science.py``) strips the generated text before saving it, so in
LLaVA's pipeline rule 1 sees "B" for a generated " B\\n"; the scoring script itself does not strip.

``"lmms"`` — lmms-eval's ``tasks/scienceqa/utils.py`` (``sqa_process_results``; tasks
``scienceqa_img`` and ``scienceqa``). The text is stripped of surrounding white space, then

1. it equals the correct letter ignoring case: ``"B"``, ``" b\\n"`` -> B (correct);
2. or it is at least 2 characters, its first is an upper-case letter and its second a ".":
   the first character (lower-cased) is compared with the correct letter: ``"B."``,
   ``"B. Paris"``, ``"B.x"`` -> B; but ``"b. Paris"`` (lower case) is not;

anything else is wrong: ``"The answer is B."``, ``"(B)"``, ``"B)"``, ``"B\\nbecause"``. Letters
are not checked against the number of choices (a letter outside them is simply not the correct
one). lmms-eval's prompt equals LLaVA's except that a hint of white space only still gets a
"Context:" line (``load_scienceqa(prompt="lmms")``); it generates at most 16 new tokens.

``"corrected"`` — our fixes (what ``style="lenient"`` was, extended). The text is stripped, then

1. a single letter, either case: ``"B"``, ``" b\\n"`` -> B;
2. an upper-case letter followed by ".", ")" or ":" and then white space or the end: ``"B."``,
   ``"B. Paris"``, ``"B)"``, ``"B: Paris"``, ``"B.\\nParis"`` -> B; but ``"A cat"`` (an article)
   is not;
3. an upper-case letter in parentheses, optionally followed by "." or ":", then white space or
   the end: ``"(B)"``, ``"(B) Paris"``, ``"(B)."`` -> B;
4. an upper-case letter followed by a new line: ``"B\\nbecause ..."`` -> B;
5. else the *last* "The answer is X" / "the answer is (X)" where the letter X is not followed by
   another letter: ``"The answer is B"`` (at the end) -> B, ``"The answer is A. No, the answer
   is B."`` -> B; ``"The answer is Bob"`` is not.

The letter must be one of the problem's options (A.. for its number of choices; A-E when the
number is not given).

``style=`` (the earlier keyword) still works: ``style="llava"`` is ``protocol="llava"``,
``style="lenient"`` is ``protocol="corrected"``.
"""
from __future__ import annotations

import re
import string

from jaxflow.metrics._common import align, lookup, ratio

PROTOCOLS = ("llava", "lmms", "corrected")
STYLES = ("llava", "lenient")  # the earlier name of the parsing choice; see _protocol
LETTERS = string.ascii_uppercase
_LETTER_SET = frozenset(LETTERS)
_REFERENCE_OPTIONS = "ABCDE"  # eval_science_qa.py's --options default
_REFERENCE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
_CORRECTED_LEAD = re.compile(r"(?:\(([A-Z])\)[.:]?|([A-Z])[.):]|([A-Z])(?=\n))(?:\s|$)")
_CORRECTED_ANSWER_IS = re.compile(r"[Tt]he answer is \(?([A-Z])\)?(?![A-Za-z])")


def _protocol(protocol: str, style: str | None) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown ScienceQA protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    if style is None:
        return protocol
    if style not in STYLES:
        raise ValueError(f"unknown ScienceQA parsing style {style!r}; valid: {', '.join(STYLES)}")
    mapped = "llava" if style == "llava" else "corrected"
    if protocol != "llava" and protocol != mapped:
        raise ValueError(f"style={style!r} contradicts protocol={protocol!r}; pass only protocol")
    return mapped


def _llava_letter(text: str) -> str | None:
    if len(text) == 1 and text in _REFERENCE_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in _REFERENCE_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _REFERENCE_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


def _lmms_letter(text: str) -> str | None:
    t = text.strip()
    if len(t) == 1:
        c = t.lower()
    elif len(t) >= 2 and t[0].isupper() and t[1] == ".":
        c = t[0].lower()
    else:
        return None
    # lmms-eval compares c with the lower-cased correct letter, always one of a-z
    return c.upper() if len(c) == 1 and c in string.ascii_lowercase else None


def _corrected_letter(text: str) -> str | None:
    t = text.strip()
    if len(t) == 1 and t.upper() in _LETTER_SET:
        return t.upper()
    m = _CORRECTED_LEAD.match(t)
    if m:
        return m.group(1) or m.group(2) or m.group(3)
    found = _CORRECTED_ANSWER_IS.findall(t)
    return found[-1] if found else None


_PARSERS = {"llava": _llava_letter, "lmms": _lmms_letter, "corrected": _corrected_letter}


def parse_letter(text: str, num_choices: int | None = None, *, protocol: str = "llava",
                 style: str | None = None) -> str | None:
    """The option letter a prediction picks under ``protocol``, or None if it does not parse or
    names no option (A.. for num_choices; under "llava" never past E; A-E when not given)."""
    if not isinstance(text, str):
        raise TypeError(f"a prediction must be a string, got {type(text).__name__}")
    protocol = _protocol(protocol, style)
    options = LETTERS[:num_choices] if num_choices else _REFERENCE_OPTIONS
    if protocol == "llava":
        options = options[:len(_REFERENCE_OPTIONS)]  # options[:len(choices)] of A-E
    letter = _PARSERS[protocol](text)
    return letter if letter is not None and letter in options else None


def scienceqa_accuracy(predictions, references, num_choices=None, categories=None, *,
                       protocol: str = "llava", style: str | None = None,
                       has_image=None) -> dict[str, float]:
    """Letter accuracy under ``protocol`` (see the module docstring).

    predictions: id -> text; references: id -> correct letter ("A".."E") or option index (int)
    (or both sequences, aligned); num_choices: optional id -> number of choices (restricts the
    letters a prediction may name); categories: optional id -> group (e.g. subject);
    has_image: optional id -> bool (does the problem have an image).

    Returns ``accuracy`` (a fraction over every prediction passed; LLaVA's "Accuracy" when all
    4,241 test problems are passed), ``n``, ``unparsed_ratio`` (no letter, or a letter that is no
    option), ``"{group}/accuracy"`` / ``"{group}/n"`` per category, and with has_image:
    ``img/accuracy``, ``img/n`` (the problems with an image: LLaVA's "IMG-Accuracy", the
    ScienceQA-IMG figure) and ``text_only/accuracy``, ``text_only/n`` (0.0 and 0 where empty).
    """
    protocol = _protocol(protocol, style)
    rows = align(predictions, references, "answers")
    ids = [r[0] for r in rows]
    positional = not hasattr(predictions, "keys")
    counts = None
    if num_choices is not None:
        counts = [int(c) for c in lookup(num_choices, ids, positional, "num_choices")]
    correct, unparsed = [], 0
    for i, (_, pred, ref) in enumerate(rows):
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            raise ValueError(f"a ScienceQA reference must be a letter or an index, got {ref!r}")
        gold = LETTERS[ref] if isinstance(ref, int) and 0 <= ref < len(LETTERS) else str(ref).strip().upper()
        if len(gold) != 1 or gold not in LETTERS:
            raise ValueError(f"a ScienceQA reference must be a letter or an index, got {ref!r}")
        letter = parse_letter(pred, counts[i] if counts else None, protocol=protocol)
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
    if has_image is not None:
        flags = _flags(has_image, ids, positional)
        for key, want in (("img", True), ("text_only", False)):
            sel = [c for c, f in zip(correct, flags) if f is want]
            out[f"{key}/accuracy"] = ratio(sum(sel), len(sel))
            out[f"{key}/n"] = float(len(sel))
    return out


def _flags(has_image, ids: list, positional: bool) -> list[bool]:
    if hasattr(has_image, "keys"):
        try:
            values = [has_image[i] for i in ids]
        except KeyError as e:
            raise ValueError(f"has_image has no entry for item {e.args[0]!r}") from None
    else:
        values = list(has_image)
        if not positional or len(values) != len(ids):
            raise ValueError(f"has_image: a sequence needs sequence predictions of the same length ({len(ids)})")
    for v in values:
        if not isinstance(v, bool):
            raise ValueError(f"has_image values must be True or False, got {v!r}")
    return values
