"""Per-layer probes: seconds per 1,000 items for all layers (the features of every layer, then every
probe trained at every layer), warm (the programs compiled in a first pass, not timed).

    python benchmarks/bench_probes.py [--items 1002 --batch_size 16 --steps 500 --bench --no-truncation]

Two measurements, printed and written to benchmarks/results/probes.json:

1. The shipped toy model (4 decoder layers, width 128, 64 image tokens) on generated toy POPE
   questions (`--items`, rounded to a multiple of 3 splits), through the library exactly as
   scripts/probes.py runs it: `probe_features` (images loaded and preprocessed, the evaluation
   runner's batches, one forward per batch capturing the last prompt token of every layer) and
   `train_probes` (all 12 toy probes x 5 layers in one jitted optax loop). With truncation (default
   on) also the per-K decoding that locates the cliff (`probe_features(truncation="all")`), reported
   apart: it is what scripts/probes.py --cliff adds.
2. With --bench, the LLaVA bench config of benchmarks/common.py (32 decoder layers of width 256, 576
   image tokens, vocab 32064; random weights): `batch_features` on synthetic rows (576 image + 64
   text tokens) and `train_probes` of one binary probe at all 33 rows of (items, 33, 256) features.

The data generation (PIL rendering of the toy images) is not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def per_1000(seconds: float, n: int) -> float:
    return round(seconds * 1000.0 / n, 3)


def bench_toy(n_items: int, batch_size: int, steps: int, truncation: bool) -> dict:
    from jaxflow.analysis.probes import probe_features, train_probes
    from jaxflow.data.datasets import load_dataset
    from jaxflow.pipeline import load_bundle
    from jaxflow.toy.sets import write_toy_pope

    bundle = load_bundle(None)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, image_dir = write_toy_pope(tmp, max(1, -(-n_items // 3)), seed=7)
        items = load_dataset("toy_pope", data_dir, image_dir).items
        n = len(items)
        kw = {"batch_size": batch_size, "boxes": data_dir}
        t0 = time.perf_counter()
        feats = probe_features(bundle, items, **kw)  # compiles the batch shapes
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        feats = probe_features(bundle, items, **kw)
        t_feat = time.perf_counter() - t0
        t0 = time.perf_counter()
        train_probes(feats.features, feats.targets, groups=feats.groups, steps=steps)
        cold_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = train_probes(feats.features, feats.targets, groups=feats.groups, steps=steps)
        t_train = time.perf_counter() - t0
        out = {"model": "toy-llava (4 layers, width 128, 64 image tokens)", "items": n, "batch_size": batch_size,
               "probes": len(res.names), "layers": int(feats.features.shape[1]), "steps": steps,
               "features_s_per_1000": per_1000(t_feat, n), "training_s_per_1000": per_1000(t_train, n),
               "total_s_per_1000": per_1000(t_feat + t_train, n),
               "first_pass_s (compile included)": {"features": round(cold, 2), "training": round(cold_train, 2)}}
        if truncation:
            probe_features(bundle, items, truncation="all", **kw)  # compile the decoding programs
            t0 = time.perf_counter()
            probe_features(bundle, items, truncation="all", **kw)
            t_both = time.perf_counter() - t0
            out["truncation_decoding_s_per_1000"] = per_1000(max(t_both - t_feat, 0.0), n)
            out["with_cliff_total_s_per_1000"] = per_1000(t_both + t_train, n)
    return out


def bench_llava_config(n_items: int, batch_size: int, steps: int) -> dict:
    import jax

    from common import bench_config, random_jaxflow_model
    from jaxflow.analysis.probes import batch_features, train_probes

    cfg = bench_config("llava")
    model = random_jaxflow_model(cfg)
    ids, mask, px, kw = cfg.inputs_kw(batch=batch_size, text_tokens=64)
    batch_features(model, ids, px, mask, **kw)  # compile
    n_batches = -(-n_items // batch_size)
    reps = min(n_batches, 3)  # timed batches; the rest extrapolated (every batch is the same program)
    t0 = time.perf_counter()
    for _ in range(reps):
        f, _ = batch_features(model, ids, px, mask, **kw)
    t_batch = (time.perf_counter() - t0) / reps
    feats = np.random.default_rng(0).normal(size=(n_items,) + f.shape[1:]).astype(np.float32)
    labels = {"answer": np.random.default_rng(1).integers(0, 2, n_items).astype(np.int32)}
    train_probes(feats, labels, steps=steps)
    t0 = time.perf_counter()
    train_probes(feats, labels, steps=steps)
    t_train = time.perf_counter() - t0
    t_feat = t_batch * n_batches
    return {"model": f"LLaVA bench config ({cfg.text['num_hidden_layers']} layers, width "
                     f"{cfg.text['hidden_size']}, 576 image tokens; random weights)",
            "items": n_items, "batch_size": batch_size, "tokens_per_row": int(ids.shape[1]),
            "layers": int(f.shape[1]), "probes": 1, "steps": steps, "timed_batches": reps,
            "features_s_per_1000": per_1000(t_feat, n_items), "training_s_per_1000": per_1000(t_train, n_items),
            "total_s_per_1000": per_1000(t_feat + t_train, n_items), "devices": str(jax.devices()[0])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=1002)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--bench", action="store_true", help="also the 32-layer LLaVA bench config")
    ap.add_argument("--bench_items", type=int, default=1000)
    ap.add_argument("--bench_batch", type=int, default=4)
    ap.add_argument("--no-truncation", dest="truncation", action="store_false")
    args = ap.parse_args()
    results = {"toy": bench_toy(args.items, args.batch_size, args.steps, args.truncation)}
    if args.bench:
        results["bench_llava"] = bench_llava_config(args.bench_items, args.bench_batch, args.steps)
    for name, r in results.items():
        print(f"{name}: {r['model']}, {r['items']} items, {r['layers']} layers x {r['probes']} probe(s)")
        print(f"  seconds per 1,000 items: features {r['features_s_per_1000']:.2f}, training "
              f"{r['training_s_per_1000']:.2f}, total {r['total_s_per_1000']:.2f}"
              + (f"; with the cliff's decoding {r['with_cliff_total_s_per_1000']:.2f}"
                 if "with_cliff_total_s_per_1000" in r else ""))
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "probes.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
