"""TextVQA accuracy: the VQA soft accuracy with the standard answer normalisation.

Every function takes ``protocol``: ``"llava"`` (default), ``"lmms"`` or ``"corrected"``. All three
normalise answers the same way: the ``EvalAIAnswerProcessor`` of LLaVA's ``m4c_evaluator.py``
(from facebookresearch/mmf, the EvalAI port of the official VQA evaluation ``vqaEval.py``;
lmms-eval's ``tasks/_task_utils/vqa_eval_metric.py`` is the same processor, contraction table
included). Prediction and every human answer are normalised:

1. lower-case; delete "," and "?"; "'s" -> " 's"; new lines and tabs -> spaces; strip
   (``"What's it?"`` -> ``"what 's it"``);
2. punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: each mark is deleted if it is
   written next to a space somewhere in the answer, else replaced by a space
   (``"coca-cola"`` -> ``"coca cola"``, ``"coca - cola"`` -> ``"coca  cola"`` -> ``"coca cola"``);
3. a "." not followed by a digit is deleted (``"3.5"`` keeps its point, ``"st."`` -> ``"st"``) —
   at most 32 of them, as the reference passes ``re.UNICODE`` (= 32) where ``re.sub`` takes its
   count;
4. per word: number words "none", "zero" .. "ten" -> digits; articles "a", "an", "the" dropped;
   the contractions table ("dont" -> "don't", ...); words joined by single spaces
   (``"The Two dogs"`` -> ``"2 dogs"``).

Score of one prediction against its n (= 10) answers: for each answer left out, min(1, number of
the other n - 1 answers equal to the prediction / 3); the mean over the n leave-one-out subsets.
With 10 answers of which k equal the prediction: k = 0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9,
>= 4 -> 1. The data set's accuracy is the mean over questions (a fraction; the scripts print x100).

``"llava"`` — what ``llava/eval/eval_textvqa.py`` computes (``TextVQAAccuracyEvaluator``): the
mean over the 10 subsets is a float sum divided by 10 (``sum(accs) / len(accs)``). LLaVA finds a
prediction's human answers by the key (image id, lower-cased question), and a later annotation
with the same key replaces an earlier one: two questions with the same text on the same image
are both scored against the *last* one's answers. Pass ``annotation_keys`` (id -> (image_id,
question)) to reproduce that; without it every prediction is scored against its own answers.
(The reference asserts exactly 10 answers per question; we accept any number >= 1.)

``"lmms"`` — lmms-eval's ``tasks/textvqa/utils.py`` (``textvqa_process_results``): the same
normalisation and formula, every prediction against its own answers, and the per-question mean
taken by ``statistics.mean`` (exact, rounded once), so a score can differ from llava's in the
last bit: with the 4th and 5th of 10 answers matching, the ten subset scores are 2/3, 2/3, 2/3,
1/3, 1/3, 2/3, 2/3, 2/3, 2/3, 2/3; llava sums them left to right in floating point and divides
by 10 (0.6000000000000001), lmms gives 0.6. lmms-eval's prompt differs (``load_textvqa(prompt="lmms")``:
the question ``str.capitalize()``-d, no OCR line by default).

``"corrected"`` — the normalisation above (it is what the official EvalAI server applies, so we
keep it, 32-period cap included) with every prediction scored against its own answers:
``annotation_keys`` is ignored. Without ``annotation_keys`` it equals llava exactly.

``write_textvqa_submission`` writes the EvalAI upload file of a split without answers (test):
a JSON list of ``{"question_id": int, "answer": normalised prediction}``, as LLaVA's
``scripts/convert_*_for_submission.py`` and lmms-eval's submission do (``"Two dogs."`` ->
``"2 dogs"``).
"""
from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
from collections.abc import Sequence

from jaxflow.metrics._common import align, ratio

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
PROTOCOLS = ("llava", "lmms", "corrected")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
               "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: effectively "a '.' not followed by a digit"
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_REFERENCE_PERIOD_COUNT = 32  # re.UNICODE passed as re.sub's count in the reference


def normalize_answer(text: str) -> str:
    """An answer in the form the VQA/TextVQA evaluation compares ("Two dogs." -> "2 dogs")."""
    if not isinstance(text, str):
        raise TypeError(f"an answer must be a string, got {type(text).__name__}")
    s = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    s = s.replace("\n", " ").replace("\t", " ").strip()
    out = s
    has_digit_comma = _COMMA_STRIP.search(s) is not None
    for p in PUNCTUATION:
        if (p + " " in s or " " + p in s) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out, count=_REFERENCE_PERIOD_COUNT)
    words = []
    for w in out.lower().split():
        w = NUMBER_WORDS.get(w, w)
        if w not in ARTICLES:
            words.append(CONTRACTIONS.get(w, w))
    return " ".join(words)


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown TextVQA protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")


