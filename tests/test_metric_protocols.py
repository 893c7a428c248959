"""Scoring protocols (llava / lmms / corrected) of ScienceQA, POPE and TextVQA.

Every expected value is derived by hand from the official rules, with the reasoning in a comment:
LLaVA's llava/eval/eval_science_qa.py, eval_pope.py, eval_textvqa.py + m4c_evaluator.py, and
lmms-eval's tasks/scienceqa/utils.py, tasks/pope/utils.py, tasks/textvqa/utils.py.
"""
from __future__ import annotations

import json
import os

import pytest

from jaxflow.data.datasets import load_dataset
from jaxflow.data.fixtures import write_fixtures
from jaxflow.metrics.pope import parse_yes_no, pope_metrics
from jaxflow.metrics.scienceqa import parse_letter, scienceqa_accuracy
from jaxflow.metrics.textvqa import textvqa_accuracy, vqa_accuracy, write_textvqa_submission

PROTOCOLS = ("llava", "lmms", "corrected")
SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


@pytest.mark.parametrize("fn", [
    lambda p: parse_letter("B", 4, protocol=p),
    lambda p: scienceqa_accuracy(["B"], ["B"], protocol=p),
    lambda p: parse_yes_no("yes", protocol=p),
    lambda p: pope_metrics(["yes"], ["yes"], protocol=p),
    lambda p: vqa_accuracy("x", ["x"], protocol=p),
    lambda p: textvqa_accuracy(["x"], [["x"]], protocol=p),
])
def test_unknown_protocol_names_the_valid_ones(fn):
    for p in PROTOCOLS:
        fn(p)
    with pytest.raises(ValueError, match="llava, lmms, corrected"):
        fn("official")


# ---------------------------------------------------------------- ScienceQA

# (prediction, num_choices): the letter under (llava, lmms, corrected); None = unparsed / no option.
SQA_CASES = [
    # llava rule 1 (text in ["A".."E"]); lmms rule 1 (stripped text == letter, any case); corrected 1
    (("B", 4), ("B", "B", "B")),
    # surrounding white space: llava does not strip -> " B" is not in the list, " B"[0] is no option,
    # no "The answer is" -> FAILED; lmms and corrected strip first
    ((" B", 4), (None, "B", "B")),
    (("B\n", 4), (None, "B", "B")),      # llava: "B\n" != "B" and len 2 < 3 -> FAILED
    # a new line after the letter: llava text[1:3] == "\nb" != ". " -> FAILED; lmms: "B\nbecause"[1]
    # is "\n", not "." -> wrong; corrected rule 4 (letter then new line)
    (("B\nbecause it is blue", 4), (None, None, "B")),
    # "The answer is B" at the very end: the reference regex needs one more character after the
    # letter -> no match -> FAILED; lmms has no such rule; corrected rule 5
    (("The answer is B", 4), (None, None, "B")),
    # the regex's "." is any character but a new line: "\n" after the letter does not match
    (("The answer is B\n", 4), (None, None, "B")),
    # exactly one match -> B; lmms: "T" then "h" (not ".") -> wrong
    (("The answer is B.", 4), ("B", None, "B")),
    # "." matches "," too, and the match may be anywhere ("So." is not a leading letter)
    (("So. The answer is B, clearly", 4), ("B", None, "B")),
    # "." matches "o": llava reads B from "Bob"; corrected needs a non-letter after the letter
    (("The answer is Bob", 4), ("B", None, None)),
    # two matches -> len(res) == 2 -> FAILED; corrected takes the last
    (("The answer is A. The answer is B.", 4), (None, None, "B")),
    # lower case: llava's list and [A-Z] are upper case -> FAILED; lmms compares lower-cased; corrected 1
    (("b", 4), (None, "B", "B")),
    # "b. Paris": llava "b" is no option; lmms rule 2 needs an upper-case first character
    (("b. Paris", 4), (None, None, None)),
    # a letter outside the choices: llava get_pred_idx("E", 4 choices) = -1; lmms "e" != "b" (wrong);
    # corrected: E is no option of 4
    (("E", 4), (None, None, None)),
    (("The answer is F.", 4), (None, None, None)),
    # six choices: llava's options stop at E (options[:6] of A-E has no F); lmms and corrected take F
    (("F", 6), (None, "F", "F")),
    # llava rule 2 (>= 3 characters, letter, ". "); lmms rule 2 (upper-case letter, "."); corrected 2
    (("B. Paris", 4), ("B", "B", "B")),
    (("B.", 4), (None, "B", "B")),       # llava: 2 characters < 3, no regex match -> FAILED
    (("B.\nParis", 4), (None, "B", "B")),  # llava: text[1:3] == ".\n" != ". "
    (("B.x", 4), (None, "B", None)),      # lmms: upper-case "B", then "." -> B; corrected needs a space
    (("(B)", 4), (None, None, "B")),      # only corrected rule 3
    (("(B) Paris", 4), (None, None, "B")),
    (("B)", 4), (None, None, "B")),       # only corrected rule 2
    (("B: Paris", 4), (None, None, "B")),
    (("A cat", 4), (None, None, None)),   # a leading article is no answer under any protocol
    (("", 4), (None, None, None)),
]


