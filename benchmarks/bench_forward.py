"""Forward throughput: jaxflow (jit, fp32, CPU; fused and reference attention) vs transformers torch
(eager and sdpa attention), same weights, same inputs, one run.

    python benchmarks/bench_forward.py [--batch 4 --text_tokens 64 --repeats 5 --threads 2]

Model: the shared bench config (benchmarks/common.py): LLaVA-1.5 structure, 32 decoder layers of
width 256, 576 image tokens per image, vocab 32064, random weights. Input: B rows of 576 + text_tokens
tokens (default 4 x 640 = 2560 tokens) and B images of 336x336. Throughput = B*T / median seconds of a
full forward (all logits). Each framework lives in its own fresh 'spawn' subprocess (so its peak RSS,
ru_maxrss of that child, is its own) that loads the model once; the timed runs are then taken in
rounds, one run per framework per round with the order rotated, so background load that drifts during
the run affects every framework alike. The weights come from one torch model that is saved with
save_pretrained and converted with jaxflow's real converter.

Threads: the parent restricts its CPU affinity to the first --threads cores before anything imports
jax or torch, sets XLA_FLAGS="--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=N",
OMP_NUM_THREADS=MKL_NUM_THREADS=N; every child inherits these and torch children also call
torch.set_num_threads(N). The affinity is what bounds XLA's CPU thread pool (it sizes itself from the
schedulable cores).

torch runs with use_cache=False under torch.inference_mode() (jaxflow's forward builds no KV cache
either). jaxflow is timed through the public `jaxflow.forward` (host-side input validation and the
host->device copy of the inputs included); the compile time is its first call minus the steady-state
median. Results go to benchmarks/results/forward.json (git-ignored).
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


# --------------------------------------------------------------------------- children (fresh processes)


def _prepare(workdir: str) -> dict:
    """Child: build the torch bench model, save_pretrained, convert with jaxflow's converter."""
    t0 = time.perf_counter()
    model = common.build_torch_model("eager")
    hf_dir = common.save_torch_model(model, os.path.join(workdir, "hf"))
    n_params = sum(p.numel() for p in model.parameters())
    del model
    t1 = time.perf_counter()
    ckpt = common.convert_to_jaxflow(hf_dir, os.path.join(workdir, "jaxflow"), "float32")
    return {"hf_dir": hf_dir, "ckpt": ckpt, "num_params": int(n_params), "build_save_s": t1 - t0,
            "convert_s": time.perf_counter() - t1}


def _loadavg():
    return round(os.getloadavg()[0], 2)


_S: dict = {}  # per-child state of a measurement worker (model, inputs, the run closure)


