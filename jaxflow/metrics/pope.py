"""POPE (Li et al., EMNLP 2023): yes/no object probing, scored as binary classification.

"yes" is the positive class. ``pope_metrics(..., protocol=)`` picks the answer parsing and the
counting; ``parsing=`` (the earlier keyword) overrides the protocol's parsing.

Protocols:

- ``"llava"`` (default) — LLaVA's ``llava/eval/eval_pope.py`` (identical to POPE's own
  ``evaluate.py``). Parsing: keep the text before the first "." (if any), delete commas, split
  on single spaces; the answer is "no" if one of the words is exactly ``No``, ``no`` or ``not``,
  else "yes". Everything parses, and the rule is case-sensitive and word-exact:
  ``"No, there is not."`` -> no; ``"Yes, there is a dog. No cat."`` -> yes (first sentence);
  ``"NO"``, ``"Nope"``, ``"There isn't a dog."`` and ``"no\\n"`` (the word is "no\\n") -> yes.
- ``"lmms"`` — lmms-eval's ``tasks/pope/utils.py``. Parsing: lower-case and strip white space;
  the answer must then be exactly "yes" or "no", anything else is *unparsed*:
  ``" Yes\\n"`` -> yes, ``"NO"`` -> no, ``"Yes."`` and ``"No, there is not."`` -> unparsed.
  Counting: accuracy = answers equal to the label / N (unparsed are wrong); precision =
  TP / (TP + FP) with FP = label no and answer yes; recall = TP / (TP + FN') where FN' counts
  only label yes *and answer exactly "no"* — an unparsed answer to a yes-question is in no
  denominator of recall (with the llava counting it is a false negative); F1 = 2PR / (P + R).
  lmms-eval's ``pope_yes_ratio`` is the share of *labels* that are "yes" (a bug: 0.5 on every
  balanced POPE split whatever the model says); we report it as ``lmms_reported_yes_ratio``
  (lmms protocol only) and, like every protocol, ``yes_ratio`` = the share of *answers* that
  are "yes". lmms-eval's ``pope`` task scores the three categories pooled (our plain keys);
  ``pope_random`` / ``pope_pop`` / ``pope_adv`` one category each (``"{category}/..."``).
- ``"corrected"`` — the LLaVA rule with its blind spots fixed: strip white space; keep the text
  before the first ".", "!", "?" or new line; lower-case; words are the runs of letters and
  apostrophes; the answer is "no" if a word is ``no``, ``not``, ``nope`` or ``cannot`` or ends
  in ``n't`` / ``n’t``, else "yes". Everything parses: ``"NO"``, ``"Nope."``, ``"There isn't a
  dog."``, ``"No!"``, ``"no\\n"`` -> no; ``"Yes, there is a dog. No cat."``, ``"Yes! No cat"`` ->
  yes (first sentence). Counting as llava.

Parsings for ``parsing=`` / ``parse_yes_no``: the three above and ``"exact"`` (lower-case, strip
white space and one trailing "." / "!", then "yes" or "no", else unparsed). ``contractions=True``
adds the "n't" words to the llava parsing (the default of the corrected parsing; the reference
code has no such rule).

Metrics (fractions in [0, 1]): accuracy = (TP + TN) / N, precision = TP / (TP + FP), recall =
TP / (TP + FN), F1, yes_ratio = answers parsed "yes" / N, unparsed_ratio; 0.0 where a
denominator is 0 (the LLaVA reference divides by zero, lmms-eval also returns 0). Counts
``tp``, ``fp``, ``tn``, ``fn`` (label yes and answer not "yes", unparsed included) and ``n``.
With categories (POPE's random / popular / adversarial splits), ``"{category}/{metric}"`` for
each, the pooled metrics over all items under the plain names, and ``"macro/{metric}"`` — the
mean over categories (how LLaVA-1.5's paper averages POPE F1).

Worked example: answers / labels ``"yes"/yes, "Yes."/yes, "no"/yes, "yes"/no, "no"/no,
"NO"/no``.

- lmms: parsed yes, unparsed, no, yes, no, no: TP 1, FP 1, TN 2, FN' 1 (the unparsed
  yes-question is left out); accuracy 3/6, precision 1/2, recall 1/2, F1 1/2, yes_ratio 2/6,
  lmms_reported_yes_ratio 3/6. (With the llava counting the same parsing gives recall 1/3.)
- llava: parsed yes, yes, no, yes, no, yes ("NO" is no word of the rule): TP 2, FP 2, TN 1,
  FN 1; accuracy 3/6, precision 2/4, recall 2/3, F1 4/7, yes_ratio 4/6.
- corrected: parsed yes, yes, no, yes, no, no: TP 2, FP 1, TN 2, FN 1; accuracy 4/6,
  precision 2/3, recall 2/3, F1 2/3, yes_ratio 3/6.
"""
from __future__ import annotations