@pytest.mark.parametrize("case, expected", SQA_CASES, ids=[repr(c[0][0]) for c in SQA_CASES])
def test_scienceqa_parsing_per_protocol(case, expected):
    text, n = case
    got = tuple(parse_letter(text, n, protocol=p) for p in PROTOCOLS)
    assert got == expected


def test_scienceqa_accuracy_per_protocol():
    # gold B, 4 choices; per protocol the cases above whose letter is "B" are correct
    rows = [c for c in SQA_CASES if c[0][1] == 4]
    preds = [c[0][0] for c in rows]
    for k, p in enumerate(PROTOCOLS):
        want_correct = sum(c[1][k] == "B" for c in rows)
        want_unparsed = sum(c[1][k] is None for c in rows)
        m = scienceqa_accuracy(preds, ["B"] * len(rows), [4] * len(rows), protocol=p)
        assert m["accuracy"] == pytest.approx(want_correct / len(rows))
        assert m["unparsed_ratio"] == pytest.approx(want_unparsed / len(rows))
    # counted by hand from the table: llava 5 of 24 (B, "The answer is B.", "So. ...", "Bob",
    # "B. Paris"); lmms 8 (B, " B", "B\n", "b", "B. Paris", "B.", "B.\nParis", "B.x");
    # corrected 17 (all but "Bob", "b. Paris", "E", "F.", "B.x", "A cat", "")
    assert [sum(c[1][k] == "B" for c in rows) for k in range(3)] == [5, 8, 17]
    assert len(rows) == 24


def test_scienceqa_lmms_ignores_the_number_of_choices_for_accuracy():
    # lmms-eval compares the letter with the correct one only: "E" with 4 choices is simply wrong
    m = scienceqa_accuracy({"1": "E", "2": "b"}, {"1": "B", "2": 1}, {"1": 4, "2": 4}, protocol="lmms")
    assert m["accuracy"] == 0.5 and m["unparsed_ratio"] == 0.5


def test_scienceqa_all_vs_img_accuracy():
    # 5 test problems, 3 with an image; gold A everywhere. LLaVA prints
    # "Total: 5, Correct: 3, Accuracy: 60.00%, IMG-Accuracy: 66.67%" (2 of 3 image problems right)
    preds = {"i1": "A", "i2": "B", "i3": "A", "t1": "A", "t2": "C"}
    gold = dict.fromkeys(preds, "A")
    has_image = {"i1": True, "i2": True, "i3": True, "t1": False, "t2": False}
    m = scienceqa_accuracy(preds, gold, has_image=has_image)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["n"] == 5
    assert m["img/accuracy"] == pytest.approx(2 / 3) and m["img/n"] == 3
    assert m["text_only/accuracy"] == pytest.approx(1 / 2) and m["text_only/n"] == 2
    assert "img/accuracy" not in scienceqa_accuracy(preds, gold)
    with pytest.raises(ValueError, match="has_image has no entry"):
        scienceqa_accuracy(preds, gold, has_image={"i1": True})


def test_scienceqa_style_keyword_maps_to_protocols():
    assert parse_letter("B)", 4, style="lenient") == "B" == parse_letter("B)", 4, protocol="corrected")
    assert parse_letter("B)", 4, style="llava") is None
    with pytest.raises(ValueError, match="contradicts"):
        parse_letter("B", 4, protocol="lmms", style="lenient")
    with pytest.raises(ValueError, match="unknown ScienceQA parsing style"):
        parse_letter("B", 4, style="fuzzy")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return write_fixtures(str(tmp_path_factory.mktemp("protocol_fx")))


