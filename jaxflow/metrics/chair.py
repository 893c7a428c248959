"""CHAIR object-hallucination metrics for image captions (Rohrbach et al., EMNLP 2018).

A caption *mentions* a COCO class when one of its words is a word of the class in the CHAIR
synonym table (80 rows: the class name, then its synonyms). A mention *hallucinates* when its
class is not among the image's ground-truth classes: the image's instance annotations plus the
classes its reference captions mention, parsed by the same rules as the generated caption. Over
a set of captions (one per image):

- ``chair_s`` = captions with at least one hallucinated mention / captions;
- ``chair_i`` = hallucinated mentions / all mentions (a class mentioned twice counts twice);
- ``recall``  = sum over captions of |classes mentioned ∩ ground truth| / sum of |ground truth|
  (OPERA's and lmms-eval's definition; LisaAnne's script has no recall);
- ``mean_length_words`` = the mean number of words of a caption, words being the caption split
  on white space (``len(caption.split())``: "A dog, a cat." has 4), the same for every protocol;
- ``mean_length_tokens`` = the mean number of tokens of a caption after double-word merging
  (punctuation tokens included under llava / lmms): OPERA's "Len" as it prints it (it stores
  the mean / 100 and prints values x100);
- the counts ``n``, ``mentions``, ``hallucinated_mentions``, ``hallucinated_captions`` and
  ``mean_mentions`` (mentions per caption).

All are fractions or counts (the reference scripts print CHAIR and recall x100); a ratio with a
zero denominator is 0.0 (the reference scripts divide by zero).

Every function takes ``protocol``: ``"llava"`` (default), ``"lmms"`` or ``"corrected"``.

**"llava"** — exactly what ``utils/chair.py`` of LisaAnne/Hallucination computes (the script
LVLM papers run, directly or through OPERA's fork; OPERA's fork adds recall and "Len" and swaps
the singulariser for a WordNet lemmatiser — we keep its recall and Len, not its lemmatiser). The
steps, for one caption:

1. Tokenise ``nltk.word_tokenize(caption.lower())`` (``jaxflow.metrics.word_tokenize``: exact
   Treebank rules of nltk 3.8; Punkt sentence splitting approximated for abbreviations, see
   there). Punctuation tokens stay in the word list; "/" and "-" do not split.
   "A TV/monitor." -> ``a tv/monitor .``: "tv/monitor" is no word of the table, so no mention.
2. Singularise every token with pattern.en's ``singularize`` (``pattern_singularize``), wrong
   outputs included: "bus" -> "bu" and "minibus" -> "minibu" (no longer bus words), "canoes" ->
   "cano", "ties" -> "ty", "doggies" / "collies" / "magpies" stay plural or go wrong (no
   mention). "A bus." mentions nothing; "Two buses." mentions a bus ("buses" -> "bus").
3. Merge double words, left to right over consecutive tokens: when a token and the next, joined
   by a space, form a key of ``DOUBLE_WORDS``, both are replaced by its value and the scan
   goes on after them. The keys: the reference's list ``COCO_DOUBLE_WORDS`` ("hot dog",
   "teddy bear", "wine glass", "cell phone", "stop sign", ..., "home plate", "train track";
   LisaAnne's list already has "train track", it is no OPERA addition) mapped to themselves,
   "baby X" / "adult X" for the animal words -> X, "passenger jet" / "passenger train" ->
   "jet" / "train", "bow tie" -> "tie", "toilet seat" -> "toilet" and "wine glas" -> "wine
   glass" (the singulariser's "glass" -> "glas"). Merging runs after singularising
   ("hot dogs" -> "hot dog"). Punctuation is a token, so nothing merges across it: "A hot. Dogs
   run." -> ``a hot . dog run .`` mentions a dog, "Hot dogs." a hot dog. A merged name that is not
   a table word mentions nothing: "train tracks" -> "train track" (no train), "home plate".
   "A baby elephant." mentions an elephant, not a person ("baby" alone is a person).
4. Toilet seat: if the merged words contain both "toilet" and "seat", every "seat" is dropped
   ("The seat of the toilet." mentions only a toilet; "A seat." is a chair).
5. Mentions: the merged words that are words of the table, in order, with repeats, each mapped
   to its class. The table is ``SYNONYMS_TXT`` read as the reference reads data/synonyms.txt:
   each line stripped and split on ", ". So the entries " motor bike" and " cheesecake" (a
   second space after the comma) and "iPhone" (upper case, captions are lower-cased) never
   match: "A motor bike." merges to "motor bike", which is no table word: no mention;
   "A cheesecake." and "An iPhone." mention nothing.
6. Ground truth: the image's instance category names looked up in the same table, plus the
   mentions of its reference captions (steps 1-5).

**"lmms"** — lmms-eval's ``coco_cap_chair`` task (``tasks/coco_cap_chair/utils.py``). It uses
the same tokenisation, table (with the same " motor bike" / " cheesecake" / "iPhone" entries),
double words, toilet-seat rule and counting (CHAIR_s, CHAIR_i, recall as above) as llava, but
lemmatises each token with nltk's WordNet lemmatiser after part-of-speech tagging
(``nltk.pos_tag``), not with pattern.en. Both need nltk downloads (the tagger model and
WordNet), so this protocol is an **approximation**: tokens are singularised with our corrected
singulariser (``jaxflow.metrics.singularize``), which agrees with WordNet's noun lemmas on the
table words and their plurals ("bus" -> "bus", "buses" -> "bus", "canoes" -> "canoe", "ties" ->
"tie", "glasses" -> "glass"). Not reproduced: lemmas of words the tagger calls verbs or
adjectives (lmms-eval turns "seated" into "seat", a chair, or "skiing" into "ski", skis, where the
tagger says VBN / VBG). lmms-eval also reads each image's ground truth from its data set
(``gt_object`` of the Hugging Face set ``tsunghanwu/mscoco_chair``); here it is built from the
COCO files as under llava, with this protocol's parsing. Example: "A bus and two ties." ->
bus, tie (llava: no mention: "bu", "ty").

**"corrected"** — our parsing, with the reference's parsing accidents fixed:

1. Tokens are the lower-cased runs of letters and digits, hyphenated words kept whole
   ("t-shirt"); all other characters (punctuation, "/", apostrophes) separate tokens:
   "A TV/monitor." -> ``a tv monitor`` (two tv mentions); "dog's" -> ``dog s``.
2. Singularise with ``jaxflow.metrics.singularize`` (rule-based, offline): "bus" -> "bus",
   "buses" -> "bus", "glasses" -> "glass", "ties" -> "tie", "doggies" -> "doggie".
3. Double words as llava, but only between tokens separated by nothing but white space (the
   punctuation the tokens drop still blocks a merge; before protocols existed this parsing
   merged across it): "A hot. Dog." and "Hot, dogs." are a dog, "hot dogs" a hot dog,
   "hot-dog" one token (no mention).
4. Toilet seat as llava.
5. The table with each entry stripped of spaces and lower-cased: "motor bike" is a motorcycle,
   "cheesecake" a cake, "iPhone" a cell phone.
6. Ground truth as llava, with this protocol's parsing (instance names are looked up stripped
   and lower-cased).

Worked example, ground truth {person, bus}: "A man by two buses and a motor bike." -> llava:
man (person), bus (from "buses") — no hallucination; "motor bike" mentions nothing. corrected:
man, bus, motorcycle — motorcycle hallucinated. "A man near a bus." -> llava: man only ("bu");
corrected: man, bus.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping

from jaxflow.metrics._common import align, ratio
from jaxflow.metrics.pattern_singularize import pattern_singularize
from jaxflow.metrics.singularize import singularize
from jaxflow.metrics.word_tokenize import word_tokenize

PROTOCOLS = ("llava", "lmms", "corrected")


def check_protocol(protocol: str) -> str:
    """The protocol, or ValueError naming the valid ones."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown CHAIR protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    return protocol


