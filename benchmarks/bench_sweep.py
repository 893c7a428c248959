"""Truncation sweep cost on a bench config, measured side by side in one run.

    python benchmarks/bench_sweep.py [--family llava|internvl|qwen2_vl --tiles 1|3 --batch 4 --text_tokens 64
                                      --new_tokens 16 --repeats 3 --threads 2 --skip_generation --skip_loops]

Prints, for the bench config (common.py; default LLaVA: 32 decoder layers, 576 image tokens, ~64 text
tokens, batch 4; --family internvl: 28 decoder layers, 256 image tokens per 448 px tile, vocab 151674;
--family qwen2_vl: 28 decoder layers with M-RoPE, rows alternating 576- and 324-token images (the
latter left-padded), vocab 151936, every call given image_grid_thw):
- the full (L+1)-variant sweep (`jaxflow.truncation_sweep`) / one plain forward, next to its goal
  (common.GOALS: <= 3x), and the speed-up over looping the reference path (`jaxflow.forward(...,
  truncate_at=K)` for K = 0..L);
- the same for generation of `new_tokens` tokens: `jaxflow.truncation_generate` against one plain
  `jaxflow.generate` and against looping `generate(..., truncate_at=K)`;
- compile time (first call minus steady state) and each measurement's peak RSS (its own process).
Each measurement lives in its own fresh 'spawn' process that builds the model and compiles once; the
measurements that are compared are alive together and timed in interleaved rounds (one run of each
per round, order alternating), so background load that drifts during the run hits both alike:
forward with sweep, generate with truncation_generate (the per-round ratios are printed too); the
loops (one timed run each) run on their own afterwards. Every measurement returns its outputs to
the host (numpy), so the sweep pays for its (L+1, B, T_after, vocab) logits as the loop pays for L+1
gathers (common.sweep_cases). The model has jaxflow's own
random init (no torch needed). Results also go to benchmarks/results/sweep[-<config>].json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


# measured together, in interleaved rounds (each in its own process); the loops alone, one timed run
GROUPS = (("forward", "sweep"), ("forward_loop",), ("generate", "truncation_generate"), ("generate_loop",))

_S: dict = {}  # per-process state of a measurement worker


def setup(kind: str, batch: int, text_tokens: int, new_tokens: int, family: str = "llava", tiles: int = 1) -> float:
    """Worker: builds the bench model and the inputs, makes the first (compiling) call of `kind`;
    returns its seconds."""
    cfg = common.bench_config(family, tiles)
    model = common.random_jaxflow_model(cfg)
    ids, mask, pix, image_kw = cfg.inputs_kw(batch, text_tokens)
    _S["fn"] = common.sweep_cases(model, ids, pix, mask, new_tokens, image_kw=image_kw)[kind]
    t0 = time.perf_counter()
    _S["fn"]()
    return time.perf_counter() - t0


def time_once() -> float:
    """Worker: wall seconds of one steady-state run (outputs on the host)."""
    t0 = time.perf_counter()
    common._block(_S["fn"]())
    return time.perf_counter() - t0


def measure_group(kinds, args, cfg) -> dict:
    """One live worker per kind (set up one after another), then interleaved timed rounds."""
    workers, first = {}, {}
    try:
        for kind in kinds:
            print(f"compiling {kind} ...", flush=True)
            workers[kind] = common.IsolatedWorker(env=common.TUNED_MALLOC_ENV)
            first[kind] = workers[kind].call(setup, kind, args.batch, args.text_tokens, args.new_tokens, cfg.family,
                                             cfg.tiles)
        reps = 1 if kinds[0].endswith("loop") else args.repeats
        times = {k: [] for k in kinds}
        for r in range(reps):
            for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                times[kind].append(workers[kind].call(time_once))
            print(f"  round {r + 1}/{reps} (load {os.getloadavg()[0]:.1f}): "
                  + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
        out = {}
        for kind in kinds:
            med = statistics.median(times[kind])
            out[kind] = {"kind": kind, "first_call_s": first[kind], "median_s": med, "times_s": times[kind],
                         "compile_s": max(first[kind] - med, 0.0), "repeats": reps,
                         "peak_rss_mb": workers[kind].peak_rss_mb()}
        return out
    finally:
        for w in workers.values():
            w.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_config_args(ap)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text_tokens", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--skip_generation", action="store_true")
    ap.add_argument("--skip_loops", action="store_true", help="skip the (slow) truncate_at=K reference loops")
    ap.add_argument("--out", default=None, help="default benchmarks/results/sweep[-<config>].json")
    args = ap.parse_args()
    cfg = common.config_from_args(args)
    out = args.out or common.results_path("sweep", cfg)
    env = common.set_threads(args.threads)
    groups = [g for g in GROUPS if not (args.skip_loops and g[0].endswith("loop"))
              and not (args.skip_generation and g[0].startswith(("generate", "truncation_generate")))]
    L = cfg.num_layers
    seq = cfg.seq_len(args.text_tokens)
    print(f"bench config {cfg.name}: {cfg.describe()}\ninput {args.batch} x {seq} tokens "
          f"({seq - cfg.prefix_len - cfg.tokens_per_image} after the image), {args.threads} threads (CPU); "
          f"{L + 1} variants", flush=True)
    t_start = time.perf_counter()
    results = {}
    for kinds in groups:
        results.update(measure_group(kinds, args, cfg))
    r = {k: v["median_s"] for k, v in results.items()}

    def per_round(a, b):
        return [x / y for x, y in zip(results[a]["times_s"], results[b]["times_s"])]

    print(f"\nbench config {cfg.name}: {L} layers, hidden {cfg.text['hidden_size']}, vocab {cfg.vocab_size}, "
          f"{cfg.tokens_per_image} image + {args.text_tokens} text tokens, batch {args.batch}, {args.threads} threads "
          f"(CPU); median of {args.repeats}")
    print(f"{'measurement':22s} {'median s':>9s} {'compile s':>9s} {'peak RSS MiB':>12s}")
    for k, v in results.items():
        print(f"{k:22s} {v['median_s']:9.3f} {v['compile_s']:9.2f} {v['peak_rss_mb']:12.0f}")
    summary = {"sweep / forward": r["sweep"] / r["forward"]}
    rounds = {"sweep / forward": per_round("sweep", "forward")}
    if "forward_loop" in r:
        summary["forward loop / sweep"] = r["forward_loop"] / r["sweep"]
    if "generate" in r:
        summary["truncation_generate / generate"] = r["truncation_generate"] / r["generate"]
        rounds["truncation_generate / generate"] = per_round("truncation_generate", "generate")
    if "generate_loop" in r:
        summary["generate loop / truncation_generate"] = r["generate_loop"] / r["truncation_generate"]
    print()
    for k, v in summary.items():
        print(f"{k:38s} {v:6.2f}x" + (f"   (per round: {', '.join(f'{x:.2f}' for x in rounds[k])})" if k in rounds
                                      else ""))
    print(common.goal_line(f"{L + 1}-variant sweep / forward ({r['sweep']:.3f} s / {r['forward']:.3f} s)",
                           summary["sweep / forward"], "sweep_over_forward_max"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"args": vars(args), "config": cfg.report(), "env": env, "results": results, "ratios": summary,
                   "ratios_per_round": rounds,
                   "goals": {"sweep_over_forward_max": common.GOALS["sweep_over_forward_max"]},
                   "wall_s": time.perf_counter() - t_start}, f, indent=2)
    print(f"wrote {out} (total wall {time.perf_counter() - t_start:.0f}s)")


if __name__ == "__main__":
    main()