def test_scienceqa_loader_text_only_and_lmms_prompt(fixtures, tmp_path):
    data_dir, image_dir = fixtures["scienceqa"]
    # test split 1, 2, 3, 5; problem 3 has no image
    ds = load_dataset("scienceqa", data_dir, image_dir, with_text_only=True)
    assert [it.id for it in ds] == ["1", "2", "3", "5"] and ds.stats.filtered == 0
    text_only = ds[2]
    assert text_only.image == "" and text_only.metadata["has_image"] is False
    assert text_only.metadata["image_file"] is None
    assert text_only.formatted_question == "Which word is a color?\nA. table\nB. green\nC. dog" + LETTER
    assert all(it.metadata["has_image"] for it in ds if it.id != "3")
    default = load_dataset("scienceqa", data_dir, image_dir)
    assert [it.id for it in default] == ["1", "2", "5"] and default.stats.filtered == 1
    # a hint of white space only: LLaVA's prompt drops it, lmms-eval's ("if context:") keeps it
    problems = json.load(open(os.path.join(data_dir, "problems.json")))
    problems["2"]["hint"] = " "
    os.makedirs(tmp_path / "sqa")
    json.dump(problems, open(tmp_path / "sqa" / "problems.json", "w"))
    json.dump({"test": ["2"]}, open(tmp_path / "sqa" / "pid_splits.json", "w"))
    llava = load_dataset("scienceqa", str(tmp_path / "sqa"), image_dir)[0]
    lmms = load_dataset("scienceqa", str(tmp_path / "sqa"), image_dir, prompt="lmms")[0]
    assert llava.formatted_question == "What color is the square?\nA. red\nB. blue" + LETTER
    assert lmms.formatted_question == "Context:  \nWhat color is the square?\nA. red\nB. blue" + LETTER
    with pytest.raises(ValueError, match="llava, lmms"):
        load_dataset("scienceqa", data_dir, image_dir, prompt="qwen")


# ---------------------------------------------------------------- POPE

# id: (answer, label, category)
POPE = {
    "a": ("yes", "yes", "random"),
    "b": ("Yes.", "yes", "random"),
    "c": ("no", "yes", "random"),
    "d": ("yes", "no", "adversarial"),
    "e": ("no", "no", "adversarial"),
    "f": ("NO", "no", "adversarial"),
}
P_PRED = {k: v[0] for k, v in POPE.items()}
P_LABEL = {k: v[1] for k, v in POPE.items()}
P_CAT = {k: v[2] for k, v in POPE.items()}


@pytest.mark.parametrize("text, llava, lmms, corrected", [
    ("Yes", "yes", "yes", "yes"),
    # llava: words of the first sentence, exact "No"/"no"/"not"; lmms: lower().strip() must be yes/no
    (" Yes\n", "yes", "yes", "yes"),
    ("Yes.", "yes", "other", "yes"),              # lmms: "yes." is neither
    ("No, there is not.", "no", "other", "no"),
    ("NO", "yes", "no", "no"),                    # llava is case-sensitive
    ("Nope.", "yes", "other", "no"),
    ("There isn't a dog.", "yes", "other", "no"),  # llava has no "n't" rule
    ("No!", "yes", "other", "no"),                # llava: the word is "No!" (no "." to cut at)
    ("no\n", "yes", "no", "no"),                  # llava splits on " " only: the word is "no\n"
    ("Yes, there is a dog. No cat.", "yes", "other", "yes"),  # first sentence only
    ("Yes! No cat", "no", "other", "yes"),        # llava: no ".", so "No" is a word; corrected cuts at "!"
    ("I cannot see one", "yes", "other", "no"),
    ("", "yes", "other", "yes"),                  # llava: no "no" word -> yes
])
def test_pope_parsing_per_protocol(text, llava, lmms, corrected):
    assert [parse_yes_no(text, protocol=p) for p in PROTOCOLS] == [llava, lmms, corrected]


