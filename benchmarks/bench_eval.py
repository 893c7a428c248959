"""Evaluation throughput: items/s of the truncation sweep (every cut layer K in one pass) against the
plain model, per item, on the tiny model and on the bench config.

    python benchmarks/bench_eval.py [--threads 2 --tiny_items 64 --batch 4 --repeats 5]

1. Tiny model (the random one of jaxflow.tiny, 4 layers, as a checkpoint): the real runner (`run_evaluation`, what
   scripts/evaluate.py runs: image loading, batching, generation, decoding, scoring, fsynced
   appends) on a POPE file of --tiny_items questions over the fixture images, --sweep all (K = 0..4,
   5 variants) and --sweep none. Cold = first run in the process (XLA compiles included); warm =
   median of --repeats further runs into fresh directories (compiled programs reused), the
   two modes interleaved round by round.
2. Bench config (benchmarks/common.py: LLaVA-1.5 structure, 32 layers of width 256, 576 image
   tokens, vocab 32064, random weights): `truncation_generate` over all 33 cut layers (and over a
   5-point grid 0, 8, 16, 24, 32) against `generate`, on `bench_inputs` (fixed random token ids: the
   tiny tokenizer cannot spell a 32064-token vocabulary), --batch rows, --text_tokens - 8 text tokens
   after the image, --max_new_tokens greedy steps with EOS disabled so every run decodes the same
   number of steps. One warm-up (compiling) call each, then --repeats rounds timing each once, order
   rotated per round (so drifting background load hits all alike).

The cost ratio is (seconds per item of the sweep) / (seconds per item of the plain run), the median of
the per-round ratios; the goal is <= 3. Results go to benchmarks/results/eval.json (git-ignored).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import common  # noqa: E402  (imports neither jax nor torch)

# objects the tiny tokenizer knows, with COCO classes (for labels against the fixture images)
_OBJECTS = ["dog", "person", "bus", "car", "cat", "chair", "cup", "bottle", "book", "bird", "horse", "truck",
            "train", "boat", "bed", "phone"]


def write_big_pope(fixture_root: str, n: int) -> tuple[str, str]:
    """A coco_pope_random.json with n questions over the fixture's COCO images (real format)."""
    from jaxflow.data.fixtures import _COCO_IMAGES, _coco_file_name

    images = list(_COCO_IMAGES.items())
    rows = []
    for q in range(n):
        imid, (_, _, classes, _) = images[q % len(images)]
        obj = _OBJECTS[(q // len(images)) % len(_OBJECTS)]
        rows.append({"question_id": q + 1, "image": _coco_file_name(imid), "text": f"Is there a {obj} in the image?",
                     "label": "yes" if obj in classes else "no"})
    data_dir = os.path.join(fixture_root, "pope_big")
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, "coco_pope_random.json"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return data_dir, os.path.join(fixture_root, "coco", "val2014")


def bench_tiny(args) -> dict:
    from jaxflow.data.fixtures import write_fixtures
    from jaxflow.evaluation import EvalConfig, run_evaluation
    from jaxflow.pipeline import load_bundle

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_fixtures(tmp)
        data_dir, image_dir = write_big_pope(tmp, args.tiny_items)
        from jaxflow.tiny import save_tiny_checkpoint

        ckpt = save_tiny_checkpoint(os.path.join(tmp, "tiny-random"))
        bundle = load_bundle(ckpt)

        def run(sweep, tag):
            cfg = EvalConfig(dataset="pope", checkpoint=ckpt, data_dir=data_dir, image_dir=image_dir, sweep=sweep,
                             batch_size=args.batch, out=os.path.join(tmp, f"{sweep}-{tag}"), progress=False,
                             max_new_tokens=args.max_new_tokens)
            t0 = time.perf_counter()
            res = run_evaluation(cfg, bundle=bundle)
            return res, time.perf_counter() - t0

        cold = {sweep: run(sweep, "cold") for sweep in ("all", "none")}
        warm = {"all": [], "none": []}
        for r in range(args.repeats):  # interleaved rounds: background load drifts affect both alike
            for sweep in (("all", "none") if r % 2 == 0 else ("none", "all")):
                warm[sweep].append(run(sweep, f"warm{r}")[0].seconds)
        for sweep in ("all", "none"):
            res, cold_total = cold[sweep]
            n = res.summary["n_items"]
            med = statistics.median(warm[sweep])
            out[sweep] = {"items": n, "variants": len(res.summary["layers"]), "cold_loop_s": res.seconds,
                          "cold_total_s": cold_total, "warm_loop_s": warm[sweep], "items_per_s": n / med,
                          "ms_per_item": 1e3 * med / n}
            print(f"  tiny --sweep {sweep:4s}: {n / med:8.1f} items/s warm ({1e3 * med / n:.2f} ms/item), "
                  f"cold {n / res.seconds:.1f} items/s ({res.seconds:.1f} s incl. compile)", flush=True)
    ratios = [a / b for a, b in zip(warm["all"], warm["none"])]
    out["cost_ratio"] = statistics.median(ratios)
    out["cost_ratio_rounds"] = ratios
    print(f"  tiny: sweep/plain cost per item = {out['cost_ratio']:.2f}x (median over {len(ratios)} rounds)",
          flush=True)
    return out


def bench_config(args) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    import jaxflow
    from jaxflow.models.config import from_hf_dict
    from jaxflow.models.llava import Llava

    t0 = time.perf_counter()
    cfg = from_hf_dict(common.bench_hf_config().to_dict())
    model = Llava(cfg, rngs=nnx.Rngs(0))
    build_s = time.perf_counter() - t0
    ids, mask, pix = common.bench_inputs(args.batch, args.text_tokens)
    L = cfg.text.num_layers
    m = args.max_new_tokens
    runs = {
        "none": lambda: jaxflow.generate(model, ids, pix, mask, max_new_tokens=m, eos_token_id=-1).tokens,
        "all": lambda: jaxflow.truncation_generate(model, ids, pix, mask, max_new_tokens=m, eos_token_id=-1).tokens,
        "grid5": lambda: jaxflow.truncation_generate(model, ids, pix, mask, layers=[0, 8, 16, 24, L],
                                                     max_new_tokens=m, eos_token_id=-1).tokens,
    }
    out = {"build_s": build_s, "batch": args.batch, "seq_len": int(ids.shape[1]),
           "text_after_image": int(args.text_tokens - common.SYSTEM_PREFIX_LEN), "max_new_tokens": m}
    first = {}
    for name, fn in runs.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        first[name] = time.perf_counter() - t0
    times = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.repeats):  # interleaved rounds, order rotated: drifting background load hits all alike
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            jax.block_until_ready(runs[name]())
            times[name].append(time.perf_counter() - t0)
    for name in runs:
        med = statistics.median(times[name])
        out[name] = {"first_call_s": first[name], "times_s": times[name], "median_s": med,
                     "items_per_s": args.batch / med, "s_per_item": med / args.batch}
        print(f"  bench config {name:5s}: {args.batch / med:7.3f} items/s ({med / args.batch:.3f} s/item; "
              f"first call {first[name]:.1f} s)", flush=True)
    # the K = L variant of the sweep is the plain model
    tg = jaxflow.truncation_generate(model, ids, pix, mask, max_new_tokens=m, eos_token_id=-1)
    out["k_eq_l_matches_plain"] = bool(np.array_equal(tg.tokens[-1], np.asarray(runs["none"]())))
    out["cost_ratio_rounds"] = [a / b for a, b in zip(times["all"], times["none"])]
    out["cost_ratio"] = statistics.median(out["cost_ratio_rounds"])
    out["cost_ratio_grid5"] = statistics.median([a / b for a, b in zip(times["grid5"], times["none"])])
    print(f"  bench config: sweep/plain cost per item = {out['cost_ratio']:.2f}x (all {L + 1} K), "
          f"{out['cost_ratio_grid5']:.2f}x (5 K); K = L equals plain: {out['k_eq_l_matches_plain']}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny_items", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text_tokens", type=int, default=64, help="bench config: tokens after the image block + 8")
    ap.add_argument("--max_new_tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip_tiny", action="store_true")
    ap.add_argument("--skip_bench_config", action="store_true")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "eval.json"))
    args = ap.parse_args()
    threads = common.set_threads(args.threads)
    t0 = time.perf_counter()
    import jax

    result = {"args": vars(args), "threads": threads, "jax": jax.__version__, "platform": platform.platform(),
              "load_avg_start": os.getloadavg()}
    if not args.skip_tiny:
        print("tiny model (the runner, POPE format, 5 variants):", flush=True)
        result["tiny"] = bench_tiny(args)
    if not args.skip_bench_config:
        print("bench config (32 layers, 576 image tokens, vocab 32064; random ids):", flush=True)
        result["bench_config"] = bench_config(args)
    result["load_avg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s; load average {result['load_avg_start'][0]:.1f} -> "
          f"{result['load_avg_end'][0]:.1f})")


if __name__ == "__main__":
    main()
