"""CHAIR under its three protocols: every expected value below is worked out by hand from the rules
of the reference scripts (LisaAnne/Hallucination utils/chair.py with nltk.word_tokenize and
pattern.en.singularize; lmms-eval's coco_cap_chair) or of our corrected parsing, with the
reasoning next to it. None is produced by running our own code."""
from __future__ import annotations

import json
import os

import pytest

from jaxflow.data.datasets import load_dataset
from jaxflow.data.datasets._common import DatasetError, Item
from jaxflow.data.datasets.chair import load_chair, read_image_ids
from jaxflow.data.fixtures import write_fixtures
from jaxflow.metrics.chair import (COCO_CLASSES, PROTOCOLS, REFERENCE_SYNONYMS, REFERENCE_WORD_TO_CLASS,
                                   analyse_caption, caption_objects, caption_words, chair_metrics, chair_score_items,
                                   ground_truth_objects, item_ground_truth, tokenize)
from jaxflow.metrics.pattern_singularize import pattern_singularize
from jaxflow.metrics.word_tokenize import split_sentences, treebank_tokenize, word_tokenize


def classes(caption, protocol):
    return [c for _, c in caption_objects(caption, protocol)]


# ---------------------------------------------------------------- protocol names


@pytest.mark.parametrize("call", [
    lambda p: chair_metrics(["A dog."], [{"dog"}], protocol=p),
    lambda p: caption_objects("A dog.", p),
    lambda p: caption_words("A dog.", p),
    lambda p: tokenize("A dog.", p),
    lambda p: ground_truth_objects(["dog"], protocol=p),
    lambda p: analyse_caption("A dog.", {"dog"}, protocol=p),
    lambda p: chair_score_items({"1": "A dog."}, [], protocol=p),
])
def test_unknown_protocol(call):
    with pytest.raises(ValueError, match=r"unknown CHAIR protocol 'opera'; valid: llava, lmms, corrected"):
        call("opera")


# ---------------------------------------------------------------- tokenisation


def test_llava_tokenisation():
    # nltk.word_tokenize: "/" does not split a word, the sentence-final period is a token
    assert tokenize("A TV/monitor.", "llava") == ["a", "tv/monitor", "."]
    # corrected: "/" and "." separate tokens and are dropped
    assert tokenize("A TV/monitor.", "corrected") == ["a", "tv", "monitor"]
    # Punkt splits after "dog." (not an abbreviation, a word follows), so each sentence's final
    # period comes off; the Treebank rules alone only detach the period at the very end
    assert tokenize("A dog. A cat.", "llava") == ["a", "dog", ".", "a", "cat", "."]
    assert treebank_tokenize("a dog. a cat.") == ["a", "dog.", "a", "cat", "."]
    # "st" is an abbreviation: no sentence break after "st.", so that period stays on the word
    assert word_tokenize("a sign for st. louis. a bus") == ["a", "sign", "for", "st.", "louis", ".", "a", "bus"]
    # a number followed by a lower-case word: no break ("2." stays whole)
    assert word_tokenize("there are 2. dogs") == ["there", "are", "2.", "dogs"]
    # clitics, "?" and commas are tokens of their own; "--" splits, a hyphen inside a word does not
    assert word_tokenize("is it the dog's t-shirt? yes, a hat--red") == [
        "is", "it", "the", "dog", "'s", "t-shirt", "?", "yes", ",", "a", "hat", "--", "red"]
    assert word_tokenize("a man can't. he cannot") == ["a", "man", "ca", "n't", ".", "he", "can", "not"]
    # closing brackets after a sentence end stay with that sentence
    assert split_sentences("a dog (on a mat.) a cat.") == ["a dog (on a mat.)", "a cat."]
    assert split_sentences("") == [] and word_tokenize("") == []


def test_tokeniser_matches_nltk_when_installed():
    nltk_tok = pytest.importorskip("nltk.tokenize")
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    from jaxflow.metrics.word_tokenize import ABBREVIATIONS

    params = PunktParameters()
    params.abbrev_types = set(ABBREVIATIONS)
    punkt, treebank = PunktSentenceTokenizer(params), nltk_tok.NLTKWordTokenizer()
    texts = ["a man riding a bike. he wears a helmet!", "two dogs (a pug and a collie.) play. 3 cats...",
             "mr. smith's tv/monitor: 3,000 pixels; 2.5 inches? no.", "a. b. the end -- of it . ok",
             "\"a quote.\" then more... and [brackets] {too} <x> $5 #1 @home 50% & *star*"]
    for text in texts:
        assert split_sentences(text) == punkt.tokenize(text), text
        for sent in split_sentences(text):
            assert treebank_tokenize(sent) == treebank.tokenize(sent), sent