def _setup_torch(hf_dir, attn, batch, text_tokens, threads, logits_path):
    """Worker: load the torch model, make the inputs, run once (first call), save the logits."""
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    rss_import = common.current_rss_mb()
    model = common.load_torch_model(hf_dir, attn)
    ids, mask, px = common.bench_inputs(batch, text_tokens)
    ids, mask, px = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(px)
    rss_loaded = common.current_rss_mb()

    def run():
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=False).logits

    _S["run"] = run
    t0 = time.perf_counter()
    logits = run()
    first = time.perf_counter() - t0
    np.save(logits_path, logits.float().numpy())
    return {"first_call_s": first, "rss_after_import_mb": rss_import, "rss_after_load_mb": rss_loaded,
            "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__}


def _setup_jaxflow(ckpt, impl, batch, text_tokens, logits_path):
    """Worker: jaxflow.load, make the inputs, first (compiling) call, save the logits."""
    import jax
    import numpy as np

    import jaxflow

    rss_import = common.current_rss_mb()
    model = jaxflow.load(ckpt)
    ids, mask, px = common.bench_inputs(batch, text_tokens)
    rss_loaded = common.current_rss_mb()

    def run():
        return jaxflow.forward(model, ids, px, mask, attn_impl=impl).logits

    _S["run"] = run
    t0 = time.perf_counter()
    logits = jax.block_until_ready(run())
    first = time.perf_counter() - t0
    np.save(logits_path, np.asarray(logits))
    return {"first_call_s": first, "rss_after_import_mb": rss_import, "rss_after_load_mb": rss_loaded,
            "jax_version": jax.__version__, "jax_devices": [str(d) for d in jax.devices()]}


def _time_once() -> float:
    """Worker: wall seconds of one steady-state forward (jax outputs blocked on)."""
    t0 = time.perf_counter()
    common._block(_S["run"]())
    return time.perf_counter() - t0


def _breakdown_jaxflow(ckpt, batch, text_tokens, repeats):
    """Child: steady-state time of the pieces of jaxflow's fused forward, each jitted on its own."""
    import jax
    import jax.numpy as jnp

    import jaxflow
    from jaxflow import forward as F

    model = jaxflow.load(ckpt)
    ids, mask, px = common.bench_inputs(batch, text_tokens)
    ids, mask, px = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(px)
    lm = model.language_model
    impl = "fused"

    @jax.jit
    def vision(m, px):
        return m.image_features(px, impl)

    @jax.jit
    def embed(m, ids, px):
        return m.embed(ids, px, impl)

    @jax.jit
    def layers(m, x, ids, mask):
        pos = F.position_ids(mask)
        cos, sin = F.rope_tables(m, pos, x.dtype)
        t = ids.shape[1]
        allowed = F.causal_allowed(mask > 0, jnp.broadcast_to(jnp.arange(t), ids.shape), t)
        return m.language_model.run_layers(x, cos, sin, allowed, impl=impl).hidden

    @jax.jit
    def head(m, h):
        return m.language_model.logits(h)

    @jax.jit
    def full(m, ids, px, mask):
        return F.forward_core(m, ids, px, mask, impl=impl).logits

    x = embed(model, ids, px)
    h = layers(model, x, ids, mask)
    pieces = {
        "vision_tower+projector": lambda: vision(model, px),
        "embed (incl. vision)": lambda: embed(model, ids, px),
        "decoder layers (32, scan)": lambda: layers(model, x, ids, mask),
        "final norm + lm_head": lambda: head(model, h),
        "forward_core jit, device inputs": lambda: full(model, ids, px, mask),
        "jaxflow.forward (public)": lambda: jaxflow.forward(model, ids, px, mask),
    }
    return {name: common.timeit(fn, warmup=1, repeats=repeats) for name, fn in pieces.items()}


def _breakdown_torch(hf_dir, batch, text_tokens, repeats, threads):
    """Child: steady-state time of the same pieces in transformers (sdpa)."""
    import torch

    torch.set_num_threads(threads)
    model = common.load_torch_model(hf_dir, "sdpa")
    ids, mask, px = common.bench_inputs(batch, text_tokens)
    ids, mask, px = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(px)
    inner = model.model
    with torch.inference_mode():
        h = inner(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=False).last_hidden_state
        embeds = inner.get_input_embeddings()(ids)

    def vision():
        with torch.inference_mode():
            return inner.get_image_features(pixel_values=px)

    def decoder():
        with torch.inference_mode():
            return inner.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)

    def head():
        with torch.inference_mode():
            return model.lm_head(h)

    def full():
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=False).logits

    pieces = {"vision_tower+projector": vision, "decoder layers (32) + final norm": decoder,
              "lm_head": head, "full forward": full}
    return {name: common.timeit(fn, warmup=1, repeats=repeats) for name, fn in pieces.items()}


# --------------------------------------------------------------------------- parent


