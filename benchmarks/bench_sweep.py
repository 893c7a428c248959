"""Truncation sweep cost on a bench config, measured side by side in one run.

    python benchmarks/bench_sweep.py [--family llava|internvl|qwen2_vl|qwen_vl --tiles 1|3 --batch 4
                                      --text_tokens 64 --new_tokens 16 --repeats 3 --threads 2
                                      --skip_generation --skip_loops --no_torch]

Prints, for the bench config (common.py; default LLaVA: 32 decoder layers, 576 image tokens, ~64 text
tokens, batch 4; --family internvl: 28 decoder layers, 256 image tokens per 448 px tile, vocab 151674;
--family qwen2_vl: 28 decoder layers with M-RoPE, rows alternating 576- and 324-token images (the
latter left-padded), vocab 151936, every call given image_grid_thw; --family qwen_vl: Qwen-VL (v1),
32 decoder layers with dynamic NTK and logn (seq_length 2048: the 320-token rows run in the plain
regime), one 448 px image per row (256 image tokens), vocab 151936):
- the full (L+1)-variant sweep (`jaxflow.truncation_sweep`) / one plain forward, next to its goal
  (common.GOALS: <= 3x), and the speed-up over looping the reference path (`jaxflow.forward(...,
  truncate_at=K)` for K = 0..L);
- the same for generation of `new_tokens` tokens: `jaxflow.truncation_generate` against one plain
  `jaxflow.generate` and against looping `generate(..., truncate_at=K)`;
- compile time (first call minus steady state) and each measurement's peak RSS (its own process);
- qwen_vl only, the torch side, on the OFFICIAL remote code (QWenLMHeadModel from
  ../shared/refs/qwen_vl_v1/reference.py, $JAXFLOW_QWEN_VL_REFS; common.official_sweep_cases):
  `torch_forward`, one official forward (timed in the rounds of forward and sweep), and `torch_loop`,
  the official baseline of the sweep: one masked official forward per cut layer K = 0..L (the image
  keys masked from layer K on, as tests/golden/qwen_vl/make_golden.py does; one timed run, like the
  other loops). The weights are written once by reference.make_model and the same files are converted
  for jaxflow, so the sweep's logits are checked against the official ones (the last two positions
  of every row, every K). Skipped, with a message, when the refs folder is missing (jaxflow then
  runs on its own random init, like the other families) or with --no_torch.
Each measurement lives in its own fresh 'spawn' process that builds the model and compiles once; the
measurements that are compared are alive together and timed in interleaved rounds (one run of each
per round, order alternating), so background load that drifts during the run hits both alike:
forward with sweep, generate with truncation_generate (the per-round ratios are printed too); the
loops (one timed run each) run on their own afterwards. Every measurement returns its outputs to
the host (numpy), so the sweep pays for its (L+1, B, T_after, vocab) logits as the loop pays for L+1
gathers (common.sweep_cases). The model has jaxflow's own
random init (no torch needed; qwen_vl with its torch side: the converted official weights). Results
also go to benchmarks/results/sweep[-<config>].json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


# measured together, in interleaved rounds (each in its own process); the loops alone, one timed run
GROUPS = (("forward", "sweep"), ("forward_loop",), ("generate", "truncation_generate"), ("generate_loop",))
# qwen_vl with its torch side (the official code): the official forward joins forward and sweep's rounds,
# the official masked loop (L+1 forwards) runs on its own after jaxflow's forward loop
TORCH_GROUPS = (("forward", "sweep", "torch_forward"), ("forward_loop",), ("torch_loop",),
                ("generate", "truncation_generate"), ("generate_loop",))
PROBE = 2  # positions (the last of every row) whose logits, every K, are compared between measurements

_S: dict = {}  # per-process state of a measurement worker


def _prepare_official(workdir: str, family: str, tiles: int) -> dict:
    """Child: the official-layout model (reference.make_model) and the same files through jaxflow's converter."""
    t0 = time.perf_counter()
    cfg = common.bench_config(family, tiles)
    official = common.make_official_model(os.path.join(workdir, "official"), cfg)
    ckpt = common.convert_to_jaxflow(official, os.path.join(workdir, "jaxflow"))
    return {"official_dir": official, "ckpt": ckpt, "prepare_s": time.perf_counter() - t0}