# ---------------------------------------------------------------- pattern.en's singulariser


@pytest.mark.parametrize("word, expected", [
    ("dogs", "dog"),          # last rule s$ -> ""
    ("skis", "ski"),          # s$
    ("bus", "bu"),            # no table entry ends with "bus", no earlier rule matches: s$ -> "bu"
    ("minibus", "minibu"),    # likewise
    ("buses", "bus"),         # (bus)es$ -> "bus"
    ("glass", "glas"),        # s$ (hence the reference's double word "wine glas")
    ("glasses", "glass"),     # (x|ch|ss|sh)es$ -> "glass"
    ("canoes", "cano"),       # (o)es$ -> "o"
    ("shoes", "shoe"),        # (shoe)s$ comes before (o)es$
    ("ties", "ty"),           # the "-ie" entry is "^tie" (never matches); ([^aeiouy]|qu)ies$ -> "ty"
    ("puppies", "puppy"),     # ([^aeiouy]|qu)ies$
    ("doggies", "doggies"),   # ends with "doggie" + "s": returned unchanged, plural and all
    ("mice", "mouse"),        # ([m|l])ice$
    ("people", "person"),     # irregular "people"
    ("women", "woman"),       # irregular ending "men"
    ("children", "child"),    # irregular "children"
    ("knives", "knife"),      # ([nlw]i)ves$ -> "\1fe"
    ("shelves", "shelve"),    # irregular ending "helves" -> "helve"
    ("your", "ymy"),          # irregular ending "our" -> "my"
    ("scissors", "scissors"),  # uninflected
    ("is", "is"),             # a suffix of the uninflected "chassis"
    ("this", "thi"),          # s$
    ("tennis", "tenni"),      # s$
    ("t-shirts", "t-shirt"),  # "shirts" is no preposition: the whole word goes on, s$
    ("mothers-in-law", "mother-in-law"),  # "in" is: the first part is singularised
    ("dogs'", "dog's"),       # trailing apostrophe: singularise "dogs", add "'s"
    ("spaghetti", "spaghettus"),  # ([octop|vir])i$ is a character class: "ti" -> "tus"
    ("pasta", "pastum"),      # ([ti])a$ -> "um"
    ("bases", "basis"),       # ((a)naly|(b)a|...)ses$ -> \1\2sis with \2 unmatched (empty)
])
def test_pattern_singularize(word, expected):
    assert pattern_singularize(word) == expected


def test_singulariser_per_protocol():
    # llava: "bus" -> "bu" is no bus mention, "buses" -> "bus" is; "canoes" -> "cano" and "ties" -> "ty" are none
    assert classes("A bus and two buses.", "llava") == ["bus"]
    assert classes("Two canoes and two ties.", "llava") == []
    # lmms and corrected singularise to the true singular (lmms-eval: WordNet's noun lemma)
    for p in ("lmms", "corrected"):
        assert classes("A bus and two buses.", p) == ["bus", "bus"]
        assert classes("Two canoes and two ties.", p) == ["boat", "tie"]


# ---------------------------------------------------------------- the synonym table


def test_reference_table_is_split_on_comma_space():
    assert len(REFERENCE_SYNONYMS) == 80 and tuple(r[0] for r in REFERENCE_SYNONYMS) == COCO_CLASSES
    # "scooter,  motor bike": the second space stays on the entry
    assert REFERENCE_WORD_TO_CLASS[" motor bike"] == "motorcycle" and "motor bike" not in REFERENCE_WORD_TO_CLASS
    assert REFERENCE_WORD_TO_CLASS[" cheesecake"] == "cake" and "cheesecake" not in REFERENCE_WORD_TO_CLASS
    assert REFERENCE_WORD_TO_CLASS["iPhone"] == "cell phone" and "iphone" not in REFERENCE_WORD_TO_CLASS
    # the line "cow, ..., bison " is stripped before the split
    assert REFERENCE_WORD_TO_CLASS["bison"] == "cow"


