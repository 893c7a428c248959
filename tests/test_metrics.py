"""Benchmark metrics on worked examples; every expected value is derived by hand in the comments."""
from __future__ import annotations

import types

import pytest

from jaxflow.metrics import (chair_metrics, normalize_answer, parse_letter, parse_yes_no, pope_metrics,
                             scienceqa_accuracy, score, textvqa_accuracy, vqa_accuracy)
from jaxflow.metrics.chair import (COCO_CLASSES, SYNONYMS, WORD_TO_CLASS, analyse_caption, caption_objects,
                                   caption_words, ground_truth_objects)
from jaxflow.metrics.singularize import singularize

# ---------------------------------------------------------------- POPE

# id: (prediction, label, category)
POPE_CASES = {
    "q1": ("Yes.", "yes", "random"),                          # llava yes (first sentence "Yes")  exact yes
    "q2": ("yes", "no", "random"),                            # llava yes                         exact yes
    "q3": ("No, there is not", "no", "random"),               # llava no ("No" after comma removal) exact other
    "q4": ("not sure", "yes", "random"),                      # llava no ("not")                  exact other
    "q5": ("There isn't a dog.", "no", "adversarial"),        # llava yes ("isn't" is no word of the rule)
    "q6": ("NO", "no", "adversarial"),                        # llava yes (case-sensitive rule)   exact no
    "q7": ("Yes, there is a dog. No cat.", "yes", "adversarial"),  # llava: first sentence only -> yes
    "q8": ("No", "yes", "adversarial"),                       # no / no
}
PRED = {k: v[0] for k, v in POPE_CASES.items()}
LABEL = {k: v[1] for k, v in POPE_CASES.items()}
CAT = {k: v[2] for k, v in POPE_CASES.items()}


def test_pope_parsing_single_answers():
    assert parse_yes_no("Yes.") == "yes" and parse_yes_no("yes") == "yes"
    assert parse_yes_no("Yes.", "exact") == "yes" and parse_yes_no(" yes \n", "exact") == "yes"
    assert parse_yes_no("not sure") == "no" and parse_yes_no("not sure", "exact") == "other"
    assert parse_yes_no("No, there is not") == "no"
    assert parse_yes_no("There isn't a dog.") == "yes"  # LLaVA's rule has no "n't"
    assert parse_yes_no("There isn't a dog.", contractions=True) == "no"
    assert parse_yes_no("Nope") == "yes" and parse_yes_no("NO") == "yes"
    assert parse_yes_no("NO", "exact") == "no" and parse_yes_no("No!", "exact") == "no"
    assert parse_yes_no("Yes, there is a dog. No cat.") == "yes"
    with pytest.raises(ValueError, match="unknown POPE parsing"):
        parse_yes_no("yes", "fuzzy")


def test_pope_llava_parsing_worked_example():
    m = pope_metrics(PRED, LABEL, CAT)
    # parsed: yes yes no no yes yes yes no; labels: y n n y n n y y
    # TP = q1, q7 = 2; FP = q2, q5, q6 = 3; TN = q3 = 1; FN = q4, q8 = 2; N = 8
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"]) == (2, 3, 1, 2, 8)
    assert m["accuracy"] == pytest.approx(3 / 8)             # (TP + TN) / N
    assert m["precision"] == pytest.approx(2 / 5)            # TP / (TP + FP)
    assert m["recall"] == pytest.approx(2 / 4)               # TP / (TP + FN)
    assert m["f1"] == pytest.approx(2 * 0.4 * 0.5 / 0.9)     # = 0.4444
    assert m["yes_ratio"] == pytest.approx(5 / 8)            # predicted yes / N
    assert m["unparsed_ratio"] == 0.0
    # random (q1..q4): TP q1, FP q2, TN q3, FN q4 -> every metric 0.5
    for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert m[f"random/{k}"] == pytest.approx(0.5)
    # adversarial (q5..q8): FP q5, FP q6, TP q7, FN q8 -> acc 1/4, P 1/3, R 1/2, F1 2PR/(P+R) = 0.4, yes 3/4
    assert m["adversarial/accuracy"] == pytest.approx(0.25)
    assert m["adversarial/precision"] == pytest.approx(1 / 3)
    assert m["adversarial/recall"] == pytest.approx(0.5)
    assert m["adversarial/f1"] == pytest.approx(0.4)
    assert m["adversarial/yes_ratio"] == pytest.approx(0.75)
    # macro = mean over the two categories
    assert m["macro/f1"] == pytest.approx((0.5 + 0.4) / 2)
    assert m["macro/accuracy"] == pytest.approx((0.5 + 0.25) / 2)


