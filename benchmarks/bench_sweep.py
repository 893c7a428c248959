"""Truncation sweep cost on the bench config, measured side by side in one run.

    python benchmarks/bench_sweep.py [--batch 4 --text_tokens 64 --new_tokens 16 --repeats 3 --threads 2]

Prints, for the bench config (32 decoder layers, 576 image tokens, ~64 text tokens, batch 4):
- the full 33-variant sweep (`jaxflow.truncation_sweep`) / one plain forward, and the speed-up over
  looping the reference path (`jaxflow.forward(..., truncate_at=K)` for K = 0..32);
- the same for generation of `new_tokens` tokens: `jaxflow.truncation_generate` against one plain
  `jaxflow.generate` and against looping `generate(..., truncate_at=K)`;
- compile time (first call minus steady state) and each measurement's peak RSS (its own process).
Every measurement returns its outputs to the host (numpy), so the sweep pays for its (33, B, T_after,
vocab) logits as the loop pays for 33 gathers. Results also go to benchmarks/results/sweep.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def _model():
    from flax import nnx

    from jaxflow.models.config import from_hf_dict
    from jaxflow.models.llava import Llava

    return Llava(from_hf_dict(common.bench_hf_config().to_dict()), rngs=nnx.Rngs(0))


def measure(kind: str, batch: int, text_tokens: int, new_tokens: int, repeats: int) -> dict:
    """Runs in a fresh process: builds the bench model, times `kind`, returns seconds and peak RSS."""
    import numpy as np

    import jaxflow

    model = _model()
    L = model.config.text.num_layers
    ids, mask, pix = common.bench_inputs(batch, text_tokens)
    after = np.arange(common.SYSTEM_PREFIX_LEN + common.NUM_IMAGE_TOKENS, ids.shape[1])

    def forward():
        return np.asarray(jaxflow.forward(model, ids, pix, mask).logits)

    def sweep():
        return jaxflow.truncation_sweep(model, ids, pix, mask).logits

    def forward_loop():
        return [np.asarray(jaxflow.forward(model, ids, pix, mask, truncate_at=k).logits[:, after]) for k in
                range(L + 1)]

    def generate():
        return jaxflow.generate(model, ids, pix, mask, max_new_tokens=new_tokens, eos_token_id=-1).tokens

    def truncation_generate():
        return jaxflow.truncation_generate(model, ids, pix, mask, max_new_tokens=new_tokens, eos_token_id=-1).tokens

    def generate_loop():
        return [jaxflow.generate(model, ids, pix, mask, max_new_tokens=new_tokens, truncate_at=k,
                                 eos_token_id=-1).tokens for k in range(L + 1)]

    fn = {"forward": forward, "sweep": sweep, "forward_loop": forward_loop, "generate": generate,
          "truncation_generate": truncation_generate, "generate_loop": generate_loop}[kind]
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    reps = 1 if kind.endswith("loop") else repeats
    median = common.timeit(fn, warmup=0, repeats=reps)
    return {"kind": kind, "first_call_s": first, "median_s": median, "compile_s": max(first - median, 0.0),
            "repeats": reps, "peak_rss_mb": common.peak_rss_mb()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text_tokens", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--skip_generation", action="store_true")
    args = ap.parse_args()
    env = common.set_threads(args.threads)
    kinds = ["forward", "sweep", "forward_loop"]
    if not args.skip_generation:
        kinds += ["generate", "truncation_generate", "generate_loop"]
    results = {}
    for kind in kinds:
        print(f"measuring {kind} ...", flush=True)
        with common.IsolatedWorker(env=common.TUNED_MALLOC_ENV) as w:
            results[kind] = w.call(measure, kind, args.batch, args.text_tokens, args.new_tokens, args.repeats)
    r = {k: v["median_s"] for k, v in results.items()}
    print(f"\nbench config: 32 layers, hidden 256, 576 image + {args.text_tokens} text tokens, batch {args.batch}, "
          f"{args.threads} threads (CPU)")
    print(f"{'measurement':22s} {'median s':>9s} {'compile s':>9s} {'peak RSS MiB':>12s}")
    for k, v in results.items():
        print(f"{k:22s} {v['median_s']:9.3f} {v['compile_s']:9.2f} {v['peak_rss_mb']:12.0f}")
    summary = {"sweep / forward": r["sweep"] / r["forward"], "forward loop / sweep": r["forward_loop"] / r["sweep"]}
    if "generate" in r:
        summary["truncation_generate / generate"] = r["truncation_generate"] / r["generate"]
        summary["generate loop / truncation_generate"] = r["generate_loop"] / r["truncation_generate"]
    print()
    for k, v in summary.items():
        print(f"{k:38s} {v:6.2f}x")
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "sweep.json"), "w") as f:
        json.dump({"args": vars(args), "env": env, "results": results, "ratios": summary}, f, indent=2)


if __name__ == "__main__":
    main()