def test_entries_that_never_match_under_llava():
    # "motor bike" merges (a double word) into "motor bike", which is no entry of the table
    for p in ("llava", "lmms"):
        assert classes("A motor bike.", p) == []
        assert classes("A cheesecake and an iPhone.", p) == []
        assert classes("A motorbike.", p) == ["motorcycle"]  # the entry without the extra space
    assert classes("A motor bike.", "corrected") == ["motorcycle"]
    assert classes("A cheesecake and an iPhone.", "corrected") == ["cake", "cell phone"]
    # "tv/monitor" is one token under llava / lmms (no entry), two under corrected (tv twice)
    assert classes("A TV/monitor.", "llava") == classes("A TV/monitor.", "lmms") == []
    assert caption_objects("A TV/monitor.", "corrected") == [("tv", "tv"), ("monitor", "tv")]


# ---------------------------------------------------------------- double words, toilet seat


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_double_words(protocol):
    # "dogs" -> "dog", then "hot dog" is a double word: a hot dog, no dog
    assert caption_objects("Hot dogs.", protocol) == [("hot dog", "hot dog")]
    # llava / lmms: hot . dogs -- the "." token sits between; corrected: ". " is no white space
    assert caption_objects("A hot. Dogs run.", protocol) == [("dog", "dog")]
    assert caption_objects("Hot, dogs.", protocol) == [("dog", "dog")]
    # "teddy bear" is no bear; "baby elephant" -> elephant, "baby" alone is a person
    assert classes("A teddy bear.", protocol) == ["teddy bear"]
    assert classes("A baby elephant and a baby.", protocol) == ["elephant", "person"]
    # "bow tie" -> "tie"; "train tracks" -> "train track" (no table entry): no train
    assert caption_objects("A bow tie.", protocol) == [("tie", "tie")]
    assert classes("The train tracks.", protocol) == []
    # left to right: "passenger train" merges first (-> "train"), so "track" is left on its own
    assert classes("A passenger train track.", protocol) == ["train"]
    # "wine glasses" -> "wine glass"; "wine glass": llava singularises "glass" to "glas", and the
    # double word "wine glas" -> "wine glass"; the other protocols keep "glass"
    assert classes("Two wine glasses and a wine glass.", protocol) == ["wine glass", "wine glass"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_toilet_seat(protocol):
    assert caption_objects("A toilet seat.", protocol) == [("toilet", "toilet")]   # double word
    # "seat" is dropped whenever "toilet" is among the words
    assert caption_objects("The seat of the toilet is up.", protocol) == [("toilet", "toilet")]
    assert classes("A seat next to a toilet seat.", protocol) == ["toilet"]
    assert caption_objects("A seat.", protocol) == [("seat", "chair")]


def test_caption_words_keep_punctuation_under_llava():
    # after merging: a hot . dog ; the "." token stays in the list under llava
    assert caption_words("A hot. Dogs.", "llava") == ["a", "hot", ".", "dog", "."]
    assert caption_words("A hot. Dogs.", "corrected") == ["a", "hot", "dog"]


# ---------------------------------------------------------------- ground truth


def test_ground_truth_per_protocol():
    caps = ["A man on a bus.", "A man with a cheesecake."]
    # llava: person from the instances and "man"; "bus" -> "bu" and " cheesecake" match nothing
    assert ground_truth_objects(["person"], caps, protocol="llava") == {"person"}
    # lmms: the true singular "bus"; the table still has " cheesecake"
    assert ground_truth_objects(["person"], caps, protocol="lmms") == {"person", "bus"}
    assert ground_truth_objects(["person"], caps, protocol="corrected") == {"person", "bus", "cake"}
    # instance names go through the table; a name that is none is an error
    assert ground_truth_objects(["hair drier", "tv"], protocol="llava") == {"hair drier", "tv"}
    with pytest.raises(ValueError, match="'spaceship' is not a COCO class or synonym"):
        ground_truth_objects(["spaceship"], protocol="llava")


# ---------------------------------------------------------------- a worked example


def _items():
    return [
        Item(id="1", dataset="chair", image="1.jpg", question="q", formatted_question="q", answers=("bus", "person"),
             split="val2014", metadata={"instance_names": ["bus", "person"],
                                        "captions": ["A man waits at a bus stop.", "People near two buses."]}),
        Item(id="2", dataset="chair", image="2.jpg", question="q", formatted_question="q", answers=("dog",),
             split="val2014", metadata={"instance_names": ["dog"], "captions": ["A dog sleeping on a couch."]}),
        Item(id="3", dataset="chair", image="3.jpg", question="q", formatted_question="q", answers=("toilet",),
             split="val2014", metadata={"instance_names": ["toilet"],
                                        "captions": ["A white toilet in a bathroom.", "A toilet with the seat up."]}),
    ]


PREDICTIONS = {
    "1": "A man next to a bus and a motor bike.",
    "2": "Two dogs on a sofa near a TV/monitor.",
    "3": "A toilet seat and a sink with two ties hanging.",
}
# Ground truth (every protocol): 1 {person, bus} (instances; the captions add person "man" /
# "people" and, except under llava where "bus" -> "bu", bus); 2 {dog, couch} (the caption's
# couch); 3 {toilet} (the second caption drops "seat": it also says "toilet").
GROUND_TRUTH = {"1": {"person", "bus"}, "2": {"dog", "couch"}, "3": {"toilet"}}


def test_worked_example_ground_truth():
    for p in PROTOCOLS:
        assert {it.id: item_ground_truth(it, protocol=p) for it in _items()} == GROUND_TRUTH


def test_worked_example_llava():
    # 1: man (person); "bus" -> "bu": none; "motor bike": no entry -> 1 mention, 0 hallucinated, covers person
    # 2: dogs (dog), sofa (couch); "tv/monitor": no entry -> 2 mentions, 0 hallucinated, covers dog, couch
    # 3: "toilet seat" -> toilet, sink; "ties" -> "ty": none -> 2 mentions, sink hallucinated, covers toilet
    m = chair_score_items(PREDICTIONS, _items(), protocol="llava")
    assert m["n"] == 3 and m["mentions"] == 5 and m["hallucinated_mentions"] == 1
    assert m["chair_s"] == pytest.approx(1 / 3)   # only caption 3
    assert m["chair_i"] == pytest.approx(1 / 5)
    assert m["recall"] == pytest.approx(4 / 5)    # (1 + 2 + 1) / (2 + 2 + 1)
    assert m["mean_mentions"] == pytest.approx(5 / 3)
    # words: 10 + 8 + 10 white-space words
    assert m["mean_length_words"] == pytest.approx(28 / 3)
    # tokens after merging: 11 - 1 ("motor bike") + 9 + 11 - 1 ("toilet seat")
    assert m["mean_length_tokens"] == pytest.approx(29 / 3)
    assert chair_metrics(PREDICTIONS, GROUND_TRUTH, protocol="llava") == m


def test_worked_example_corrected():
    # 1: man, bus, motor bike (motorcycle) -> 3 mentions, motorcycle hallucinated, covers person, bus
    # 2: dogs, sofa, tv, monitor (tv) -> 4 mentions, tv twice hallucinated, covers dog, couch
    # 3: toilet seat (toilet), sink, ties (tie) -> 3 mentions, sink and tie hallucinated, covers toilet
    m = chair_score_items(PREDICTIONS, _items(), protocol="corrected")
    assert m["mentions"] == 10 and m["hallucinated_mentions"] == 5 and m["hallucinated_captions"] == 3
    assert m["chair_s"] == pytest.approx(1.0)
    assert m["chair_i"] == pytest.approx(5 / 10)
    assert m["recall"] == pytest.approx(5 / 5)
    assert m["mean_length_words"] == pytest.approx(28 / 3)
    assert m["mean_length_tokens"] == pytest.approx((9 + 9 + 9) / 3)  # no punctuation tokens


def test_worked_example_lmms():
    # llava's tokens and table, true singulars: 1 man, bus ("motor bike" no entry); 2 dog, couch
    # ("tv/monitor" one token); 3 toilet, sink, tie -> 7 mentions, sink and tie hallucinated
    m = chair_score_items(PREDICTIONS, _items(), protocol="lmms")
    assert m["mentions"] == 7 and m["hallucinated_mentions"] == 2
    assert m["chair_s"] == pytest.approx(1 / 3) and m["chair_i"] == pytest.approx(2 / 7)
    assert m["recall"] == pytest.approx(5 / 5)


def test_default_protocol_is_llava_and_items_without_metadata():
    assert chair_metrics(PREDICTIONS, GROUND_TRUTH) == chair_metrics(PREDICTIONS, GROUND_TRUTH, protocol="llava")
    # an item without instance names / captions is scored against its answers as they are
    bare = Item(id="9", dataset="chair", image="x.jpg", question="q", formatted_question="q", answers=("cat",),
                split="val2014")
    assert item_ground_truth(bare) == {"cat"}
    assert chair_score_items({"9": "A dog."}, [bare])["chair_s"] == 1.0


def test_mean_length_words():
    # "A dog, a cat." is 4 white-space words ("dog," is one); "Dogs." 1 -> 2.5
    m = chair_metrics(["A dog, a cat.", "Dogs."], [{"dog"}, {"dog"}], protocol="llava")
    assert m["mean_length_words"] == pytest.approx(2.5)
    # llava tokens: a dog , a cat . (6) and dogs . (2)
    assert m["mean_length_tokens"] == pytest.approx(4.0)
    m = chair_metrics(["A dog, a cat.", "Dogs."], [{"dog"}, {"dog"}], protocol="corrected")
    assert m["mean_length_words"] == pytest.approx(2.5) and m["mean_length_tokens"] == pytest.approx(2.5)
    assert chair_metrics([], [])["mean_length_words"] == 0.0


# ---------------------------------------------------------------- the loader: image ids


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_fixtures(str(tmp_path_factory.mktemp("fx")))["chair"]  # images 42, 73, 74, 133


def _write(tmp_path, name, text):
    path = os.path.join(tmp_path, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def test_image_ids(coco, tmp_path):
    data_dir, image_dir = coco
    ds = load_chair(data_dir, image_dir, image_ids=[133, 42])
    assert [it.id for it in ds] == ["133", "42"] and ds.stats.filtered == 2
    path = _write(tmp_path, "ids.txt", "COCO_val2014_000000000133.jpg\n\n# OPERA's list\n  42 \n")
    assert read_image_ids(path) == [133, 42]
    assert [it.id for it in load_dataset("chair", data_dir, image_dir, image_ids=path)] == ["133", "42"]
    path = _write(tmp_path, "ids.json", '[74, "val2014/COCO_val2014_000000000073.jpg", "000000000042.jpg"]')
    assert read_image_ids(path) == [74, 73, 42]
    # without image_ids: the seeded sample as before
    assert [it.id for it in load_chair(data_dir, image_dir, n_images=2, seed=3)] == \
           [it.id for it in load_chair(data_dir, image_dir, n_images=2, seed=3)]


def test_image_id_errors(coco, tmp_path):
    data_dir, image_dir = coco
    bad = _write(tmp_path, "bad.txt", "42\nforty-two\n")
    with pytest.raises(DatasetError) as e:
        read_image_ids(bad)
    assert str(e.value) == f"{bad}:2: not a COCO image id or file name: 'forty-two'"
    rep = _write(tmp_path, "rep.txt", "42\n73\nCOCO_val2014_000000000042.jpg\n")
    with pytest.raises(DatasetError) as e:
        read_image_ids(rep)
    assert str(e.value) == f"{rep}:3: image id 42 repeats (first at line 1)"
    js = _write(tmp_path, "bad.json", "[42, true]")
    with pytest.raises(DatasetError) as e:
        read_image_ids(js)
    assert str(e.value) == f"{js} ([1]): not a COCO image id or file name: True"
    empty = _write(tmp_path, "empty.txt", "# nothing\n")
    with pytest.raises(DatasetError, match="no image ids"):
        read_image_ids(empty)
    with pytest.raises(DatasetError) as e:
        load_chair(data_dir, image_dir, image_ids=[42, 999, 5])
    assert str(e.value) == f"{os.path.join(data_dir, 'instances_val2014.json')}: 2 of the 3 image ids are not " \
                           f"in the instances file: 999, 5"
    with pytest.raises(ValueError, match=r"image_ids\[1\]: image id 42 repeats"):
        load_chair(data_dir, image_dir, image_ids=[42, 42])
    with pytest.raises(ValueError, match=r"image_ids\[0\] is not a COCO image id"):
        load_chair(data_dir, image_dir, image_ids=[4.2])


def test_loader_keeps_what_rebuilds_the_ground_truth(coco):
    data_dir, image_dir = coco
    it = load_chair(data_dir, image_dir, image_ids=[73])[0]
    # image 73: instances bus, car; captions "A yellow bus parked on the street." and "Two cars behind a big bus."
    assert it.metadata["instance_names"] == ["bus", "car"]
    assert it.metadata["captions"] == ["A yellow bus parked on the street.", "Two cars behind a big bus."]
    # llava: "bus" -> "bu" in both captions, "cars" -> car: the captions add car only
    assert it.metadata["caption_objects"] == ["car"] and it.answers == ("bus", "car")
    # "A bus." mentions nothing under llava ("bu"), a (true) bus under corrected
    assert chair_score_items({"73": "A bus."}, [it], protocol="llava")["mentions"] == 0
    m = chair_score_items({"73": "A bus."}, [it], protocol="corrected")
    assert m["mentions"] == 1 and m["chair_s"] == 0.0 and m["recall"] == pytest.approx(1 / 2)
    with open(os.path.join(data_dir, "instances_val2014.json")) as f:
        assert {c["name"] for c in json.load(f)["categories"]} >= {"bus", "car"}