def _diffs(paths: dict, ref: str) -> dict:
    import numpy as np

    base = np.load(paths[ref], mmap_mode="r")
    scale = float(np.abs(base).max())
    out = {"reference": ref, "reference_max_abs_logit": scale}
    for name, p in paths.items():
        if name == ref:
            continue
        d = np.abs(np.load(p, mmap_mode="r") - base)
        out[name] = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
                     "argmax_agreement": float((np.load(p, mmap_mode="r").argmax(-1) == base.argmax(-1)).mean())}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text_tokens", type=int, default=64, help="tokens besides the 576 image tokens per row")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per framework (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (the first, compiling call counts)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--frameworks", default="torch-eager,torch-sdpa,jaxflow-fused,jaxflow-reference")
    ap.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the pieces (vision, decoder, lm_head) of jaxflow-fused and torch-sdpa")
    ap.add_argument("--workdir", default=None, help="where the HF and jaxflow checkpoints go (default: a tmp dir)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "forward.json"))
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env = common.set_threads(args.threads)  # before anything imports jax or torch (children inherit)
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="jaxflow-bench-")
    workdir = args.workdir or tmp.name
    os.makedirs(workdir, exist_ok=True)
    t_start = time.perf_counter()
    tokens = args.batch * (common.NUM_IMAGE_TOKENS + args.text_tokens)
    print(f"bench model: LLaVA-1.5 structure, 32 layers x 256 wide, vocab {common.VOCAB_SIZE}; input "
          f"{args.batch} x {common.NUM_IMAGE_TOKENS + args.text_tokens} tokens + {args.batch} images 336px; "
          f"threads {args.threads}; repeats {args.repeats}", flush=True)

    prep, prep_rss = common.run_isolated(_prepare, workdir)
    print(f"prepared: {prep['num_params'] / 1e6:.1f}M params, build+save {prep['build_save_s']:.1f}s, "
          f"convert {prep['convert_s']:.1f}s (converter child peak RSS {prep_rss:.0f} MiB)", flush=True)

    results, logits_paths, workers = {}, {}, {}
    try:
        for fw in frameworks:  # one live worker per framework; first (compiling) calls one after another
            kind, variant = fw.split("-", 1)
            path = os.path.join(workdir, f"logits-{fw}.npy")
            w = workers[fw] = common.IsolatedWorker()
            if kind == "torch":
                res = w.call(_setup_torch, prep["hf_dir"], variant, args.batch, args.text_tokens, args.threads,
                             path)
            elif kind == "jaxflow":
                res = w.call(_setup_jaxflow, prep["ckpt"], variant, args.batch, args.text_tokens, path)
            else:
                raise SystemExit(f"unknown framework {fw!r}")
            res["framework"] = fw
            results[fw], logits_paths[fw] = res, path
            print(f"  {fw:18s} loaded, first call {res['first_call_s']:.2f}s", flush=True)
        for fw, w in workers.items():
            for _ in range(max(0, args.warmup - 1)):
                w.call(_time_once)
        # timed rounds, interleaved (order rotated every round) so drifting background load hits all alike
        times = {fw: [] for fw in frameworks}
        loads = []
        for r in range(args.repeats):
            loads.append(round(os.getloadavg()[0], 2))
            order = frameworks[r % len(frameworks):] + frameworks[:r % len(frameworks)]
            for fw in order:
                times[fw].append(workers[fw].call(_time_once))
            print(f"  round {r + 1}/{args.repeats}: " + ", ".join(f"{fw} {times[fw][-1]:.2f}s" for fw in frameworks),
                  flush=True)
        for fw, w in workers.items():
            res = results[fw]
            res["times_s"] = times[fw]
            res["median_s"] = statistics.median(times[fw])
            res["min_s"] = min(times[fw])
            res["tokens_per_s"] = tokens / res["median_s"]
            if fw.startswith("jaxflow"):
                res["compile_s"] = res["first_call_s"] - res["median_s"]
            res["peak_rss_mb"] = w.peak_rss_mb()
    finally:
        for w in workers.values():
            w.close()

    ref = "torch-eager" if "torch-eager" in logits_paths else next(iter(logits_paths))
    diffs = _diffs(logits_paths, ref)

    breakdown = {}
    if args.breakdown:
        breakdown["jaxflow-fused"], _ = common.run_isolated(_breakdown_jaxflow, prep["ckpt"], args.batch,
                                                            args.text_tokens, args.repeats)
        breakdown["torch-sdpa"], _ = common.run_isolated(_breakdown_torch, prep["hf_dir"], args.batch,
                                                         args.text_tokens, args.repeats, args.threads)

    # ---------------------------------------------------------------- report
    def ratio(a, b):
        if a in results and b in results:
            return results[a]["tokens_per_s"] / results[b]["tokens_per_s"]
        return None

    print()
    hdr = f"{'framework':18s} {'s/forward':>10s} {'tokens/s':>10s} {'/sdpa':>7s} {'/eager':>7s} " \
          f"{'compile s':>10s} {'peak RSS MiB':>13s} {'max|dlogit|':>12s}"
    print(hdr)
    print("-" * len(hdr))
    for fw, r in results.items():
        rs, re_ = ratio(fw, "torch-sdpa"), ratio(fw, "torch-eager")
        comp = f"{r['compile_s']:.2f}" if "compile_s" in r else "-"
        d = diffs.get(fw, {}).get("max_abs_diff") if fw != ref else 0.0
        print(f"{fw:18s} {r['median_s']:10.3f} {r['tokens_per_s']:10.0f} "
              f"{(f'{rs:.2f}' if rs else '-'):>7s} {(f'{re_:.2f}' if re_ else '-'):>7s} {comp:>10s} "
              f"{r['peak_rss_mb']:13.0f} {d:12.2e}")
    print(f"(logit diffs vs {ref}; max |logit| there {diffs['reference_max_abs_logit']:.3f}; "
          f"ratios are tokens/s of the row over torch-sdpa / torch-eager)")
    if breakdown:
        print("\nbreakdown (steady-state median seconds, each piece jitted/run on its own):")
        for fw, parts in breakdown.items():
            for name, s in parts.items():
                print(f"  {fw:14s} {name:36s} {s:8.3f}")

    report = {
        "benchmark": "forward", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": {"batch": args.batch, "seq_len": common.NUM_IMAGE_TOKENS + args.text_tokens,
                   "tokens_per_forward": tokens, "text_tokens": args.text_tokens, "repeats": args.repeats,
                   "warmup": args.warmup, "dtype": "float32", "num_params": prep["num_params"],
                   "text": common.TEXT, "vision": common.VISION, "top": common.TOP},
        "environment": {**env, "python": platform.python_version(), "machine": platform.machine(),
                        "cpu_count": os.cpu_count()},
        "prepare": {**prep, "converter_peak_rss_mb": prep_rss},
        "results": results,
        "ratios": {f"{fw}/{base}": ratio(fw, base) for fw in results if fw.startswith("jaxflow")
                   for base in ("torch-sdpa", "torch-eager")},
        "loadavg_1min_per_round": loads, "logit_diffs": diffs, "breakdown_s": breakdown,
        "wall_s": time.perf_counter() - t_start,
    }
    for k in ("hf_dir", "ckpt"):
        report["prepare"].pop(k, None)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out} (total wall {report['wall_s']:.0f}s)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