# The 80 COCO object classes, in category-id order (as in instances_val2014.json "categories").
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# The synonym table of the CHAIR paper (data/synonyms.txt): one line per COCO class, the class
# name first, then the words that count as a mention of it. Reproduced line for line.
SYNONYMS_TXT = """\
person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, person, woman, guy, foreigner, child, gentleman, caller, offender, coworker, trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, teenager, student, camper, driver, solider, hunter, shopper, villager
bicycle, bike, bicycle, bike, unicycle, minibike, trike
car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi
motorcycle, scooter,  motor bike, motor cycle, motorbike, scooter, moped
airplane, jetliner, plane, air plane, monoplane, aircraft, jet, jetliner, airbus, biplane, seaplane
bus, minibus, trolley
train, locomotive, tramway, caboose
truck, pickup, lorry, hauler, firetruck
boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship
traffic light, street light, traffic signal, stop light, streetlight, stoplight
fire hydrant, hydrant
stop sign
parking meter
bench, pew
bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, vulture, condor, macaw, peafowl, cockatoo, songbird
cat, kitten, feline, tabby
dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky
horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco
sheep, lamb, ram, lamb, goat, ewe
cow, cattle, oxen, ox, calf, cattle, holstein, heifer, buffalo, bull, zebu, bison 
elephant
bear, panda
zebra
giraffe
backpack, knapsack
umbrella
handbag, wallet, purse, briefcase
tie, bow, bow tie
suitcase, suit case, luggage
frisbee
skis, ski
snowboard
sports ball, ball
kite
baseball bat
baseball glove
skateboard
surfboard, longboard, skimboard, shortboard, wakeboard
tennis racket, racket
bottle
wine glass
cup
fork
knife, pocketknife, knive
spoon
bowl, container
banana
apple
sandwich, burger, sub, cheeseburger, hamburger
orange
broccoli
carrot
hot dog
pizza
donut, doughnut, bagel
cake,  cheesecake, cupcake, shortcake, coffeecake, pancake
chair, seat, stool
couch, sofa, recliner, futon, loveseat, settee, chesterfield 
potted plant, houseplant
bed
dining table, table, desk
toilet, urinal, commode, toilet, lavatory, potty
tv, monitor, televison, television
laptop, computer, notebook, netbook, lenovo, macbook, laptop computer
mouse
remote
keyboard
cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iPhone
microwave
oven, stovetop, stove, stove top oven
toaster
sink
refrigerator, fridge, fridge, freezer
book
clock
vase
scissors
teddy bear, teddybear
hair drier, hairdryer
toothbrush
"""


