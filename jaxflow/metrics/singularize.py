"""An offline, rule-based English singulariser for caption nouns (CHAIR).

The reference CHAIR code singularises every caption token with ``pattern.en.singularize`` (the
OPERA fork uses nltk's WordNet lemmatiser); both need downloads or unmaintained packages. This one
is a table of irregular plurals plus suffix rules, written for what matters in COCO captions:
every word of the CHAIR synonym table and its plural must land on a word of the table, and common
singular words that end in "s" ("bus", "glass", "tennis", "species") must stay as they are.

``singularize(word)`` expects one lower-case token and returns its singular; words it does not
recognise as plurals come back unchanged.
"""
from __future__ import annotations

import functools

# plural -> singular, applied to the whole word and (for the compound-friendly ones) as a suffix:
# "policemen" -> "policeman", "grandchildren" -> "grandchild".
IRREGULAR = {
    "people": "person", "persons": "person", "children": "child", "men": "man", "women": "woman",
    "mice": "mouse", "geese": "goose", "feet": "foot", "teeth": "tooth", "oxen": "ox",
    "lice": "louse", "dice": "die", "brethren": "brother", "kine": "cow",
    # -f / -fe plurals in -ves
    "knives": "knife", "wives": "wife", "lives": "life", "leaves": "leaf", "loaves": "loaf",
    "shelves": "shelf", "wolves": "wolf", "halves": "half", "calves": "calf", "scarves": "scarf",
    "elves": "elf", "thieves": "thief", "hooves": "hoof", "selves": "self", "sheaves": "sheaf",
    "wharves": "wharf", "dwarves": "dwarf",
    # Latin / Greek
    "cacti": "cactus", "fungi": "fungus", "octopi": "octopus", "radii": "radius", "stimuli": "stimulus",
    "alumni": "alumnus", "nuclei": "nucleus", "syllabi": "syllabus", "criteria": "criterion",
    "phenomena": "phenomenon", "analyses": "analysis", "crises": "crisis", "theses": "thesis",
    "diagnoses": "diagnosis", "hypotheses": "hypothesis", "oases": "oasis",
    "indices": "index", "matrices": "matrix", "vertices": "vertex", "appendices": "appendix",
    "larvae": "larva", "antennae": "antenna", "vertebrae": "vertebra",
    # -us plurals of words in -u
    "emus": "emu", "menus": "menu", "gnus": "gnu", "gurus": "guru", "tutus": "tutu", "haikus": "haiku",
    "tofus": "tofu", "zebus": "zebu",
    # plural forms whose singular keeps the "s"
    "buses": "bus", "busses": "bus", "minibuses": "minibus", "airbuses": "airbus",
    "gases": "gas", "canvases": "canvas", "atlases": "atlas", "irises": "iris", "ibises": "ibis",
    "walruses": "walrus", "octopuses": "octopus", "cactuses": "cactus", "circuses": "circus",
    "campuses": "campus", "viruses": "virus", "bonuses": "bonus", "platypuses": "platypus",
    "hippopotamuses": "hippopotamus", "rhinoceroses": "rhinoceros", "thermoses": "thermos",
    "lenses": "lens", "quizzes": "quiz", "trellises": "trellis", "hibiscuses": "hibiscus",
    "asparaguses": "asparagus", "citruses": "citrus", "choruses": "chorus", "trolleybuses": "trolleybus",
    "omnibuses": "omnibus", "taxis": "taxi", "maxis": "maxi", "yetis": "yeti", "confettis": "confetti",
}

# Irregular plurals that also end compounds ("policemen", "grandchildren", "businesswomen").
_IRREGULAR_SUFFIXES = ("children", "women", "men", "people", "geese", "teeth", "knives", "wives", "loaves",
                       "shelves", "wolves", "halves", "calves", "scarves", "thieves", "hooves")

# Words in "-men" that are not plurals of "-man".
_MEN_EXCEPTIONS = frozenset({
    "amen", "omen", "semen", "specimen", "abdomen", "stamen", "hymen", "lumen", "regimen", "ramen",
    "yemen", "albumen", "bitumen", "acumen", "rumen", "numen", "dolmen", "cyclamen", "germen",
})

# Same form in singular and plural, plural-only nouns, and singular words that end in "s".
UNINFLECTED = frozenset({
    "sheep", "deer", "fish", "moose", "bison", "series", "species", "aircraft", "watercraft",
    "hovercraft", "spacecraft", "salmon", "trout", "shrimp", "cod", "swine", "offspring", "cattle",
    "news", "means", "headquarters", "crossroads", "barracks", "gallows", "scissors", "pants",
    "trousers", "jeans", "shorts", "pajamas", "pyjamas", "tongs", "pliers", "binoculars", "goggles",
    "clothes", "sunglasses", "eyeglasses", "tweezers", "overalls", "leggings", "briefs", "suds",
    "physics", "mathematics", "economics", "politics", "athletics", "gymnastics", "ethics",
    "electronics", "graphics", "aerobics", "acoustics", "statistics", "logistics", "linguistics",
    "measles", "mumps", "diabetes", "rabies", "herpes", "billiards", "darts", "checkers", "dominoes",
    "thanks", "congratulations", "remains", "surroundings", "outskirts", "premises", "savings",
    "yes", "this", "his", "its", "is", "was", "has", "does", "goes", "us", "thus", "plus", "minus",
    "always", "perhaps", "whereas", "towards", "afterwards", "upwards", "downwards", "backwards",
    "forwards", "outdoors", "indoors", "sometimes", "besides", "across", "unless", "less", "nevertheless",
    "gas", "canvas", "atlas", "alias", "bias", "texas", "alas", "christmas", "overseas", "vegas", "las",
    "tennis", "iris", "pelvis", "trellis", "penis", "elvis", "paris", "ibis", "cannabis", "metropolis",
    "epidermis", "chassis", "mantis", "bis", "dis", "kudos", "chaos", "cosmos", "ethos", "pathos",
    "thermos", "asbestos", "rhinoceros", "lens", "mercedes", "hermes", "aries", "its",
    "marquis", "debris", "corps", "chassis", "precis", "rendezvous", "bourgeois",
})