def test_pope_lmms_worked_example():
    m = pope_metrics(P_PRED, P_LABEL, P_CAT, protocol="lmms")
    # lmms parsing: a yes, b "yes." other, c no, d yes, e no, f "no" (lower-cased)
    # TP a; FP d; TN e, f; lmms FN (label yes, answer "no") c only -> b is in no recall denominator
    assert m["accuracy"] == pytest.approx(3 / 6)        # a, e, f equal their labels
    assert m["precision"] == pytest.approx(1 / 2)       # TP / (TP + FP) = 1 / 2
    assert m["recall"] == pytest.approx(1 / 2)          # TP / (TP + FN') = 1 / (1 + 1)
    assert m["f1"] == pytest.approx(1 / 2)              # 2 * 1/2 * 1/2 / 1
    assert m["yes_ratio"] == pytest.approx(2 / 6)       # answers "yes": a, d
    assert m["lmms_reported_yes_ratio"] == pytest.approx(3 / 6)  # labels "yes": a, b, c
    assert m["unparsed_ratio"] == pytest.approx(1 / 6)  # b
    # per category: random a TP, b other, c FN' -> acc 1/3, P 1, R 1/2, F1 2/3, yes 1/3, labels yes 3/3
    assert m["random/precision"] == 1.0 and m["random/recall"] == pytest.approx(0.5)
    assert m["random/f1"] == pytest.approx(2 / 3) and m["random/lmms_reported_yes_ratio"] == 1.0
    # adversarial d FP, e TN, f TN -> P 0/1 = 0, R 0/0 -> 0, labels yes 0
    assert m["adversarial/precision"] == 0.0 and m["adversarial/recall"] == 0.0
    assert m["adversarial/accuracy"] == pytest.approx(2 / 3)
    assert m["macro/lmms_reported_yes_ratio"] == pytest.approx(0.5)
    # the same parsing with the llava counting: FN = c and b -> recall 1/3, F1 2*(1/2)(1/3)/(5/6) = 2/5
    m2 = pope_metrics(P_PRED, P_LABEL, parsing="lmms")
    assert m2["recall"] == pytest.approx(1 / 3) and m2["f1"] == pytest.approx(2 / 5)
    assert "lmms_reported_yes_ratio" not in m2


def test_pope_llava_and_corrected_worked_example():
    m = pope_metrics(P_PRED, P_LABEL, protocol="llava")
    # llava: a yes, b "Yes" -> yes, c no, d yes, e no, f "NO" -> yes: TP a b, FP d f, TN e, FN c
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 2, 1, 1)
    assert m["accuracy"] == pytest.approx(3 / 6) and m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(4 / 7)              # 2 * 1/2 * 2/3 / (1/2 + 2/3) = (2/3) / (7/6)
    assert m["yes_ratio"] == pytest.approx(4 / 6)
    m = pope_metrics(P_PRED, P_LABEL, protocol="corrected")
    # corrected: f "NO" -> no: TP a b, FP d, TN e f, FN c
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)


# ---------------------------------------------------------------- TextVQA


def test_textvqa_mean_lmms_vs_llava_last_bit():
    # the 4th and 5th of 10 answers match: leaving out a matching answer leaves 1 match (1/3), else 2 (2/3)
    answers = ["x"] * 3 + ["dog"] * 2 + ["x"] * 5
    subsets = [2 / 3] * 3 + [1 / 3] * 2 + [2 / 3] * 5
    llava = 0.0
    for s in subsets:   # m4c: sum(accs) / len(accs), a left-to-right float sum
        llava += s
    llava /= 10
    assert llava == 0.6000000000000001
    assert vqa_accuracy("dog", answers, protocol="llava") == llava
    assert vqa_accuracy("dog", answers, protocol="corrected") == llava
    assert vqa_accuracy("dog", answers, protocol="lmms") == 0.6  # statistics.mean: exact 6/10, rounded once


def test_textvqa_same_normalisation_under_every_protocol():
    # "The Two dogs." -> lower, drop "the", "two" -> "2", final "." deleted -> "2 dogs"; 4 of 10 match -> 1
    for p in PROTOCOLS:
        assert vqa_accuracy("The Two dogs.", ["2 dogs"] * 4 + ["cats"] * 6, protocol=p) == 1.0


def test_textvqa_llava_lookup_by_image_and_question():
    # eval_textvqa.py keys the annotations by (image_id, question.lower()); the later of two equal keys
    # wins, so q1 is scored against q2's answers ("go"): q1 0, q2 1 -> 0.5. lmms and corrected score each
    # question against its own answers -> 1.0
    preds = {"q1": "stop", "q2": "go"}
    refs = {"q1": ["stop"] * 10, "q2": ["go"] * 10}
    keys = {"q1": ("img", "What is it?"), "q2": ("img", "what is it?")}
    assert textvqa_accuracy(preds, refs, annotation_keys=keys)["accuracy"] == 0.5
    assert textvqa_accuracy(preds, refs, protocol="lmms", annotation_keys=keys)["accuracy"] == 1.0
    assert textvqa_accuracy(preds, refs, protocol="corrected", annotation_keys=keys)["accuracy"] == 1.0
    assert textvqa_accuracy(preds, refs)["accuracy"] == 1.0