def _parse_synonyms(text: str) -> tuple[tuple[str, ...], ...]:
    rows = []
    for line in text.splitlines():
        words: list[str] = []
        for w in line.split(","):
            w = " ".join(w.split()).lower()
            if w and w not in words:
                words.append(w)
        if words:
            rows.append(tuple(words))
    return tuple(rows)


# corrected: ((class, synonym, ...), ...), 80 rows, class name first, entries stripped and
# lower-cased, duplicates dropped.
SYNONYMS = _parse_synonyms(SYNONYMS_TXT)
# corrected: word -> COCO class ("node word"), for every class name and synonym.
WORD_TO_CLASS = {w: row[0] for row in SYNONYMS for w in row}

# llava / lmms: the rows as the reference reads data/synonyms.txt: each line stripped, then split
# on ", " — " motor bike" and " cheesecake" keep their leading space, "iPhone" its capital.
REFERENCE_SYNONYMS = tuple(tuple(line.strip().split(", ")) for line in SYNONYMS_TXT.splitlines() if line.strip())
REFERENCE_WORD_TO_CLASS = {w: row[0] for row in REFERENCE_SYNONYMS for w in row}

# Common two-word names in COCO captions that are treated as one word (the reference list; it
# names "hot dog" and "teddy bear" twice, which changes nothing).
COCO_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track",
)
# "baby"/"adult" before an animal would fire "person" (both are person synonyms): "baby bird" -> "bird".
ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
                "animal", "cub")
# "passenger" before a vehicle would fire "person": "passenger jet" -> "jet".
VEHICLE_WORDS = ("jet", "train")


def _double_word_dict() -> dict[str, str]:
    d = {w: w for w in COCO_DOUBLE_WORDS}
    for a in ANIMAL_WORDS:
        d[f"baby {a}"] = a
        d[f"adult {a}"] = a
    for v in VEHICLE_WORDS:
        d[f"passenger {v}"] = v
    d["bow tie"] = "tie"
    d["toilet seat"] = "toilet"
    d["wine glas"] = "wine glass"  # pattern.en singularises "glass" to "glas"
    return d


# two consecutive (singularised) words -> the word they count as (every protocol). A double word
# that maps to something outside the synonym table ("home plate", "train track", "stove top oven"
# never forms: pairs only) mentions nothing.
DOUBLE_WORDS = _double_word_dict()