def _soft_score(pred: str, gts: list[str], protocol: str) -> float:
    matches = sum(g == pred for g in gts)
    # leaving out answer i: the others match (matches - [gts[i] == pred]) times
    accs = [min(1.0, (matches - (g == pred)) / 3.0) for g in gts]
    if protocol == "lmms":
        return float(statistics.mean(accs))
    return sum(accs) / len(accs)


def vqa_accuracy(prediction: str, answers: Sequence[str], *, protocol: str = "llava") -> float:
    """Soft accuracy of one prediction: mean over leave-one-out subsets of min(1, matches / 3)."""
    _check_protocol(protocol)
    if isinstance(answers, str) or not len(answers):
        raise ValueError("answers must be a non-empty list of strings")
    return _soft_score(normalize_answer(prediction), [normalize_answer(a) for a in answers], protocol)


def textvqa_accuracy(predictions, references, *, protocol: str = "llava",
                     annotation_keys=None) -> dict[str, float]:
    """Mean VQA accuracy under ``protocol`` (module docstring). predictions: id -> answer;
    references: id -> the human answers (10 in TextVQA), or both sequences; annotation_keys:
    optional id -> (image_id, question) (llava only: LLaVA's lookup by image and lower-cased
    question, the last of equal keys winning). Returns ``accuracy`` (a fraction) and ``n``."""
    _check_protocol(protocol)
    rows = align(predictions, references, "answer lists")
    answers = [a for _, _, a in rows]
    if protocol == "llava" and annotation_keys is not None:
        keys = []
        for i, _, _ in rows:
            try:
                image_id, question = annotation_keys[i]
            except (KeyError, IndexError):
                raise ValueError(f"annotation_keys has no entry for item {i!r}") from None
            except (TypeError, ValueError):
                raise ValueError(f"annotation_keys[{i!r}] must be (image_id, question)") from None
            keys.append((image_id, str(question).lower()))
        last = dict(zip(keys, answers))  # a later item with the same key replaces an earlier one
        answers = [last[k] for k in keys]
    total = sum(vqa_accuracy(p, a, protocol=protocol) for (_, p, _), a in zip(rows, answers))
    return {"accuracy": ratio(total, len(rows)), "n": float(len(rows))}


def _question_id(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: a question id must be an integer, got {value!r}")
    if isinstance(value, str):
        if not value.strip().lstrip("-").isdigit():
            raise ValueError(f"{where}: a question id must be an integer, got {value!r}")
        return int(value)
    return value


def write_textvqa_submission(predictions, items_or_question_ids, path: str) -> str:
    """Write the EvalAI submission file of TextVQA predictions; returns ``path``.

    predictions: id -> generated text (keyed by item id, i.e. the question id as a string, or by
    the question id as given), or a sequence aligned with items_or_question_ids;
    items_or_question_ids: ``load_textvqa`` items (their ``metadata["question_id"]``, else their
    id) or question ids, in the order to write. Writes a JSON list of ``{"question_id": int,
    "answer": normalize_answer(prediction)}``. Every question needs a prediction and every
    prediction a question; the file is written to a temporary file in the same folder and then
    renamed over ``path``, so a failed write leaves no partial file.
    """
    entries = list(items_or_question_ids)
    if not entries:
        raise ValueError("no questions to write")
    qids, keys = [], []
    for n, e in enumerate(entries):
        if hasattr(e, "id") and hasattr(e, "metadata"):
            raw = e.metadata.get("question_id", e.id)
            qids.append(_question_id(raw, f"item {e.id!r}"))
            keys.append((e.id, raw, str(raw)))
        else:
            qids.append(_question_id(e, f"entry {n}"))
            keys.append((e, str(e)))
    seen = set()
    for q in qids:
        if q in seen:
            raise ValueError(f"question id {q} is listed twice")
        seen.add(q)
    if hasattr(predictions, "keys"):
        texts, used, missing = [], set(), []
        for q, ks in zip(qids, keys):
            k = next((k for k in ks if k in predictions), None)
            if k is None:
                missing.append(q)
            else:
                used.add(k)
                texts.append(predictions[k])
        extra = [k for k in predictions if k not in used]
        if missing:
            raise ValueError(f"{len(missing)} of {len(qids)} questions have no prediction (e.g. {missing[:3]!r})")
        if extra:
            raise ValueError(f"{len(extra)} predictions name no listed question (e.g. {extra[:3]!r})")
    else:
        if isinstance(predictions, (str, bytes)):
            raise TypeError("predictions must be a mapping or a sequence, got str")
        texts = list(predictions)
        if len(texts) != len(qids):
            raise ValueError(f"{len(texts)} predictions for {len(qids)} questions")
    rows = []
    for q, t in zip(qids, texts):
        if not isinstance(t, str):
            raise TypeError(f"question {q}: a prediction must be a string, got {type(t).__name__}")
        rows.append({"question_id": q, "answer": normalize_answer(t)})
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(rows, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