def setup(kind: str, batch: int, text_tokens: int, new_tokens: int, family: str = "llava", tiles: int = 1,
          ckpt: str | None = None, official_dir: str | None = None, threads: int | None = None) -> float:
    """Worker: builds the bench model and the inputs, makes the first (compiling) call of `kind`;
    returns its seconds. jaxflow kinds: the converted checkpoint `ckpt` if given, else jaxflow's own
    random init; torch_* kinds (qwen_vl): the official model from `official_dir`, warmed up with one
    official forward (there is nothing to compile)."""
    cfg = common.bench_config(family, tiles)
    ids, mask, pix, image_kw = cfg.inputs_kw(batch, text_tokens)
    if kind.startswith("torch_"):
        import torch

        if threads:
            torch.set_num_threads(threads)
        model = common.load_official_model(official_dir)
        cases = common.official_sweep_cases(model, ids, pix, mask)
        _S["fn"], _S["kind"] = cases[kind], kind
        t0 = time.perf_counter()
        cases["torch_forward"]()  # warm-up: one forward (nothing to compile; a whole loop would cost L+1)
        return time.perf_counter() - t0
    if ckpt:
        import jaxflow

        model = jaxflow.load(ckpt)
    else:
        model = common.random_jaxflow_model(cfg)
    _S["fn"] = common.sweep_cases(model, ids, pix, mask, new_tokens, image_kw=image_kw)[kind]
    _S["kind"] = kind
    t0 = time.perf_counter()
    _S["fn"]()
    return time.perf_counter() - t0


def _probe(kind: str, out):
    """The last PROBE positions' logits of a forward / sweep / loop output: (B, PROBE, V) for one
    forward, (L+1, B, PROBE, V) for the sweep and the loops; None for generation."""
    import numpy as np

    if kind in ("forward", "torch_forward"):
        return np.array(out[:, -PROBE:])
    if kind == "sweep":
        return np.array(out[:, :, -PROBE:])
    if kind in ("forward_loop", "torch_loop"):
        return np.stack([np.asarray(o)[:, -PROBE:] for o in out])
    return None


def time_once() -> float:
    """Worker: wall seconds of one steady-state run (outputs on the host); keeps the output's probe."""
    t0 = time.perf_counter()
    out = common._block(_S["fn"]())
    dt = time.perf_counter() - t0
    _S["probe"] = _probe(_S["kind"], out)
    return dt


def get_probe():
    """Worker: the probe of the last timed run."""
    return _S.get("probe")


