"""CHAIR object-hallucination metrics for image captions (Rohrbach et al., EMNLP 2018).

Follows the reference ``chair.py`` (github.com/LisaAnne/Hallucination, utils/chair.py) in the
version most LVLM papers run (the standalone / OPERA fork, which adds recall and the double word
"train track"):

1. lower-case and tokenise the caption, singularise every token (here: an offline rule-based
   singulariser, ``jaxflow.metrics.singularize``, in place of ``pattern.en.singularize``);
2. merge double words left to right ("hot dog", "teddy bear", "baby dog" -> "dog",
   "passenger train" -> "train", "toilet seat" -> "toilet", ...);
3. drop "seat" when the caption also says "toilet" (the seat of a toilet is not a chair);
4. keep the words of the synonym table and map each to its COCO class (its "node word").

A caption hallucinates when it mentions a class that is not among the image's ground-truth
objects: the COCO instance annotations plus the classes mentioned in the image's reference
captions (parsed the same way). Per data set:

- ``chair_s`` = captions with at least one hallucinated mention / captions;
- ``chair_i`` = hallucinated mentions / all class mentions (repeated mentions count each time);
- ``recall``  = sum over images of |mentioned ∩ ground truth| / sum of |ground truth|.

Two deliberate departures from the reference text file, both fixes of parsing accidents: entries
are stripped and lower-cased (the reference splits on ", " and so never matches " motor bike",
" cheesecake" or "iPhone").
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from jaxflow.metrics._common import align, ratio
from jaxflow.metrics.singularize import singularize

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


# ((class, synonym, ...), ...): 80 rows, class name first.
SYNONYMS = _parse_synonyms(SYNONYMS_TXT)
# word -> COCO class ("node word"), for every class name and synonym.
WORD_TO_CLASS = {w: row[0] for row in SYNONYMS for w in row}

# Common two-word names in COCO captions that are treated as one word (reference list, with the
# standalone/OPERA fork's "train track"; duplicates of the reference list dropped).
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
    d["wine glas"] = "wine glass"  # pattern.en singularises "glass" to "glas"; kept for parity
    return d


# two consecutive (singularised) words -> the word they count as. A double word that maps to
# something outside the synonym table ("home plate", "train track") removes both words.
DOUBLE_WORDS = _double_word_dict()

_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def tokenize(caption: str) -> list[str]:
    """Lower-cased word tokens: letters/digits, hyphenated words kept whole ("t-shirt"), all
    punctuation (apostrophes included) a separator."""
    return _TOKEN.findall(caption.lower())


def caption_words(caption: str) -> list[str]:
    """The caption's tokens after singularisation, double-word merging and the toilet-seat rule."""
    words = [singularize(w) for w in tokenize(caption)]
    merged: list[str] = []
    i = 0
    while i < len(words):
        pair = " ".join(words[i:i + 2])
        if i + 1 < len(words) and pair in DOUBLE_WORDS:
            merged.append(DOUBLE_WORDS[pair])
            i += 2
        else:
            merged.append(words[i])
            i += 1
    if "toilet" in merged and "seat" in merged:
        merged = [w for w in merged if w != "seat"]
    return merged


def caption_objects(caption: str) -> list[tuple[str, str]]:
    """Every COCO-object mention in a caption, in order and with repeats: ``[(word, class), ...]``
    (e.g. "Two puppies and a man." -> [("puppy", "dog"), ("man", "person")])."""
    return [(w, WORD_TO_CLASS[w]) for w in caption_words(caption) if w in WORD_TO_CLASS]


def ground_truth_objects(instance_classes: Iterable[str] = (), captions: Iterable[str] = ()) -> set[str]:
    """An image's ground-truth classes: its instance annotations' category names (mapped through
    the synonym table) plus the classes its reference captions mention."""
    objects = set()
    for name in instance_classes:
        key = " ".join(str(name).split()).lower()
        if key not in WORD_TO_CLASS:
            raise ValueError(f"{name!r} is not a COCO class or synonym")
        objects.add(WORD_TO_CLASS[key])
    for cap in captions:
        objects.update(cls for _, cls in caption_objects(cap))
    return objects


def analyse_caption(caption: str, ground_truth: Iterable[str]) -> dict:
    """One caption against its image's ground-truth classes: ``mentions`` [(word, class)],
    ``hallucinated`` [(word, class)] (mentions whose class is not in the ground truth, repeats
    kept), ``covered`` (sorted ground-truth classes mentioned), ``ground_truth`` (sorted)."""
    gt = set(ground_truth)
    mentions = caption_objects(caption)
    return {
        "mentions": mentions,
        "hallucinated": [(w, c) for w, c in mentions if c not in gt],
        "covered": sorted({c for _, c in mentions if c in gt}),
        "ground_truth": sorted(gt),
    }


def chair_metrics(predictions, references) -> dict[str, float]:
    """CHAIR_s, CHAIR_i and recall of generated captions.

    predictions: id -> caption (or a sequence); references: id -> the image's ground-truth COCO
    classes (an iterable of class names, e.g. from ``ground_truth_objects``), or a sequence.
    Returns fractions in [0, 1] (the reference prints them x100): ``chair_s``, ``chair_i``,
    ``recall``, plus the counts ``n`` (captions), ``mentions``, ``hallucinated_mentions``,
    ``hallucinated_captions`` and ``mean_mentions`` (class mentions per caption). A ratio whose
    denominator is zero is 0.0.
    """
    rows = align(predictions, references)
    n_mentions = n_halluc = n_halluc_caps = n_covered = n_gt = 0
    for _, caption, gt in rows:
        if not isinstance(caption, str):
            raise TypeError(f"a caption must be a string, got {type(caption).__name__}")
        gt = {WORD_TO_CLASS.get(g, g) for g in ([gt] if isinstance(gt, str) else gt)}
        res = analyse_caption(caption, gt)
        n_mentions += len(res["mentions"])
        n_halluc += len(res["hallucinated"])
        n_halluc_caps += bool(res["hallucinated"])
        n_covered += len(res["covered"])
        n_gt += len(gt)
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
    }