# Singulars in "-ie" whose plural "-ies" must not become "-y" ("ties" -> "tie", "cookies" -> "cookie").
_IE_WORDS = frozenset({
    "tie", "pie", "lie", "die", "vie", "cookie", "movie", "brownie", "calorie", "goalie", "selfie",
    "smoothie", "zombie", "veggie", "rookie", "hippie", "genie", "prairie", "birdie", "doggie",
    "freebie", "hoodie", "sweetie", "collie", "beanie", "bookie", "cabbie", "sortie", "auntie",
    "oldie", "pixie", "yuppie", "magpie", "bowtie", "necktie", "boogie", "budgie", "eerie", "frie",
    "newbie", "quickie", "roomie", "techie", "toughie", "walkie", "talkie", "junkie", "groupie",
    "hottie", "cutie", "barbie", "kiddie", "bootie", "nightie", "lassie", "laddie", "coolie",
    "specie", "stogie", "wheelie", "indie", "dearie", "birdie", "rotisserie", "lingerie", "menagerie",
    "eyrie", "sushie", "pinkie", "cowrie", "potpie", "mountie", "bogie", "caddie", "coterie",
})

# Singulars in "-o" whose plural takes "-es" ("tomatoes" -> "tomato"); other "-oes" are "-oe" + "s"
# ("shoes" -> "shoe", "canoes" -> "canoe").
_O_ES_WORDS = frozenset({
    "tomato", "potato", "mango", "hero", "volcano", "echo", "domino", "buffalo", "mosquito", "tornado",
    "torpedo", "avocado", "cargo", "veto", "embargo", "motto", "grotto", "flamingo", "halo", "zero",
    "tuxedo", "calico", "dingo", "desperado", "mulatto", "innuendo", "lasso", "tomatillo", "banjo",
    "memento", "portico", "fresco", "archipelago", "jalapeno", "burro",
})

# "-ches" / "-shes" plurals whose singular ends in "-e" ("headaches" -> "headache").
_CHE_WORDS = frozenset({
    "ache", "headache", "toothache", "stomachache", "backache", "niche", "cache", "moustache",
    "mustache", "avalanche", "cliche", "psyche", "quiche", "creche", "microfiche", "douche", "cloche",
    "panache", "attache", "brioche", "gouache", "creche", "ganache",
})

@functools.lru_cache(maxsize=65536)
def singularize(word: str) -> str:
    """The singular of one lower-case token; non-plurals come back unchanged."""
    w = word
    if len(w) <= 2 or not w.isalpha() and "-" not in w:
        return w
    if "-" in w:  # "t-shirts" -> "t-shirt": singularise the last part
        head, _, tail = w.rpartition("-")
        return f"{head}-{singularize(tail)}" if tail else w
    if w in UNINFLECTED:
        return w
    if w in IRREGULAR:
        return IRREGULAR[w]
    for suffix in _IRREGULAR_SUFFIXES:
        if w.endswith(suffix) and len(w) > len(suffix):
            if suffix == "men" and w in _MEN_EXCEPTIONS:
                break
            return w[: -len(suffix)] + IRREGULAR[suffix]
    if not w.endswith("s") or w.endswith("ss"):
        return w
    # singular words in -us / -is / -sis / -tis / -xis ("bus", "cactus", "analysis", "mantis", "axis")
    if w.endswith(("us", "sis", "tis", "xis")):
        return w
    if len(w) == 3:  # "tvs" -> "tv", "ads" -> "ad"; short singulars are in UNINFLECTED
        return w[:-1]
    if w.endswith("ies"):
        stem = w[:-3]
        if stem + "ie" in _IE_WORDS or len(w) <= 4:
            return stem + "ie"
        return stem + "y"  # "puppies" -> "puppy", "ponies" -> "pony"
    if w.endswith("ves"):
        return w[:-1]  # "gloves" -> "glove", "stoves" -> "stove" (the -f plurals are irregular above)
    if w.endswith("oes"):
        stem = w[:-2]
        return stem if stem in _O_ES_WORDS else w[:-1]
    if w.endswith(("ches", "shes")):
        stem_e = w[:-1]
        return stem_e if stem_e in _CHE_WORDS else w[:-2]  # "benches" -> "bench"
    if w.endswith(("sses", "xes", "zzes")):
        return w[:-2]  # "glasses" -> "glass", "boxes" -> "box", "buzzes" -> "buzz"
    return w[:-1]  # "dogs" -> "dog", "horses" -> "horse", "skis" -> "ski", "bananas" -> "banana"