def measure_group(kinds, args, cfg, prep=None) -> tuple[dict, dict]:
    """One live worker per kind (set up one after another), then interleaved timed rounds. Returns
    (results, probes)."""
    prep = prep or {}
    workers, first = {}, {}
    try:
        for kind in kinds:
            print(f"compiling {kind} ..." if not kind.startswith("torch_") else f"loading the official model "
                  f"for {kind} ...", flush=True)
            workers[kind] = common.IsolatedWorker(env=common.TUNED_MALLOC_ENV)
            first[kind] = workers[kind].call(setup, kind, args.batch, args.text_tokens, args.new_tokens, cfg.family,
                                             cfg.tiles, prep.get("ckpt"), prep.get("official_dir"), args.threads)
        reps = 1 if kinds[0].endswith("loop") else args.repeats
        times = {k: [] for k in kinds}
        for r in range(reps):
            for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                times[kind].append(workers[kind].call(time_once))
            print(f"  round {r + 1}/{reps} (load {os.getloadavg()[0]:.1f}): "
                  + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
        out, probes = {}, {}
        for kind in kinds:
            med = statistics.median(times[kind])
            torch_kind = kind.startswith("torch_")  # warmed up with one official forward, nothing compiled
            out[kind] = {"kind": kind, "first_call_s": first[kind], "median_s": med, "times_s": times[kind],
                         "compile_s": None if torch_kind else max(first[kind] - med, 0.0), "repeats": reps,
                         "peak_rss_mb": workers[kind].peak_rss_mb()}
            if prep:  # outputs to compare (only when jaxflow and torch share the weights)
                p = workers[kind].call(get_probe)
                if p is not None:
                    probes[kind] = p
        return out, probes
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
    ap.add_argument("--skip_loops", action="store_true", help="skip jaxflow's (slow) truncate_at=K reference loops "
                    "(not the official torch loop of qwen_vl: --no_torch)")
    ap.add_argument("--no_torch", action="store_true", help="qwen_vl: skip the torch side (the official code)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/sweep[-<config>].json")
    args = ap.parse_args()
    cfg = common.config_from_args(args)
    out = args.out or common.results_path("sweep", cfg)
    env = common.set_threads(args.threads)
    no_torch = None
    if cfg.official:
        no_torch = "the torch side is off (--no_torch)" if args.no_torch else common.torch_side_missing(cfg)
    with_torch = cfg.official and not no_torch
    groups = [g for g in (TORCH_GROUPS if with_torch else GROUPS)
              if not (args.skip_loops and g[0] in ("forward_loop", "generate_loop"))
              and not (args.skip_generation and g[0].startswith(("generate", "truncation_generate")))]
    L = cfg.num_layers
    seq = cfg.seq_len(args.text_tokens)
    print(f"bench config {cfg.name}: {cfg.describe()}\ninput {args.batch} x {seq} tokens "
          f"({seq - cfg.prefix_len - cfg.tokens_per_image} after the image), {args.threads} threads (CPU); "
          f"{L + 1} variants", flush=True)
    if no_torch:
        print(no_torch + "; jaxflow runs on its own random init", flush=True)
    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="bench-sweep-") if with_torch else None
    prep = {}
    if with_torch:
        print(f"writing the official model (reference.make_model, {common.qwen_vl_refs_dir()}) and converting it ...",
              flush=True)
        prep, _ = common.run_isolated(_prepare_official, tmp.name, cfg.family, cfg.tiles)
        print(f"  {prep['prepare_s']:.1f}s", flush=True)
    results, probes = {}, {}
    try:
        for kinds in groups:
            res, pr = measure_group(kinds, args, cfg, prep)
            results.update(res)
            probes.update(pr)
    finally:
        if tmp is not None:
            tmp.cleanup()
    r = {k: v["median_s"] for k, v in results.items()}

    def per_round(a, b):
        return [x / y for x, y in zip(results[a]["times_s"], results[b]["times_s"])]

    print(f"\nbench config {cfg.name}: {L} layers, hidden {cfg.text['hidden_size']}, vocab {cfg.vocab_size}, "
          f"{cfg.tokens_per_image} image + {args.text_tokens} text tokens, batch {args.batch}, {args.threads} threads "
          f"(CPU); median of {args.repeats}")
    print(f"{'measurement':22s} {'median s':>9s} {'compile s':>9s} {'peak RSS MiB':>12s}")
    for k, v in results.items():
        comp = "-" if v["compile_s"] is None else f"{v['compile_s']:.2f}"
        print(f"{k:22s} {v['median_s']:9.3f} {comp:>9s} {v['peak_rss_mb']:12.0f}")
    summary = {"sweep / forward": r["sweep"] / r["forward"]}
    rounds = {"sweep / forward": per_round("sweep", "forward")}
    if "forward_loop" in r:
        summary["forward loop / sweep"] = r["forward_loop"] / r["sweep"]
    if "generate" in r:
        summary["truncation_generate / generate"] = r["truncation_generate"] / r["generate"]
        rounds["truncation_generate / generate"] = per_round("truncation_generate", "generate")
    if "generate_loop" in r:
        summary["generate loop / truncation_generate"] = r["generate_loop"] / r["truncation_generate"]
    if "torch_forward" in r:  # the official code (Qwen-VL)
        summary["official forward / jaxflow forward"] = r["torch_forward"] / r["forward"]
        rounds["official forward / jaxflow forward"] = per_round("torch_forward", "forward")
        summary["sweep / official forward"] = r["sweep"] / r["torch_forward"]
        rounds["sweep / official forward"] = per_round("sweep", "torch_forward")
    if "torch_loop" in r:
        summary["official masked loop / sweep"] = r["torch_loop"] / r["sweep"]
        summary["official masked loop / official forward"] = r["torch_loop"] / r["torch_forward"]
    agree = {}
    for a, b in (("sweep", "torch_loop"), ("forward", "torch_forward"), ("sweep", "forward_loop")):
        if a in probes and b in probes and probes[a].shape == probes[b].shape:
            d = float(abs(probes[a] - probes[b]).max())
            agree[f"{a} vs {b}"] = {"max_abs_diff": d, "max_abs_logit": float(abs(probes[b]).max()),
                                    "argmax_agreement": float((probes[a].argmax(-1) == probes[b].argmax(-1)).mean()),
                                    "compared": f"last {PROBE} positions of every row" + (", every K" if a == "sweep"
                                                                                         else "")}
    print()
    for k, v in summary.items():
        print(f"{k:38s} {v:6.2f}x" + (f"   (per round: {', '.join(f'{x:.2f}' for x in rounds[k])})" if k in rounds
                                      else ""))
    print(common.goal_line(f"{L + 1}-variant sweep / forward ({r['sweep']:.3f} s / {r['forward']:.3f} s)",
                           summary["sweep / forward"], "sweep_over_forward_max"))
    for k, v in agree.items():
        print(f"outputs {k}: max |diff| {v['max_abs_diff']:.2e} (max |logit| {v['max_abs_logit']:.2f}), argmax "
              f"agreement {v['argmax_agreement']:.3f} ({v['compared']})")
    if cfg.official:
        print("official = the official Qwen-VL remote code (torch, eager attention)" if with_torch else no_torch)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"args": vars(args), "config": cfg.report(), "env": env, "results": results, "ratios": summary,
                   "ratios_per_round": rounds, "output_agreement": agree,
                   "torch_side": ("official Qwen-VL remote code (eager), " + common.qwen_vl_refs_dir()) if with_torch
                   else no_torch,
                   "goals": {"sweep_over_forward_max": common.GOALS["sweep_over_forward_max"]},
                   "wall_s": time.perf_counter() - t_start}, f, indent=2)
    print(f"wrote {out} (total wall {time.perf_counter() - t_start:.0f}s)")


if __name__ == "__main__":
    main()