def test_pope_contractions_option():
    m = pope_metrics(PRED, LABEL, parsing="llava", contractions=True)
    # q5 "There isn't a dog." becomes no -> TN: TP 2, FP 2, TN 2, FN 2 -> every metric 0.5
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 2, 2, 2)
    assert m["accuracy"] == m["precision"] == m["recall"] == m["f1"] == m["yes_ratio"] == pytest.approx(0.5)


def test_pope_exact_parsing_worked_example():
    m = pope_metrics(PRED, LABEL, parsing="exact")
    # parsed: yes yes other other other no other no ("Yes." -> "yes" after the final "." is stripped)
    # TP q1; FP q2; TN q6; FN q4 (other, label yes), q7 (other, label yes), q8 (no, label yes) -> 3.
    # q3 and q5 are "other" with label no: neither TN nor FP, and wrong for accuracy.
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 1, 3)
    assert m["accuracy"] == pytest.approx(2 / 8)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(1 / 4)
    assert m["f1"] == pytest.approx(1 / 3)                   # 2 * 0.5 * 0.25 / 0.75
    assert m["yes_ratio"] == pytest.approx(2 / 8)
    assert m["unparsed_ratio"] == pytest.approx(4 / 8)       # q3, q4, q5, q7


def test_pope_sequences_zero_division_and_mismatch():
    # all "no" predictions: TP = FP = 0 -> precision 0 (reference would divide by zero), F1 0
    m = pope_metrics(["No", "No"], ["yes", "no"])
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 0.5 and m["yes_ratio"] == 0.0
    with pytest.raises(ValueError, match="no prediction"):
        pope_metrics({"a": "yes"}, {"a": "yes", "b": "no"})
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_metrics(["yes"], ["maybe"])
    with pytest.raises(TypeError):
        pope_metrics({"a": "yes"}, ["yes"])


# ---------------------------------------------------------------- TextVQA


