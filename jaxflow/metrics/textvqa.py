"""TextVQA accuracy: the VQA soft accuracy with the standard answer normalisation.

Follows what LLaVA's ``llava/eval/eval_textvqa.py`` runs: ``TextVQAAccuracyEvaluator`` and
``EvalAIAnswerProcessor`` of ``m4c_evaluator.py`` (from facebookresearch/mmf, itself the EvalAI
port of the official VQA evaluation, ``vqaEval.py``). Prediction and every human answer are
normalised the same way:

1. lower-case; delete "," and "?"; "'s" -> " 's"; new lines and tabs -> spaces; strip;
2. punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: each mark is deleted if it is
   written next to a space somewhere in the answer, else replaced by a space;
3. a "." not followed by a digit is deleted ("3.5" keeps its point) — at most 32 of them, as the
   reference passes ``re.UNICODE`` (= 32) where ``re.sub`` takes its count;
4. per word: number words "none", "zero" .. "ten" -> digits; articles "a", "an", "the" dropped;
   the contractions table ("dont" -> "don't", ...); words joined by single spaces.

Score of one prediction against its n (= 10) answers: for each answer left out, min(1, number of
the other n - 1 answers equal to the prediction / 3); the mean over the n leave-one-out subsets.
With 10 answers of which k equal the prediction: k = 0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1.
"""
from __future__ import annotations

import re
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


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Soft accuracy of one prediction: mean over leave-one-out subsets of min(1, matches / 3)."""
    if isinstance(answers, str) or not len(answers):
        raise ValueError("answers must be a non-empty list of strings")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    matches = sum(g == pred for g in gts)
    # leaving out answer i: the others match (matches - [gts[i] == pred]) times
    accs = [min(1.0, (matches - (g == pred)) / 3.0) for g in gts]
    return sum(accs) / len(accs)


def textvqa_accuracy(predictions, references) -> dict[str, float]:
    """Mean VQA accuracy. predictions: id -> answer; references: id -> the human answers (10 in
    TextVQA), or both sequences. Returns ``accuracy`` (a fraction; LLaVA prints x100) and ``n``."""
    rows = align(predictions, references, "answer lists")
    total = sum(vqa_accuracy(p, a) for _, p, a in rows)
    return {"accuracy": ratio(total, len(rows)), "n": float(len(rows))}