_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def _corrected_tokens(caption: str) -> tuple[list[str], list[bool]]:
    """corrected tokens and, per token, whether only white space separates it from the next."""
    text = caption.lower()
    toks, spans = [], []
    for m in _TOKEN.finditer(text):
        toks.append(m.group())
        spans.append(m.span())
    joins = [text[spans[i][1]:spans[i + 1][0]].isspace() for i in range(len(spans) - 1)] + [False]
    return toks, joins


def tokenize(caption: str, protocol: str = "llava") -> list[str]:
    """The caption's tokens before singularisation: llava / lmms ``nltk.word_tokenize`` of the
    lower-cased caption (punctuation tokens included); corrected: lower-cased runs of letters and
    digits, hyphenated words kept whole ("t-shirt")."""
    if check_protocol(protocol) == "corrected":
        return _corrected_tokens(caption)[0]
    return word_tokenize(caption.lower())


@functools.lru_cache(maxsize=1 << 16)
def _parse(caption: str, protocol: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(merged words, merged words after the toilet-seat rule, mentions) of one caption."""
    if protocol == "corrected":
        toks, joins = _corrected_tokens(caption)
        words = [singularize(w) for w in toks]
        table = WORD_TO_CLASS
    else:
        words = word_tokenize(caption.lower())
        joins = [True] * len(words)  # punctuation is a token of its own: a pair is always adjacent
        words = [(pattern_singularize if protocol == "llava" else singularize)(w) for w in words]
        table = REFERENCE_WORD_TO_CLASS
    merged: list[str] = []
    i = 0
    while i < len(words):
        if i + 1 < len(words) and joins[i]:
            pair = f"{words[i]} {words[i + 1]}"
            if pair in DOUBLE_WORDS:
                merged.append(DOUBLE_WORDS[pair])
                i += 2
                continue
        merged.append(words[i])
        i += 1
    final = merged
    if "toilet" in merged and "seat" in merged:
        final = [w for w in merged if w != "seat"]
    mentions = tuple((w, table[w]) for w in final if w in table)
    return tuple(merged), tuple(final), mentions


def caption_words(caption: str, protocol: str = "llava") -> list[str]:
    """The caption's tokens after singularisation, double-word merging and the toilet-seat rule
    (llava / lmms: punctuation tokens included)."""
    if not isinstance(caption, str):
        raise TypeError(f"a caption must be a string, got {type(caption).__name__}")
    return list(_parse(caption, check_protocol(protocol))[1])


def caption_objects(caption: str, protocol: str = "llava") -> list[tuple[str, str]]:
    """Every COCO-object mention in a caption, in order and with repeats: ``[(word, class), ...]``
    (e.g. "Two puppies and a man." -> [("puppy", "dog"), ("man", "person")])."""
    if not isinstance(caption, str):
        raise TypeError(f"a caption must be a string, got {type(caption).__name__}")
    return list(_parse(caption, check_protocol(protocol))[2])


def class_of(name: str, protocol: str = "llava") -> str:
    """The COCO class of an instance category name (or synonym) under the protocol's table:
    llava / lmms look the name up as it is (as the reference does with the category names of
    instances_val2014.json, where every name is a class name as written); corrected strips and
    lower-cases it, and so do llava / lmms for a name not found as written (the reference
    would stop with a KeyError). ValueError if it is no class or synonym."""
    cls = None
    if check_protocol(protocol) != "corrected" and isinstance(name, str):
        cls = REFERENCE_WORD_TO_CLASS.get(name)
    if cls is None:  # corrected; and a name the reference would fail on (KeyError) under llava / lmms
        cls = WORD_TO_CLASS.get(" ".join(str(name).split()).lower())
    if cls is None:
        raise ValueError(f"{name!r} is not a COCO class or synonym")
    return cls


def ground_truth_objects(instance_classes: Iterable[str] = (), captions: Iterable[str] = (), *,
                         protocol: str = "llava") -> set[str]:
    """An image's ground-truth classes under the protocol: its instance annotations' category names
    (mapped through the protocol's synonym table) plus the classes its reference captions mention
    (parsed with the protocol's rules)."""
    check_protocol(protocol)
    objects = {class_of(name, protocol) for name in instance_classes}
    for cap in captions:
        objects.update(cls for _, cls in caption_objects(cap, protocol))
    return objects


def analyse_caption(caption: str, ground_truth: Iterable[str], *, protocol: str = "llava") -> dict:
    """One caption against its image's ground-truth classes: ``mentions`` [(word, class)],
    ``hallucinated`` [(word, class)] (mentions whose class is not in the ground truth, repeats
    kept), ``covered`` (sorted ground-truth classes mentioned), ``ground_truth`` (sorted)."""
    gt = set(ground_truth)
    mentions = caption_objects(caption, protocol)
    return {
        "mentions": mentions,
        "hallucinated": [(w, c) for w, c in mentions if c not in gt],
        "covered": sorted({c for _, c in mentions if c in gt}),
        "ground_truth": sorted(gt),
    }


def chair_metrics(predictions, references, *, protocol: str = "llava") -> dict[str, float]:
    """CHAIR_s, CHAIR_i and recall of generated captions under a protocol (module docstring).

    predictions: id -> caption (or a sequence); references: id -> the image's ground-truth COCO
    classes (an iterable of class names, e.g. from ``ground_truth_objects`` with the same
    protocol; synonyms are mapped to their class), or a sequence. Returns fractions in [0, 1]:
    ``chair_s``, ``chair_i``, ``recall``, plus ``mean_length_words`` (white-space words per
    caption), ``mean_length_tokens`` (tokens after merging, OPERA's Len), the counts ``n``
    (captions), ``mentions``, ``hallucinated_mentions``, ``hallucinated_captions`` and
    ``mean_mentions`` (class mentions per caption). A ratio whose denominator is zero is 0.0.
    """
    check_protocol(protocol)
    rows = align(predictions, references)
    n_mentions = n_halluc = n_halluc_caps = n_covered = n_gt = n_words = n_tokens = 0
    for _, caption, gt in rows:
        if not isinstance(caption, str):
            raise TypeError(f"a caption must be a string, got {type(caption).__name__}")
        gt = {WORD_TO_CLASS.get(g, g) for g in ([gt] if isinstance(gt, str) else gt)}
        merged, _, mentions = _parse(caption, protocol)
        halluc = sum(c not in gt for _, c in mentions)
        n_mentions += len(mentions)
        n_halluc += halluc
        n_halluc_caps += bool(halluc)
        n_covered += len({c for _, c in mentions} & gt)
        n_gt += len(gt)
        n_words += len(caption.split())
        n_tokens += len(merged)
    n = len(rows)
    return {
        "chair_s": ratio(n_halluc_caps, n),
        "chair_i": ratio(n_halluc, n_mentions),
        "recall": ratio(n_covered, n_gt),
        "n": float(n),
        "mentions": float(n_mentions),
        "hallucinated_mentions": float(n_halluc),
        "hallucinated_captions": float(n_halluc_caps),
        "mean_mentions": ratio(n_mentions, n),
        "mean_length_words": ratio(n_words, n),
        "mean_length_tokens": ratio(n_tokens, n),
    }


def item_ground_truth(item, *, protocol: str = "llava") -> set[str]:
    """The ground-truth classes of a CHAIR item (``jaxflow.data.datasets.load_chair``) rebuilt
    under the protocol from its metadata: the instance category names (``instance_names``, else
    the classes ``instance_objects``) and the reference ``captions``. An item without that
    metadata (e.g. made by hand) gets its ``answers`` (class names) as they are."""
    check_protocol(protocol)
    meta = getattr(item, "metadata", None) or {}
    names = meta.get("instance_names", meta.get("instance_objects"))
    if names is None or "captions" not in meta:
        return {WORD_TO_CLASS.get(a, a) for a in item.answers}
    return ground_truth_objects(names, meta["captions"], protocol=protocol)


def chair_score_items(predictions: Mapping[str, str], items: Iterable, *, protocol: str = "llava") -> dict[str, float]:
    """``chair_metrics`` of predictions (item id -> caption) against CHAIR items, each item's
    ground truth rebuilt under the protocol (``item_ground_truth``). Every item needs a prediction
    and every prediction an item."""
    check_protocol(protocol)
    refs = {it.id: item_ground_truth(it, protocol=protocol) for it in items}
    return chair_metrics(predictions, refs, protocol=protocol)
