"""Scoring throughput of every protocol: CHAIR on 5,000 captions and ScienceQA on 4,241 predictions
(the ScienceQA test split's size), POPE on 8,910 answers and TextVQA on 5,000, side by side in one run.

    python benchmarks/bench_scoring.py [--repeats 3]

The inputs are synthetic but shaped like real ones (15-30 word COCO-style captions with 5 reference
captions and instance classes per image; "B" / "B. text" / "The answer is B." letters; yes/no
sentences; short VQA answers with 10 human answers). Each figure is the best of --repeats calls of
`jaxflow.metrics.score` on loader-shaped items, with the caches of the CHAIR parsers cleared before
every call (a fresh process's cost). The goal (issue: well under the model's time) is printed against
the model's own time per item: a 7B LVLM needs tens of milliseconds per item on a GPU."""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from types import SimpleNamespace

WORDS = ("a man woman dog cat bus car table chair pizza two three red blue sitting standing on in next to "
         "with of the near holding small large white black street kitchen room plate train track hot").split()
CLASSES = ("person", "dog", "cat", "bus", "car", "dining table", "chair", "pizza", "train", "hot dog")


def caption(rng: random.Random) -> str:
    n = rng.randint(15, 30)
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def items_chair(n: int, rng: random.Random):
    items, preds = [], {}
    for i in range(n):
        meta = {"instance_names": rng.sample(CLASSES, 3), "captions": [caption(rng) for _ in range(5)]}
        items.append(SimpleNamespace(id=str(i), answers=tuple(meta["instance_names"]), split="val2014",
                                     question="Describe.", metadata=meta))
        preds[str(i)] = caption(rng)
    return items, preds


def items_scienceqa(n: int, rng: random.Random):
    forms = ("{l}", "{l}. Paris", "The answer is {l}.", " {l}\n", "({l})", "I think {l}")
    items, preds = [], {}
    for i in range(n):
        k = rng.randint(2, 5)
        gold = "ABCDE"[rng.randrange(k)]
        items.append(SimpleNamespace(id=str(i), answers=(gold,), split="test", question="q",
                                     metadata={"choices": ["x"] * k, "subject": rng.choice(("natural", "social"))}))
        preds[str(i)] = rng.choice(forms).format(l="ABCDE"[rng.randrange(k)])
    return items, preds


def items_pope(n: int, rng: random.Random):
    forms = ("Yes", "No", "Yes, there is.", "No, there is not.", "NO", "There isn't.")
    items = [SimpleNamespace(id=str(i), answers=(rng.choice(("yes", "no")),), question="q",
                             split=("random", "popular", "adversarial")[i % 3], metadata={}) for i in range(n)]
    return items, {it.id: rng.choice(forms) for it in items}


def items_textvqa(n: int, rng: random.Random):
    vocab = ("coca-cola", "stop", "2", "the nike", "3.5", "yes", "dakota digital", "one")
    items = [SimpleNamespace(id=str(i), answers=tuple(rng.choice(vocab) for _ in range(10)), question=f"q{i % 50}",
                             split="val", metadata={"image_id": f"img{i % 300}"}) for i in range(n)]
    return items, {it.id: rng.choice(vocab).upper() for it in items}


def clear_caches():
    import jaxflow.metrics.chair as C

    for name in dir(C):
        fn = getattr(C, name)
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()
    for mod in ("jaxflow.metrics.pattern_singularize", "jaxflow.metrics.singularize", "jaxflow.metrics.word_tokenize"):
        m = __import__(mod, fromlist=["x"])
        for name in dir(m):
            fn = getattr(m, name)
            if hasattr(fn, "cache_clear"):
                fn.cache_clear()


def main():
    from jaxflow.metrics import PROTOCOLS, score

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = random.Random(0)
    sets = {"chair": items_chair(5000, rng), "scienceqa": items_scienceqa(4241, rng),
            "pope": items_pope(8910, rng), "textvqa": items_textvqa(5000, rng)}
    out = {}
    print(f"{'data set':10s} {'items':>6s} " + " ".join(f"{p:>12s}" for p in PROTOCOLS) + "   (seconds, best of "
          f"{args.repeats})")
    for name, (items, preds) in sets.items():
        row = {}
        for p in PROTOCOLS:
            best = float("inf")
            for _ in range(args.repeats):
                clear_caches()
                t0 = time.perf_counter()
                score(name, preds, items, protocol=p)
                best = min(best, time.perf_counter() - t0)
            row[p] = best
        out[name] = {"items": len(items), "seconds": row}
        print(f"{name:10s} {len(items):6d} " + " ".join(f"{row[p]:12.3f}" for p in PROTOCOLS)
              + f"   worst {1e3 * max(row.values()) / len(items):.3f} ms/item")
    worst = max(1e3 * max(v["seconds"].values()) / v["items"] for v in out.values())
    print(f"goal: scoring well under the model's time per item (tens of ms for a 7B LVLM on a GPU): "
          f"worst {worst:.3f} ms/item ({'met' if worst < 1.0 else 'MISSED'})")
    os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scoring.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
