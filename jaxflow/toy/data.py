"""Synthetic shapes VQA: coloured shapes on a textured background, where the answer's location is known.

Every sample records the boxes of its objects, so we know where the information is: an instrument
(CAM, attention) that points elsewhere is wrong. Question kinds:
- existence  "Is there a red circle in the image?" -> "Yes" / "No", negatives drawn POPE-style:
  random (any absent colour-shape pair), popular (the most frequent absent pairs of the data
  distribution) and adversarial (absent pairs sharing the colour or the shape of a present object);
- attribute  "What color is the circle?" -> "red" (asked only when exactly one circle is present);
- counting   "How many shapes are there?" -> "two";
- caption    "Describe the image." -> "a red circle and a blue square" (objects left to right).
Batches are a pure function of (seed, step): training resumes exactly.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (150, 60, 190), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
# a skewed prior over colours and shapes, so that "popular" negatives mean something
COLOR_PRIOR = np.array([0.26, 0.2, 0.18, 0.14, 0.12, 0.10])
SHAPE_PRIOR = np.array([0.4, 0.35, 0.25])
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
KINDS = ("existence", "attribute", "counting", "caption")
KIND_WEIGHTS = (0.55, 0.2, 0.1, 0.15)
POPE_SPLITS = ("random", "popular", "adversarial")
IMAGE_SIZE = 112


@dataclasses.dataclass(frozen=True)
class ToyObject:
    color: str
    shape: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in pixels


@dataclasses.dataclass
class ToyExample:
    image: Image.Image
    objects: list[ToyObject]
    question: str
    answer: str
    kind: str
    split: str = ""  # POPE split of an existence question
    target: ToyObject | None = None  # the object the question is about (existence "Yes", attribute)


def _pairs_by_popularity() -> list[tuple[str, str]]:
    colors = list(COLORS)
    scores = {(c, s): COLOR_PRIOR[i] * SHAPE_PRIOR[j] for i, c in enumerate(colors) for j, s in enumerate(SHAPES)}
    return sorted(scores, key=lambda p: -scores[p])


POPULAR = _pairs_by_popularity()


def sample_objects(rng: np.random.Generator, size: int = IMAGE_SIZE, max_objects: int = 3) -> list[ToyObject]:
    """1..max_objects non-overlapping objects with distinct (colour, shape) pairs."""
    n = int(rng.integers(1, max_objects + 1))
    colors = list(COLORS)
    objs: list[ToyObject] = []
    while len(objs) < n:
        c = colors[rng.choice(len(colors), p=COLOR_PRIOR)]
        s = SHAPES[rng.choice(len(SHAPES), p=SHAPE_PRIOR)]
        if any(o.color == c and o.shape == s for o in objs):
            continue
        for _ in range(50):
            w = int(rng.integers(size * 22 // 100, size * 34 // 100))
            x0, y0 = int(rng.integers(2, size - w - 2)), int(rng.integers(2, size - w - 2))
            box = (x0, y0, x0 + w, y0 + w)
            if all(box[2] + 3 <= o.box[0] or o.box[2] + 3 <= box[0] or box[3] + 3 <= o.box[1]
                   or o.box[3] + 3 <= box[1] for o in objs):
                objs.append(ToyObject(c, s, box))
                break
        else:
            break
    return objs


def render(objects: list[ToyObject], rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """A textured grey-ish background (low-frequency tint + pixel noise) with the shapes drawn on it."""
    base = rng.integers(90, 170, size=3)
    coarse = rng.normal(0, 18, size=(size // 16 + 1, size // 16 + 1, 3))
    tint = np.kron(coarse, np.ones((16, 16, 1)))[:size, :size]
    noise = rng.normal(0, 10, size=(size, size, 3))
    bg = np.clip(base + tint + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    for o in objects:
        fill = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLORS[o.color])
        x0, y0, x1, y1 = o.box
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    return img


def caption(objects: list[ToyObject]) -> str:
    names = [f"a {o.color} {o.shape}" for o in sorted(objects, key=lambda o: (o.box[0], o.box[1]))]
    return names[0] if len(names) == 1 else " , ".join(names[:-1]) + " and " + names[-1]


def negative_pair(objects: list[ToyObject], split: str, rng: np.random.Generator) -> tuple[str, str]:
    present = {(o.color, o.shape) for o in objects}
    absent = [p for p in POPULAR if p not in present]
    if split == "random":
        return absent[int(rng.integers(len(absent)))]
    if split == "popular":
        return absent[int(rng.integers(min(3, len(absent))))]
    if split == "adversarial":  # shares a colour or a shape with something present
        close = [p for p in absent if any(p[0] == c or p[1] == s for c, s in present)]
        pool = close or absent
        return pool[int(rng.integers(len(pool)))]
    raise ValueError(f"unknown POPE split {split!r}; choose from {POPE_SPLITS}")


def existence_question(color: str, shape: str) -> str:
    return f"Is there a {color} {shape} in the image?"


def ask(objs: list[ToyObject], rng: np.random.Generator, kind: str, split: str | None = None,
        label: bool | None = None) -> tuple[str, str, str, ToyObject | None]:
    """One question of `kind` about these objects -> (question, answer, split, target); split/label
    (existence only) are drawn when not given."""
    if kind == "existence":
        split = split or POPE_SPLITS[int(rng.integers(3))]
        label = bool(rng.integers(2)) if label is None else label
        if label:
            target = objs[int(rng.integers(len(objs)))]
            return existence_question(target.color, target.shape), "Yes", split, target
        c, s = negative_pair(objs, split, rng)
        return existence_question(c, s), "No", split, None
    if kind == "attribute":
        unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        if not unique:
            raise ValueError("an attribute question needs a shape that occurs once")
        target = unique[int(rng.integers(len(unique)))]
        return f"What color is the {target.shape}?", target.color, "", target
    if kind == "counting":
        return "How many shapes are there?", NUMBER_WORDS[len(objs)], "", None
    if kind == "caption":
        return "Describe the image.", caption(objs), "", None
    raise ValueError(f"unknown question kind {kind!r}; choose from {KINDS}")


def make_example(rng: np.random.Generator, kind: str | None = None, split: str | None = None,
                 label: bool | None = None, size: int = IMAGE_SIZE) -> ToyExample:
    """One sample; kind/split/label are drawn when not given."""
    kind = kind or KINDS[rng.choice(len(KINDS), p=KIND_WEIGHTS)]
    if kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}; choose from {KINDS}")
    objs = sample_objects(rng, size)
    if kind == "attribute" and not any(sum(o.shape == s for o in objs) == 1 for s in SHAPES):
        objs = objs[:1]
    img = render(objs, rng, size)
    q, a, split, target = ask(objs, rng, kind, split, label)
    return ToyExample(img, objs, q, a, kind, split, target)


@dataclasses.dataclass
class ToyDialog:
    """One image and several question-answer turns about it (training packs them into one sequence:
    every turn's answer is supervised, the image is encoded once)."""
    image: Image.Image
    objects: list[ToyObject]
    turns: list[tuple[str, str, str]]  # (question, answer, kind)


def make_dialog(rng: np.random.Generator, turns: int, size: int = IMAGE_SIZE) -> ToyDialog:
    """An image and `turns` questions about it: the first turn is drawn like `make_example`'s (so a
    dialog's first turn is a sample of the single-question distribution), the others are existence
    questions (balanced yes/no over the POPE splits), with at most one non-existence question."""
    kind = KINDS[rng.choice(len(KINDS), p=KIND_WEIGHTS)]
    objs = sample_objects(rng, size)
    if kind == "attribute" and not any(sum(o.shape == s for o in objs) == 1 for s in SHAPES):
        objs = objs[:1]
    img = render(objs, rng, size)
    qa = [ask(objs, rng, kind)[:2] + (kind,)]
    for _ in range(turns - 1):
        qa.append(ask(objs, rng, "existence")[:2] + ("existence",))
    return ToyDialog(img, objs, qa)


def dialogs(seed: int, step: int, n: int, turns: int) -> list[ToyDialog]:
    """A deterministic list of n dialogs for (seed, step)."""
    rng = np.random.default_rng([seed, step])
    return [make_dialog(rng, turns) for _ in range(n)]


def examples(seed: int, step: int, n: int, **kw) -> list[ToyExample]:
    """A deterministic list of n samples for (seed, step)."""
    rng = np.random.default_rng([seed, step])
    return [make_example(rng, **kw) for _ in range(n)]
