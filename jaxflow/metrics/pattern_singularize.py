"""pattern.en's ``singularize`` as the reference CHAIR code runs it, wrong outputs included.

LisaAnne/Hallucination ``utils/chair.py`` singularises every caption token with
``pattern.en.singularize`` (Pattern 3.6, the version pip installs for Python 3; Pattern 2.6, which
the original Python 2 script ran, gives the same outputs except for words ending in "zombies" or
"bogies"). Pattern is unmaintained and does not install on current
Pythons, so ``pattern_singularize`` reproduces its documented procedure from its rules and
tables. The steps, in order, for one token ``word`` (CHAIR passes lower-case tokens):

1. **Compounds** — if the word contains "-" and its second part is a preposition of
   ``PREPOSITIONS``, singularise the first part and keep the rest: "mothers-in-law" ->
   "mother-in-law". Other hyphenated words go on whole: "t-shirts" -> "t-shirt" (step 7).
2. **Trailing apostrophe** — "dogs'" -> singularise "dogs", then append "'s": "dog's". (A lone
   "'" token becomes "'s": the empty word is returned unchanged by step 3.)
3. **Uninflected / uncountable** — if the word is a *suffix* of an entry of ``UNINFLECTED`` or
   ``UNCOUNTABLE`` it is returned unchanged. Note "suffix of an entry", not "equal to": "is"
   (end of "chassis"), "as" ("christmas"), "ears" ("shears"), "es", "ss", "ness" stay too.
4. **"-ie" words** — if the word ends with an entry of ``IE_WORDS`` + "s" it is returned
   *unchanged, plural included*: "doggies" -> "doggies", "collies" -> "collies", "cookies" ->
   "cookies" (the entries "^pie" and "^tie" contain a literal "^" and never match).
5. **Irregular plurals** — if the word ends with a key of ``IRREGULAR``, that ending is
   replaced: "people" -> "person", "children" -> "child", "women" -> "woman" (ends with
   "men"), "shelves" -> "shelve" (ends with "helves"), "taxes" -> "taxe" ("axes" -> "axe"),
   "your" -> "ymy" ("our" -> "my").
6. **Rules** — the first rule of ``RULES`` whose pattern is found in the word rewrites it
   (``re.sub``; an unmatched group counts as empty text).
7. Otherwise the word is returned unchanged.

Outputs that matter for CHAIR (the rule that fires in brackets; * = not the true singular):

- "dogs" -> "dog", "skis" -> "ski", "tvs" -> "tv" (``s$`` -> "")
- "bus" -> "bu"*, "minibus" -> "minibu"*, "glass" -> "glas"*, "grass" -> "gras"*, "tennis" ->
  "tenni"*, "this" -> "thi"* (``s$`` -> "": every singular in -s loses it unless a table saves it)
- "buses" -> "bus" (``(bus)es$``), "glasses" -> "glass", "benches" -> "bench", "boxes" -> "box"
  (``(x|ch|ss|sh)es$``)
- "canoes" -> "cano"*, "toes" -> "to"* (``(o)es$``); "shoes" -> "shoe" (``(shoe)s$``)
- "ties" -> "ty"*, "pies" -> "py"*, "puppies" -> "puppy" (``([^aeiouy]|qu)ies$`` -> "y")
- "doggies" -> "doggies"* (step 4)
- "mice" -> "mouse", "slice" -> "slouse"* (``([m|l])ice$``); "oxen" -> "ox", "people" ->
  "person", "men" -> "man" (step 5)
- "knives" -> "knife" (``([nlw]i)ves$``), "wolves" -> "wolf" / "calves" -> "calf"
  (``([aeo]l)ves$``), "gloves" -> "glove" (``([aeo])ves$``)
- "scissors", "species", "series", "bison", "luggage" unchanged (step 3)
- "pasta" -> "pastum"*, "media" -> "medium" (``([ti])a$``); "spaghetti" -> "spaghettus"*
  (``([octop|vir])i$``, a character class)
"""
from __future__ import annotations

import functools
import re

# Second parts of compounds whose first part carries the plural ("mothers-in-law").
PREPOSITIONS = frozenset({
    "about", "before", "during", "of", "till", "above", "behind", "except", "off", "to", "across", "below",
    "for", "on", "under", "after", "beneath", "from", "onto", "until", "among", "beside", "in", "out", "unto",
    "around", "besides", "into", "over", "upon", "at", "between", "near", "since", "with", "athwart",
    "betwixt", "beyond", "but", "by",
})

UNINFLECTED = frozenset({
    "bison", "debris", "headquarters", "pincers", "trout", "bream", "diabetes", "herpes", "pliers", "tuna",
    "breeches", "djinn", "high-jinks", "proceedings", "whiting", "britches", "eland", "homework", "rabies",
    "wildebeest", "carp", "elk", "innings", "salmon", "chassis", "flounder", "jackanapes", "scissors",
    "christmas", "gallows", "mackerel", "series", "clippers", "georgia", "measles", "shears", "cod",
    "graffiti", "mews", "species", "contretemps", "mumps", "swine", "corps", "news", "swiss",
})

UNCOUNTABLE = frozenset({
    "advice", "equipment", "happiness", "luggage", "news", "software", "bread", "fruit", "information",
    "mathematics", "progress", "understanding", "butter", "furniture", "ketchup", "mayonnaise", "research",
    "water", "cheese", "garbage", "knowledge", "meat", "rice", "electricity", "gravel", "love", "mustard",
    "sand",
})