import re

from jaxflow.metrics._common import align, lookup, ratio

PROTOCOLS = ("llava", "lmms", "corrected")
PARSINGS = ("llava", "exact", "lmms", "corrected")
_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
_SENTENCE_END = re.compile(r"[.!?\n]")
_WORD = re.compile(r"[a-z'’]+")
_NO_WORDS = frozenset({"no", "not", "nope", "cannot"})


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown POPE protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")


def parse_yes_no(text: str, parsing: str | None = None, *, protocol: str = "llava",
                 contractions: bool | None = None) -> str:
    """One answer -> "yes", "no", or "other" (unparsed; exact and lmms parsings only).

    parsing: one of PARSINGS, default the protocol's; contractions: count "n't" words as "no"
    (llava and corrected parsings; default: True for corrected, False for llava).
    """
    if not isinstance(text, str):
        raise TypeError(f"an answer must be a string, got {type(text).__name__}")
    _check_protocol(protocol)
    if parsing is None:
        parsing = protocol
    if parsing == "llava":
        if "." in text:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        if "No" in words or "not" in words or "no" in words:
            return "no"
        if contractions and any(w.endswith(("n't", "n’t")) for w in words):
            return "no"
        return "yes"
    if parsing == "corrected":
        t = text.strip()
        m = _SENTENCE_END.search(t)
        if m:
            t = t[:m.start()]
        words = _WORD.findall(t.lower())
        if any(w in _NO_WORDS for w in words):
            return "no"
        if (contractions is None or contractions) and any(w.endswith(("n't", "n’t")) for w in words):
            return "no"
        return "yes"
    if parsing == "lmms":
        t = text.lower().strip()
        return t if t in ("yes", "no") else "other"
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


def _scores(pairs: list[tuple[str, str]], protocol: str) -> dict[str, float]:
    tp = sum(p == "yes" and y == "yes" for p, y in pairs)
    fp = sum(p == "yes" and y == "no" for p, y in pairs)
    tn = sum(p == "no" and y == "no" for p, y in pairs)
    fn = sum(p != "yes" and y == "yes" for p, y in pairs)
    other = sum(p == "other" for p, _ in pairs)
    n = len(pairs)
    # lmms-eval's recall counts as false negatives only the yes-questions answered exactly "no"
    fn_recall = sum(p == "no" and y == "yes" for p, y in pairs) if protocol == "lmms" else fn
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn_recall)
    out = {
        "accuracy": ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": ratio(2 * precision * recall, precision + recall),
        "yes_ratio": ratio(tp + fp, n),
        "unparsed_ratio": ratio(other, n),
        "n": float(n), "tp": float(tp), "fp": float(fp), "tn": float(tn), "fn": float(fn),
    }
    if protocol == "lmms":
        out["lmms_reported_yes_ratio"] = ratio(sum(y == "yes" for _, y in pairs), n)
    return out


def pope_metrics(predictions, references, categories=None, *, protocol: str = "llava",
                 parsing: str | None = None, contractions: bool | None = None) -> dict[str, float]:
    """POPE metrics of answers against "yes"/"no" labels under ``protocol`` (module docstring).

    predictions: id -> answer text; references: id -> label (or both sequences, aligned);
    categories: optional id -> split/category (or a sequence aligned with sequence inputs).
    parsing: override the protocol's answer parsing (one of PARSINGS; the counting stays the
    protocol's); contractions: see ``parse_yes_no``.
    """
    _check_protocol(protocol)
    rows = align(predictions, references, "labels")
    ids = [r[0] for r in rows]
    pairs = [(parse_yes_no(p, parsing, protocol=protocol, contractions=contractions), _label(y))
             for _, p, y in rows]
    out = _scores(pairs, protocol)
    cats = lookup(categories, ids, not hasattr(predictions, "keys"), "categories")
    if cats is not None:
        names = list(dict.fromkeys(cats))
        per = {}
        for c in names:
            per[c] = _scores([pr for pr, cc in zip(pairs, cats) if cc == c], protocol)
            out.update({f"{c}/{k}": v for k, v in per[c].items()})
        keys = _METRICS + (("lmms_reported_yes_ratio",) if protocol == "lmms" else ())
        for k in keys:
            out[f"macro/{k}"] = sum(per[c][k] for c in names) / len(names) if names else 0.0
    return out