def test_textvqa_loader_prompts_and_test_split(tmp_path):
    path = tmp_path / "TextVQA_0.5.1_val.json"
    json.dump({"dataset_type": "val", "data": [
        {"question_id": 7, "image_id": "im1", "question": "what does NYC mean?", "answers": ["x"] * 10,
         "ocr_tokens": [], "set_name": "val"},
        {"question_id": 8, "image_id": "im1", "question": "what brand?", "answers": ["y"] * 10,
         "ocr_tokens": ["acme", "co"], "set_name": "val"}]}, open(path, "w"))
    llava = load_dataset("textvqa", str(path), str(tmp_path), check_images=False)
    # LLaVA: question as written; the OCR line only when there are tokens
    assert llava[0].formatted_question == "what does NYC mean?" + SHORT
    assert llava[1].formatted_question == "what brand?\nReference OCR token: acme, co" + SHORT
    # lmms-eval: str.capitalize() lower-cases the rest ("NYC" -> "nyc"); no OCR line by default
    lmms = load_dataset("textvqa", str(path), str(tmp_path), check_images=False, prompt="lmms")
    assert lmms[0].formatted_question == "What does nyc mean?" + SHORT
    assert lmms[1].formatted_question == "What brand?" + SHORT
    # with ocr=True lmms-eval adds the line even for an empty token list
    lmms_ocr = load_dataset("textvqa", str(path), str(tmp_path), check_images=False, prompt="lmms", ocr=True)
    assert lmms_ocr[0].formatted_question == "What does nyc mean?\nReference OCR token: " + SHORT
    no_ocr = load_dataset("textvqa", str(path), str(tmp_path), check_images=False, ocr=False)
    assert no_ocr[1].formatted_question == "what brand?" + SHORT
    test = tmp_path / "TextVQA_0.5.1_test.json"
    json.dump({"dataset_type": "test", "data": [
        {"question_id": 9, "image_id": "im2", "question": "what is it?", "ocr_tokens": [], "set_name": "test"}]},
        open(test, "w"))
    item = load_dataset("textvqa", str(test), str(tmp_path), check_images=False)[0]
    assert item.answers == () and item.split == "test" and item.metadata["question_id"] == 9


def test_textvqa_submission_file(tmp_path):
    path = tmp_path / "out" / "submission.json"
    items = load_dataset("textvqa", *_tiny_textvqa(tmp_path), check_images=False).items
    # answers as EvalAI expects them: the normalised prediction
    # "Two dogs." -> "2 dogs"; "The STOP sign!" -> "stop sign" ("!" not next to a space -> space, stripped)
    write_textvqa_submission({"11": "Two dogs.", "12": "The STOP sign!"}, items, str(path))
    assert json.load(open(path)) == [{"question_id": 11, "answer": "2 dogs"},
                                      {"question_id": 12, "answer": "stop sign"}]
    assert open(path).read() == '[{"question_id": 11, "answer": "2 dogs"}, {"question_id": 12, "answer": "stop sign"}]'
    # question ids instead of items; predictions keyed by the id as given
    write_textvqa_submission({12: "no", 11: "yes"}, [12, 11], str(path))
    assert json.load(open(path)) == [{"question_id": 12, "answer": "no"}, {"question_id": 11, "answer": "yes"}]
    before = open(path).read()
    with pytest.raises(ValueError, match=r"^1 of 2 questions have no prediction \(e.g. \[12\]\)$"):
        write_textvqa_submission({"11": "a"}, items, str(path))
    with pytest.raises(ValueError, match="predictions name no listed question"):
        write_textvqa_submission({"11": "a", "12": "b", "13": "c"}, items, str(path))
    with pytest.raises(ValueError, match="listed twice"):
        write_textvqa_submission({"11": "a"}, ["11", 11], str(path))
    with pytest.raises(ValueError, match="must be an integer"):
        write_textvqa_submission({"x": "a"}, ["x"], str(path))
    with pytest.raises(TypeError, match="question 11"):
        write_textvqa_submission({"11": None, "12": "b"}, items, str(path))
    assert open(path).read() == before  # nothing written by the failed calls
    # a failing rename leaves no temporary file behind
    os.makedirs(tmp_path / "out" / "adir")
    with pytest.raises(OSError):
        write_textvqa_submission([("a")], [1], str(tmp_path / "out" / "adir"))
    assert sorted(os.listdir(tmp_path / "out")) == ["adir", "submission.json"]


def _tiny_textvqa(tmp_path):
    path = tmp_path / "tiny.json"
    json.dump({"dataset_type": "test", "data": [
        {"question_id": 11, "image_id": "a", "question": "what?", "ocr_tokens": [], "set_name": "test"},
        {"question_id": 12, "image_id": "b", "question": "which?", "ocr_tokens": [], "set_name": "test"}]},
        open(path, "w"))
    return str(path), str(tmp_path)