# Pattern 2.6 lacked the commas after "wildebeest", "water" and "zombie" (merging each with the next
# entry); Pattern 3.6 has them. Outputs that differ: "zombies" and "bogies" (2.6: "zombie", "bogy").
IE_WORDS = frozenset({
    "alergie", "cutie", "hoagie", "newbie", "softie", "veggie", "auntie", "doggie", "hottie", "nightie",
    "sortie", "weenie", "beanie", "eyrie", "indie", "oldie", "stoolie", "yuppie", "birdie", "freebie",
    "junkie", "^pie", "sweetie", "zombie", "bogie", "goonie", "laddie", "pixie", "techie", "bombie",
    "groupie", "laramie", "quickie", "^tie", "collie", "hankie", "lingerie", "reverie", "toughie", "cookie",
    "hippie", "meanie", "rookie", "valkyrie",
})
_IE_PLURALS = tuple(w + "s" for w in IE_WORDS)
# every suffix of an uninflected or uncountable entry, "" included (step 3 in one look-up)
_UNCHANGED_SUFFIXES = frozenset(w[i:] for w in UNINFLECTED | UNCOUNTABLE for i in range(len(w) + 1))

# plural ending -> singular ending (no key is a suffix of another, so their order does not matter)
IRREGULAR = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef", "brethren": "brother",
    "children": "child", "corpora": "corpus", "corpuses": "corpus", "ephemerides": "ephemeris", "feet": "foot",
    "ganglia": "ganglion", "geese": "goose", "genera": "genus", "genii": "genie", "graffiti": "graffito",
    "helves": "helve", "kine": "cow", "leaves": "leaf", "loaves": "loaf", "men": "man", "mongooses": "mongoose",
    "monies": "money", "moves": "move", "mythoi": "mythos", "numena": "numen", "occipita": "occiput",
    "octopodes": "octopus", "opera": "opus", "opuses": "opus", "our": "my", "oxen": "ox", "penes": "penis",
    "penises": "penis", "people": "person", "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth",
    "testes": "testis", "trilbys": "trilby", "turves": "turf", "zoa": "zoon",
}

_IRREGULAR_PLURALS = tuple(IRREGULAR)

# (pattern, replacement), tried in this order; the first pattern found in the word rewrites it.
RULES = tuple((re.compile(p), r) for p, r in (
    (r"(?i)(.)ae$", r"\1a"),
    (r"(?i)(.)itis$", r"\1itis"),
    (r"(?i)(.)eaux$", r"\1eau"),
    (r"(?i)(quiz)zes$", r"\1"),
    (r"(?i)(matr)ices$", r"\1ix"),
    (r"(?i)(ap|vert|ind)ices$", r"\1ex"),
    (r"(?i)^(ox)en", r"\1"),
    (r"(?i)(alias|status)es$", r"\1"),
    (r"(?i)([octop|vir])i$", r"\1us"),      # sic: a character class, so any word in -oi -ci -ti -pi -vi -ri -ii
    (r"(?i)(cris|ax|test)es$", r"\1is"),
    (r"(?i)(shoe)s$", r"\1"),
    (r"(?i)(o)es$", r"\1"),
    (r"(?i)(bus)es$", r"\1"),
    (r"(?i)([m|l])ice$", r"\1ouse"),
    (r"(?i)(x|ch|ss|sh)es$", r"\1"),
    (r"(?i)(m)ovies$", r"\1ovie"),
    (r"(?i)(.)ombies$", r"\1ombie"),
    (r"(?i)(s)eries$", r"\1eries"),
    (r"(?i)([^aeiouy]|qu)ies$", r"\1y"),
    # -f / -fe plurals in -ves (these six are case-sensitive)
    (r"([aeo]l)ves$", r"\1f"),
    (r"([^d]ea)ves$", r"\1f"),
    (r"arves$", r"arf"),
    (r"erves$", r"erve"),
    (r"([nlw]i)ves$", r"\1fe"),
    (r"(?i)([lr])ves$", r"\1f"),
    (r"([aeo])ves$", r"\1ve"),
    (r"(?i)(sive)s$", r"\1"),
    (r"(?i)(tive)s$", r"\1"),
    (r"(?i)(hive)s$", r"\1"),
    (r"(?i)([^f])ves$", r"\1fe"),
    # -ses
    (r"(?i)(^analy)ses$", r"\1sis"),
    (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
    (r"(?i)(.)opses$", r"\1opsis"),
    (r"(?i)(.)yses$", r"\1ysis"),
    (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"),
    (r"(?i)(.)oses$", r"\1osis"),
    # -a
    (r"(?i)([ti])a$", r"\1um"),
    (r"(?i)(n)ews$", r"\1ews"),
    (r"(?i)s$", r""),
))
# the last letters a rule needs (all rules but "^(ox)en" are anchored at the end: -s -e -x -i -a)
_RULE_ENDINGS = tuple("seixaSEIXA")


@functools.lru_cache(maxsize=65536)
def pattern_singularize(word: str) -> str:
    """``pattern.en.singularize(word)`` (see the module docstring for the steps)."""
    if "-" in word:
        parts = word.split("-")
        if parts[1] in PREPOSITIONS:
            return pattern_singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):
        return pattern_singularize(word[:-1]) + "'s"
    w = word.lower()
    if w in _UNCHANGED_SUFFIXES:
        return word
    if w.endswith(_IE_PLURALS):
        return w
    if w.endswith(_IRREGULAR_PLURALS):
        for plural, singular in IRREGULAR.items():
            if w.endswith(plural):
                return re.sub("(?i)" + plural + "$", singular, word)
    if not word.endswith(_RULE_ENDINGS) and not w.startswith("ox"):
        return word  # no rule can match (the rules need one of these endings, or "ox" + "en")
    for rx, rep in RULES:
        if rx.search(word):
            return rx.sub(rep, word)
    return word