@pytest.mark.parametrize("raw, normalized", [
    ("Two", "2"),                  # number words -> digits
    ("the dog", "dog"),            # articles dropped
    ("A dog.", "dog"),             # article and final period
    ("Dogs!", "dogs"),             # "!" not next to a space -> replaced by a space, then stripped
    ("Coca-Cola.", "coca cola"),   # "-" inside a word -> space; "." not before a digit -> deleted
    ("3.5", "3.5"),                # "." before a digit kept
    ("dont", "don't"),             # contractions table
    ("It's red", "it 's red"),     # "'s" split off
    ("none", "0"),
    ("  yes\n", "yes"),
])
def test_textvqa_normalization(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_vqa_accuracy_leave_one_out():
    other = ["x"] * 10
    # k matching answers among 10; leaving out answer i: min(1, (k - [i matches]) / 3); mean over 10
    # k = 1: 9 subsets keep the match (1/3), 1 loses it (0) -> 9/30 = 0.3
    assert vqa_accuracy("dog", ["dog"] + other[:9]) == pytest.approx(0.3)
    # k = 2: 8 subsets with 2 matches (2/3), 2 with 1 (1/3) -> (16/3 + 2/3) / 10 = 0.6
    assert vqa_accuracy("dog", ["dog"] * 2 + other[:8]) == pytest.approx(0.6)
    # k = 3: 7 subsets with 3 (1), 3 with 2 (2/3) -> (7 + 2) / 10 = 0.9
    assert vqa_accuracy("dog", ["dog"] * 3 + other[:7]) == pytest.approx(0.9)
    # k = 4: every subset keeps >= 3 -> 1
    assert vqa_accuracy("dog", ["dog"] * 4 + other[:6]) == pytest.approx(1.0)
    assert vqa_accuracy("cat", other) == 0.0


def test_textvqa_accuracy_worked_example():
    preds = {
        "a": "the dog",     # -> "dog": 1 match of 10 -> 0.3
        "b": "Two",         # -> "2": "2" and "two" match -> 2 matches -> 0.6
        "c": "Coca-Cola.",  # -> "coca cola": three spellings match -> 0.9
        "d": "stop",        # 4 matches -> 1.0
        "e": "no idea",     # 0
    }
    refs = {
        "a": ["dog"] + ["cat"] * 9,
        "b": ["2", "two"] + ["3"] * 8,
        "c": ["coca cola", "coca-cola", "Coca Cola"] + ["pepsi"] * 7,
        "d": ["stop"] * 4 + ["go"] * 6,
        "e": ["yes"] * 10,
    }
    m = textvqa_accuracy(preds, refs)
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx((0.3 + 0.6 + 0.9 + 1.0 + 0.0) / 5)  # 0.56


# ---------------------------------------------------------------- ScienceQA


def test_scienceqa_letter_parsing():
    assert parse_letter("A", 4) == "A"
    assert parse_letter("B. Paris", 4) == "B"
    assert parse_letter("The answer is C.", 4) == "C"
    assert parse_letter("B.", 4) is None and parse_letter("B.", 4, style="lenient") == "B"
    assert parse_letter("(D)", 4) is None and parse_letter("(D)", 4, style="lenient") == "D"
    assert parse_letter("B)", 4, style="lenient") == "B"
    assert parse_letter("E", 4) is None           # not one of 4 options
    assert parse_letter("A cat", 4, style="lenient") is None
    assert parse_letter("AB", 4) is None and parse_letter("", 4) is None


def test_scienceqa_accuracy_worked_example():
    rows = [  # (prediction, gold, choices)       llava          lenient
        ("A", "A", 4),                          # correct        correct
        ("B. Paris", "B", 4),                   # correct        correct
        ("B.", "B", 4),                         # unparsed       correct
        ("The answer is C.", "C", 4),           # correct        correct
        ("(D)", "D", 4),                        # unparsed       correct
        ("E", "A", 4),                          # unparsed (E is no option of 4)
        ("C", "B", 4),                          # parsed, wrong
        ("A cat", "A", 4),                      # unparsed       unparsed
    ]
    preds = {str(i): r[0] for i, r in enumerate(rows)}
    gold = {str(i): r[1] for i, r in enumerate(rows)}
    nch = {str(i): r[2] for i, r in enumerate(rows)}
    m = scienceqa_accuracy(preds, gold, nch)
    assert m["accuracy"] == pytest.approx(3 / 8)
    assert m["unparsed_ratio"] == pytest.approx(4 / 8)
    m = scienceqa_accuracy(preds, gold, nch, style="lenient")
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["unparsed_ratio"] == pytest.approx(2 / 8)
    # references may be option indices; groups give per-group accuracy
    m = scienceqa_accuracy(["A", "B"], [0, 0], categories=["nat", "soc"])
    assert m["accuracy"] == 0.5 and m["nat/accuracy"] == 1.0 and m["soc/accuracy"] == 0.0


# ---------------------------------------------------------------- CHAIR


def test_synonym_table():
    assert len(SYNONYMS) == 80
    assert tuple(row[0] for row in SYNONYMS) == COCO_CLASSES
    assert WORD_TO_CLASS["man"] == "person" and WORD_TO_CLASS["puppy"] == "dog"
    assert WORD_TO_CLASS["motor bike"] == "motorcycle"   # the reference's " motor bike" stripped
    assert WORD_TO_CLASS["iphone"] == "cell phone"       # lower-cased
    assert WORD_TO_CLASS["table"] == "dining table" and WORD_TO_CLASS["bow"] == "tie"


def test_every_synonym_is_recognised_as_itself():
    # each synonym alone is one mention of its class ("stove top oven" excepted: three words, and the
    # reference merges only pairs: "stove" -> oven, "oven" -> oven)
    for row in SYNONYMS:
        for w in row:
            if w == "stove top oven":
                continue
            assert [c for _, c in caption_objects(w, protocol="corrected")] == [row[0]], w


@pytest.mark.parametrize("plural, singular", [
    ("dogs", "dog"), ("people", "person"), ("mice", "mouse"), ("children", "child"), ("men", "man"),
    ("women", "woman"), ("policemen", "policeman"), ("geese", "goose"), ("oxen", "ox"), ("calves", "calf"),
    ("knives", "knife"), ("puppies", "puppy"), ("ponies", "pony"), ("ties", "tie"), ("doggies", "doggie"),
    ("buses", "bus"), ("glasses", "glass"), ("benches", "bench"), ("sandwiches", "sandwich"),
    ("boxes", "box"), ("tomatoes", "tomato"), ("shoes", "shoe"), ("horses", "horse"), ("vases", "vase"),
    ("skis", "ski"), ("taxis", "taxi"), ("bananas", "banana"), ("tvs", "tv"), ("stoves", "stove"),
    ("turkeys", "turkey"), ("t-shirts", "t-shirt"),
    # singulars stay
    ("bus", "bus"), ("glass", "glass"), ("grass", "grass"), ("scissors", "scissors"), ("sheep", "sheep"),
    ("species", "species"), ("tennis", "tennis"), ("cactus", "cactus"), ("is", "is"), ("this", "this"),
    ("aircraft", "aircraft"), ("bison", "bison"), ("dog", "dog"), ("person", "person"),
])
def test_singularize(plural, singular):
    assert singularize(plural) == singular


def test_double_words_and_special_cases():
    # "hot dog" is one word and not a dog; "teddy bear" is not a bear
    assert caption_objects("A hot dog and a teddy bear.") == [("hot dog", "hot dog"), ("teddy bear", "teddy bear")]
    assert caption_objects("Two hot dogs.") == [("hot dog", "hot dog")]
    # "baby" before an animal is the animal, not a person; alone it is a person
    assert caption_objects("a baby dog and a baby") == [("dog", "dog"), ("baby", "person")]
    # "passenger train" -> train; "train tracks" is not a train
    assert caption_objects("a passenger train on train tracks") == [("train", "train")]
    # toilet seat is a toilet, and "seat" is dropped from a caption that mentions a toilet
    assert caption_objects("The seat of the toilet is up.") == [("toilet", "toilet")]
    assert caption_objects("A toilet seat.") == [("toilet", "toilet")]
    assert caption_objects("A seat.") == [("seat", "chair")]
    assert caption_objects("Wine glasses, cell phones.") == [("wine glass", "wine glass"), ("cell phone", "cell phone")]
    assert caption_words("A dog's bone")[:2] == ["a", "dog"]


def test_ground_truth_objects():
    gt = ground_truth_objects(["dog", "dining table"], ["A man with his puppy.", "A hot dog on a plate."])
    assert gt == {"dog", "dining table", "person", "hot dog"}
    with pytest.raises(ValueError, match="not a COCO class"):
        ground_truth_objects(["spaceship"])


def test_chair_worked_example():
    preds = {
        # mentions: man(person) puppy(dog) dog(dog) man(person) -> 4, none hallucinated; covers dog, person
        "1": "A man walks two puppies and two dogs. The man smiles.",
        # woman(person), hot dog -> hot dog hallucinated (1 of 2); "hot dog" does not cover dog -> covers person
        "2": "A woman eats a hot dog.",
        # mouse, person, cat, cat, toilet (toilet seat) -> toilet hallucinated (1 of 5); covers mouse, person, cat
        "3": "Three mice and some people near cats, and a cat on a toilet seat.",
        # bird (baby bird), teddy bear -> teddy bear hallucinated (1 of 2); covers bird
        "4": "A baby bird next to a teddy bear.",
    }
    gt = {"1": {"dog", "person"}, "2": {"dog", "person"}, "3": {"mouse", "person", "cat"}, "4": {"bird"}}
    m = chair_metrics(preds, gt)
    assert m["n"] == 4 and m["mentions"] == 13 and m["hallucinated_mentions"] == 3
    assert m["chair_s"] == pytest.approx(3 / 4)      # captions 2, 3, 4 hallucinate
    assert m["chair_i"] == pytest.approx(3 / 13)     # 3 hallucinated of 4 + 2 + 5 + 2 mentions
    assert m["recall"] == pytest.approx(7 / 8)       # covered 2 + 1 + 3 + 1 of 2 + 2 + 3 + 1
    assert m["mean_mentions"] == pytest.approx(13 / 4)
    detail = analyse_caption(preds["1"], gt["1"])
    assert [c for _, c in detail["mentions"]] == ["person", "dog", "dog", "person"]  # repeats kept
    assert detail["hallucinated"] == [] and detail["covered"] == ["dog", "person"]
    # no mentions at all: CHAIR_i has a zero denominator -> 0.0
    assert chair_metrics(["A blank wall."], [{"person"}])["chair_i"] == 0.0


# ---------------------------------------------------------------- score()


def _item(i, answers, split="s", **meta):
    return types.SimpleNamespace(id=i, answers=tuple(answers), split=split, metadata=meta)


def test_score_dispatch():
    items = [_item("random/1", ["yes"], "random"), _item("random/2", ["no"], "random")]
    m = score("pope", {"random/1": "Yes", "random/2": "No, there is not."}, items)
    assert m["accuracy"] == 1.0 and m["random/f1"] == 1.0
    assert m["exact/accuracy"] == 0.5  # "No, there is not." is not an exact "no"
    items = [_item("1", ["B"], choices=["x", "y"], subject="natural science")]
    assert score("scienceqa", {"1": "B"}, items)["natural science/accuracy"] == 1.0
    assert score("textvqa", {"9": "two"}, [_item("9", ["2"] * 10)])["accuracy"] == 1.0
    assert score("chair", {"5": "A dog."}, [_item("5", ["cat"])])["chair_s"] == 1.0
    with pytest.raises(ValueError, match="unknown data set"):
        score("vqav2", {}, [])
