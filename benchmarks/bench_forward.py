"""Forward throughput: jaxflow (jit, fp32, CPU; fused and reference attention) vs transformers torch
(eager and sdpa attention), same weights, same inputs, one run.

    python benchmarks/bench_forward.py [--family llava|internvl|qwen2_vl|qwen_vl --tiles 1|3 --batch 4
                                        --text_tokens 64 --repeats 5 --threads 2 --frameworks ... --no-breakdown]

Model: a shared bench config (benchmarks/common.py), random weights. --family llava (default):
LLaVA-1.5 structure, 32 decoder layers of width 256, 576 image tokens per image, vocab 32064; input B
rows of 576 + text_tokens tokens (default 4 x 640 = 2560 tokens) and B images of 336x336. --family
internvl: InternVL3 structure (InternViT on 448 px tiles -> 256 tokens per tile, Qwen2 28 layers of
width 256, vocab 151674); input B rows of 256 * tiles + text_tokens tokens (default 4 x 320) and one
image of --tiles tiles per row (1, or 3 = 1x2 + thumbnail). --family qwen2_vl: Qwen2-VL structure
(ViT with 2x2 merge, Qwen2 28 layers of width 256 with M-RoPE, vocab 151936); one image per row, rows
alternating 576-token (48x48 patches) and 324-token (36x36) images, the latter rows left-padded, so B
rows of 576 + text_tokens tokens (padding included); pixel_values are packed patches with
image_grid_thw, and torch also gets mm_token_type_ids. Throughput = B*T / median seconds of a full
forward (all logits; T counts padding). Logit differences are taken over real tokens only (padded
queries attend to nothing real, and each framework fills them differently). --family qwen_vl:
Qwen-VL (v1) structure (ViT at 448 px -> 32x32 patches, 256-query resampler, Qwen decoder of 32 layers
at width 256 with dynamic NTK and logn attention, seq_length 2048 so the 320-token rows run in the
plain regime, vocab 151936); B rows of [7 system tokens, <img>, 256 <imgpad>, </img>, text] and B
images of 448x448. Transformers has no class for Qwen-VL: its torch rows are the OFFICIAL remote
code (QWenLMHeadModel from ../shared/refs/qwen_vl_v1/reference.py, $JAXFLOW_QWEN_VL_REFS), whose only
attention path is eager, so its one torch framework is torch-eager (torch-sdpa is refused); the
weights come from `reference.make_model` and the same files go through jaxflow's converter; torch
runs `reference.logits` (its pixel feed, numpy out). Without the refs folder the torch rows are
skipped with a message and jaxflow runs on its own random init. The goal (common.GOALS), printed
next to the table: jaxflow-fused faster than torch-sdpa (Qwen-VL: than the official torch-eager).
Each framework lives in its own fresh 'spawn' subprocess (so its peak RSS,
ru_maxrss of that child, is its own) that loads the model once; the timed runs are then taken in
rounds, one run per framework per round with the order rotated, so background load that drifts during
the run affects every framework alike. The weights come from one torch model that is saved with
save_pretrained and converted with jaxflow's real converter.

Threads: the parent restricts its CPU affinity to the first --threads cores before anything imports
jax or torch, sets XLA_FLAGS="--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=N",
OMP_NUM_THREADS=MKL_NUM_THREADS=N; every child inherits these and torch children also call
torch.set_num_threads(N). The affinity is what bounds XLA's CPU thread pool (it sizes itself from the
schedulable cores).

Rows with "+malloc" run the same framework in a worker started with common.TUNED_MALLOC_ENV
(MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_: glibc keeps large freed blocks for reuse instead of
unmapping them, which saves re-faulting the pages of big temporaries on every call); their ratios
are against the torch rows with the same setting. --breakdown (default on) then times the pieces
(vision tower + projector, decoder layers, lm_head) of jaxflow-fused and torch-sdpa in the same
workers, again in interleaved rounds, after the peak RSS has been read. For qwen2_vl the jaxflow
pieces take the host-built image input (`model.image_inputs`: packed patches, the tower's packing
arrays, the M-RoPE positions), the vision piece is `model.encode_images` and the decoder piece gets
the 3-D positions; torch's vision piece is `get_image_features(pixel_values, image_grid_thw)` and its
decoder piece gets `get_rope_index`'s 3-D position_ids. For qwen_vl the official pieces are
`transformer.visual(pixel_values)` (ViT + resampler), `transformer(...)` with those features fed in
(embedding, the 32 blocks, ln_f; common.official_fixed_features) and `lm_head`; the jaxflow decoder
piece gets the same rope tables as forward (context_len = T: NTK alpha and logn from the padded
length).

torch runs with use_cache=False under torch.inference_mode() (jaxflow's forward builds no KV cache
either). jaxflow is timed through the public `jaxflow.forward` (host-side input validation and the
host->device copy of the inputs included); the compile time is its first call minus the steady-state
median. Results go to benchmarks/results/forward.json (LLaVA) or forward-<config>.json, e.g.
forward-internvl-1tile.json (git-ignored).
"""
from __future__ import annotations

import argparse
import importlib
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


def _build_and_save(workdir: str, family: str, tiles: int) -> dict:
    """Child: build the torch bench model (fixed seed) and save_pretrained it (Qwen-VL: the official
    layout, written by reference.make_model)."""
    t0 = time.perf_counter()
    cfg = common.bench_config(family, tiles)
    if cfg.official:
        hf_dir = common.make_official_model(os.path.join(workdir, "hf"), cfg)
        return {"hf_dir": hf_dir, "num_params": common.official_num_params(hf_dir),
                "build_save_s": time.perf_counter() - t0}
    model = common.build_torch_model("eager", config=cfg)
    hf_dir = common.save_torch_model(model, os.path.join(workdir, "hf"))
    return {"hf_dir": hf_dir, "num_params": int(sum(p.numel() for p in model.parameters())),
            "build_save_s": time.perf_counter() - t0}


def _build_random_jaxflow(workdir: str, family: str, tiles: int) -> dict:
    """Child (no torch side): a jaxflow-initialised bench model, saved as a jaxflow checkpoint."""
    import jax
    import numpy as np

    import jaxflow

    t0 = time.perf_counter()
    model = common.random_jaxflow_model(common.bench_config(family, tiles))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jaxflow.convert.checkpoint.model_params(model)))
    ckpt = jaxflow.save_model(model, os.path.join(workdir, "jaxflow"), overwrite=True)
    return {"ckpt": ckpt, "num_params": n, "build_save_s": time.perf_counter() - t0, "convert_s": 0.0}


def _convert(hf_dir: str, workdir: str) -> dict:
    """Child: jaxflow's converter on its own (so its peak RSS is the converter's)."""
    t0 = time.perf_counter()
    ckpt = common.convert_to_jaxflow(hf_dir, os.path.join(workdir, "jaxflow"), "float32")
    return {"ckpt": ckpt, "convert_s": time.perf_counter() - t0}


_S: dict = {}  # per-child state of a measurement worker (model, inputs, the run closure)

DEFAULT_FRAMEWORKS = ("torch-eager,torch-sdpa,jaxflow-fused,jaxflow-reference,torch-sdpa+malloc,jaxflow-fused+malloc,"
                      "jaxflow-reference+malloc")


def _setup_torch(hf_dir, attn, batch, text_tokens, threads, logits_path, family="llava", tiles=1):
    """Worker: load the torch model, make the inputs, run once (first call), save the logits."""
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    rss_import = common.current_rss_mb()
    model = common.load_torch_model(hf_dir, attn)  # Qwen-VL: the official model (eager only)
    cfg = common.bench_config(family, tiles)
    if cfg.official:  # reference.logits: validation, the pixel feed, one no-cache forward, numpy out
        ids, mask, px, _ = cfg.inputs_kw(batch, text_tokens)

        def run():
            with torch.inference_mode():
                return common.official_logits(model, ids, px, mask)

        _S.update(run=run, model=model, inputs=(ids, mask, px), torch_kw=None, official=True)
    else:
        kw = cfg.torch_inputs(*cfg.inputs_kw(batch, text_tokens))  # input_ids, attention_mask, pixel_values (+ ...)
        ids, mask, px = kw["input_ids"], kw["attention_mask"], kw["pixel_values"]

        def run():
            with torch.inference_mode():
                return model(**kw, use_cache=False).logits

        _S.update(run=run, model=model, inputs=(ids, mask, px), torch_kw=kw)
    rss_loaded = common.current_rss_mb()
    t0 = time.perf_counter()
    logits = run()
    first = time.perf_counter() - t0
    np.save(logits_path, logits if isinstance(logits, np.ndarray) else logits.float().numpy())
    return {"first_call_s": first, "rss_after_import_mb": rss_import, "rss_after_load_mb": rss_loaded,
            "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__}


def _setup_jaxflow(ckpt, impl, batch, text_tokens, logits_path, family="llava", tiles=1):
    """Worker: jaxflow.load, make the inputs, first (compiling) call, save the logits."""
    import jax
    import numpy as np

    import jaxflow

    rss_import = common.current_rss_mb()
    model = jaxflow.load(ckpt)
    ids, mask, px, image_kw = common.bench_config(family, tiles).inputs_kw(batch, text_tokens)
    rss_loaded = common.current_rss_mb()

    def run():
        return jaxflow.forward(model, ids, px, mask, attn_impl=impl, **image_kw).logits

    _S.update(run=run, model=model, impl=impl, inputs=(ids, mask, px), image_kw=image_kw)
    t0 = time.perf_counter()
    logits = jax.block_until_ready(run())
    first = time.perf_counter() - t0
    np.save(logits_path, np.asarray(logits))
    return {"first_call_s": first, "rss_after_import_mb": rss_import, "rss_after_load_mb": rss_loaded,
            "jax_version": jax.__version__, "jax_devices": [str(d) for d in jax.devices()]}


def _time_once(name: str = "run") -> tuple[float, float]:
    """Worker: (wall seconds, process CPU seconds over all threads) of one steady-state run of the
    registered closure (jax outputs blocked on). CPU time is less distorted by other processes."""
    fn = _S[name]
    c0, t0 = time.process_time(), time.perf_counter()
    common._block(fn())
    return time.perf_counter() - t0, time.process_time() - c0


def _setup_breakdown_jaxflow() -> list[str]:
    """Worker (a jaxflow one, after its main measurement): jit each piece of the forward on its own,
    compile it, and register it for `_time_once(name)`. Returns the piece names. Families with image
    arguments (Qwen2-VL's image_grid_thw) get the host-built image input (`model.image_inputs`) in
    every piece: the vision piece is `encode_images`, the decoder piece takes its M-RoPE positions."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxflow

    F = importlib.import_module("jaxflow.forward")  # the module (jaxflow.forward is also a function)
    model, impl, image_kw = _S["model"], _S["impl"], _S["image_kw"]
    ids_np, mask_np, px_np = _S["inputs"]
    ids, mask, px = (jnp.asarray(a) for a in _S["inputs"])
    ids, mask = ids.astype(jnp.int32), mask.astype(jnp.int32)
    if image_kw:  # the family's image input (packed pixels + derived arrays), built on the host as forward does
        px = model.image_inputs(ids_np.astype(np.int32), mask_np.astype(np.int32), px_np, **image_kw)
    pos_images = px if image_kw else None  # what positions() reads (Qwen2-VL: the M-RoPE positions)

    @jax.jit
    def vision(m, px):
        return m.encode_images(px, impl) if image_kw else m.image_features(px, impl)

    @jax.jit
    def layers(m, x, ids, mask, pos_images):
        pos = m.positions(ids, mask) if pos_images is None else m.positions(ids, mask, pos_images)
        t = ids.shape[1]
        cos, sin = m.rope_tables(pos, x.dtype, context_len=t)  # as forward_core (Qwen-VL: NTK from the padded T)
        allowed = F.causal_allowed(mask > 0, jnp.broadcast_to(jnp.arange(t), ids.shape), t)
        return m.language_model.run_layers(x, cos, sin, allowed, impl=impl).hidden

    @jax.jit
    def head(m, h):
        return m.language_model.logits(h)

    @jax.jit
    def full(m, ids, px, mask):
        return F.forward_core(m, ids, px, mask, impl=impl).logits

    x = jax.jit(lambda m, ids, px: m.embed(ids, px, impl))(model, ids, px)
    h = layers(model, x, ids, mask, pos_images)
    pieces = {
        "vision tower + projector": lambda: vision(model, px),
        "decoder layers": lambda: layers(model, x, ids, mask, pos_images),
        "final norm + lm_head": lambda: head(model, h),
        "forward_core, device inputs": lambda: full(model, ids, px, mask),
    }
    if image_kw:  # the public entry point takes the processor's arrays, not the built image input
        pieces["jaxflow.forward (public)"] = lambda: jaxflow.forward(model, ids_np, px_np, mask_np, attn_impl=impl,
                                                                     **image_kw)
    else:
        pieces["jaxflow.forward (public)"] = lambda: jaxflow.forward(model, ids, px, mask, attn_impl=impl)
    for name, fn in pieces.items():
        jax.block_until_ready(fn())  # compile
        _S[name] = fn
    return list(pieces)


def _setup_breakdown_torch() -> list[str]:
    """Worker (a torch one, after its main measurement): the same pieces in transformers. Qwen2-VL:
    the vision piece gets image_grid_thw, the decoder piece `get_rope_index`'s 3-D position_ids."""
    import torch

    if _S.get("official"):
        return _setup_breakdown_official()
    model = _S["model"]
    ids, mask, px = _S["inputs"]
    kw = _S["torch_kw"]
    grid = kw.get("image_grid_thw")
    inner = model.model
    with torch.inference_mode():
        h = inner(**kw, use_cache=False).last_hidden_state
        embeds = inner.get_input_embeddings()(ids)
        dec_kw = {}
        if grid is not None:
            dec_kw["position_ids"], _ = inner.get_rope_index(ids, mm_token_type_ids=kw["mm_token_type_ids"],
                                                             image_grid_thw=grid, attention_mask=mask)

    def vision():
        with torch.inference_mode():
            if grid is not None:
                return inner.get_image_features(pixel_values=px, image_grid_thw=grid)
            return inner.get_image_features(pixel_values=px)

    def decoder():
        with torch.inference_mode():
            return inner.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False, **dec_kw)

    def head():
        with torch.inference_mode():
            return model.lm_head(h)

    pieces = {"vision tower + projector": vision, "decoder layers + final norm": decoder, "lm_head": head}
    for name, fn in pieces.items():
        fn()
        _S[name] = fn
    return list(pieces)


def _setup_breakdown_official() -> list[str]:
    """Worker (the official Qwen-VL one): its pieces, as the official forward runs them: the vision
    tower + resampler (`transformer.visual`), the decoder (`transformer(...)`: embedding, blocks, ln_f)
    with those features fed in, and `lm_head`."""
    import numpy as np
    import torch

    model = _S["model"]
    ids, mask, px = _S["inputs"]
    ids_t = torch.as_tensor(np.asarray(ids, np.int64))
    mask_t = torch.as_tensor(np.asarray(mask, np.int64))
    px_t = torch.as_tensor(np.ascontiguousarray(px, np.float32))
    tr = model.transformer
    with torch.inference_mode():
        feats = tr.visual(px_t)
        with common.official_fixed_features(model, feats):
            h = tr(input_ids=ids_t, attention_mask=mask_t, use_cache=False, return_dict=True).last_hidden_state

    def vision():
        with torch.inference_mode():
            return tr.visual(px_t)

    def decoder():
        with torch.inference_mode(), common.official_fixed_features(model, feats):
            return tr(input_ids=ids_t, attention_mask=mask_t, use_cache=False, return_dict=True)

    def head():
        with torch.inference_mode():
            return model.lm_head(h)

    pieces = {"vision tower + projector": vision, "decoder layers + final norm": decoder, "lm_head": head}
    for name, fn in pieces.items():
        fn()
        _S[name] = fn
    return list(pieces)


def _timed_rounds(calls: dict, repeats: int, label: str = "round") -> dict:
    """calls: key -> (worker, piece name). One timed run of every key per round, order rotated each
    round; returns key -> list of seconds."""
    keys = list(calls)
    times = {k: [] for k in keys}
    for r in range(repeats):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            w, name = calls[k]
            times[k].append(w.call(_time_once, name))
        print(f"  {label} {r + 1}/{repeats} (load {os.getloadavg()[0]:.1f}): "
              + ", ".join(f"{k} {times[k][-1][0]:.2f}s" for k in keys), flush=True)
    return times


# --------------------------------------------------------------------------- parent


def _diffs(paths: dict, ref: str, real=None) -> dict:
    """Logit differences against `ref`; real (B, T) bool, when given, restricts them to real tokens."""
    import numpy as np

    def load(p):
        a = np.load(p, mmap_mode="r")
        return a if real is None else a[real]  # (B, T, V) or (real tokens, V)

    base = load(paths[ref])
    scale = float(np.abs(base).max())
    out = {"reference": ref, "reference_max_abs_logit": scale}
    if real is not None:
        out["compared"] = f"{int(real.sum())} real tokens of {real.size} (padding left out)"
    for name, p in paths.items():
        if name == ref:
            continue
        d = np.abs(load(p) - base)
        out[name] = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
                     "argmax_agreement": float((load(p).argmax(-1) == base.argmax(-1)).mean())}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_config_args(ap)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text_tokens", type=int, default=64, help="tokens besides the image tokens per row")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per framework (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (the first, compiling call counts)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--frameworks", default=None,
                    help="comma list of {torch-eager,torch-sdpa,jaxflow-fused,jaxflow-reference}[+malloc]; "
                    "+malloc runs that worker with common.TUNED_MALLOC_ENV (glibc keeps large freed blocks); "
                    f"default {DEFAULT_FRAMEWORKS} (qwen_vl: torch-eager in place of torch-sdpa, the official "
                    "code is eager only)")
    ap.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the pieces (vision, decoder, lm_head) of jaxflow-fused and torch-sdpa "
                    "(qwen_vl: the official torch-eager)")
    ap.add_argument("--workdir", default=None, help="where the HF and jaxflow checkpoints go (default: a tmp dir)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/forward[-<config>].json")
    args = ap.parse_args(argv)
    cfg = common.config_from_args(args)
    args.out = args.out or common.results_path("forward", cfg)
    if args.frameworks is None:  # Qwen-VL: torch-sdpa's rows become the official torch-eager's
        fws = [f.replace("torch-sdpa", cfg.torch_baseline) for f in DEFAULT_FRAMEWORKS.split(",")]
        args.frameworks = ",".join(dict.fromkeys(fws))

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env = common.set_threads(args.threads)  # before anything imports jax or torch (children inherit)
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    for fw in frameworks:
        kind, _, variant = fw.partition("+")[0].partition("-")
        if kind == "torch" and variant not in cfg.torch_attn_impls:
            raise SystemExit(f"{fw}: the {cfg.name} torch side has {', '.join(cfg.torch_attn_impls)} attention only"
                             + (" (the official Qwen-VL code)" if cfg.official else ""))
    baseline = cfg.torch_baseline  # the goal's torch row: torch-sdpa, or the official torch-eager for Qwen-VL
    no_torch = common.torch_side_missing(cfg)
    if no_torch and any(f.startswith("torch") for f in frameworks):
        print(no_torch, flush=True)
        frameworks = [f for f in frameworks if not f.startswith("torch")]
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="jaxflow-bench-")
    workdir = args.workdir or tmp.name
    os.makedirs(workdir, exist_ok=True)
    t_start = time.perf_counter()
    seq = cfg.seq_len(args.text_tokens)
    tokens = args.batch * seq
    if cfg.image_grids:
        images = ", ".join(f"{h * common.PATCH_SIZE}x{w * common.PATCH_SIZE} px" for _, h, w in
                           (cfg.image_grids[b % len(cfg.image_grids)] for b in range(args.batch)))
    else:
        images = f"{args.batch * cfg.tiles} x {cfg.image_size} px"
    print(f"bench config {cfg.name}: {cfg.describe()}\ninput {args.batch} x {seq} tokens + {args.batch} image(s) "
          f"({images}); threads {args.threads}; repeats {args.repeats}", flush=True)
    if cfg.official:
        print(f"torch-eager = the official Qwen-VL remote code (QWenLMHeadModel via {common.qwen_vl_refs_dir()}/"
              "reference.py; eager attention is its only path)", flush=True)

    if no_torch and cfg.official:  # nothing to convert from: jaxflow's own init, saved as a checkpoint
        prep, _ = common.run_isolated(_build_random_jaxflow, workdir, cfg.family, cfg.tiles)
        conv_rss = 0.0
    else:
        prep, _ = common.run_isolated(_build_and_save, workdir, cfg.family, cfg.tiles)
        conv, conv_rss = common.run_isolated(_convert, prep["hf_dir"], workdir)
        prep.update(conv)
    prep.update(converter_peak_rss_mb=conv_rss, weights_mb=prep["num_params"] * 4 / 2**20)
    print(f"prepared: {prep['num_params'] / 1e6:.1f}M params ({prep['weights_mb']:.0f} MiB fp32), build+save "
          f"{prep['build_save_s']:.1f}s, convert {prep['convert_s']:.1f}s (converter process peak RSS "
          f"{conv_rss:.0f} MiB)", flush=True)

    results, logits_paths, workers = {}, {}, {}
    try:
        for fw in frameworks:  # one live worker per framework; first (compiling) calls one after another
            base, _, suffix = fw.partition("+")
            if suffix not in ("", "malloc"):
                raise SystemExit(f"unknown framework suffix in {fw!r} (only +malloc)")
            kind, variant = base.split("-", 1)
            path = os.path.join(workdir, f"logits-{fw}.npy")
            w = workers[fw] = common.IsolatedWorker(common.TUNED_MALLOC_ENV if suffix else None)
            if kind == "torch":
                res = w.call(_setup_torch, prep["hf_dir"], variant, args.batch, args.text_tokens, args.threads,
                             path, cfg.family, cfg.tiles)
            elif kind == "jaxflow":
                res = w.call(_setup_jaxflow, prep["ckpt"], variant, args.batch, args.text_tokens, path, cfg.family,
                             cfg.tiles)
            else:
                raise SystemExit(f"unknown framework {fw!r}")
            res["framework"] = fw
            results[fw], logits_paths[fw] = res, path
            print(f"  {fw:25s} loaded, first call {res['first_call_s']:.2f}s", flush=True)
        for fw, w in workers.items():
            for _ in range(max(0, args.warmup - 1)):
                w.call(_time_once)
        # timed rounds, interleaved (order rotated every round) so drifting background load hits all alike
        loads = [round(os.getloadavg()[0], 2)]
        times = _timed_rounds({fw: (workers[fw], "run") for fw in frameworks}, args.repeats)
        loads.append(round(os.getloadavg()[0], 2))
        for fw, w in workers.items():
            res = results[fw]
            wall = [t[0] for t in times[fw]]
            cpu = [t[1] for t in times[fw]]
            res["times_s"], res["cpu_times_s"] = wall, cpu
            res["median_s"] = statistics.median(wall)
            res["min_s"] = min(wall)
            res["median_cpu_s"] = statistics.median(cpu)
            res["tokens_per_s"] = tokens / res["median_s"]
            if fw.startswith("jaxflow"):
                res["compile_s"] = res["first_call_s"] - res["median_s"]
            res["peak_rss_mb"] = w.peak_rss_mb()  # before the breakdown compiles anything more
        breakdown = {}
        if args.breakdown:  # pieces of the fused/sdpa forwards, in the same workers, interleaved too
            calls = {}
            for fw, setup in (("jaxflow-fused", _setup_breakdown_jaxflow), (baseline, _setup_breakdown_torch),
                              ("jaxflow-fused+malloc", _setup_breakdown_jaxflow),
                              (baseline + "+malloc", _setup_breakdown_torch)):
                if fw in workers:
                    for name in workers[fw].call(setup):
                        calls[f"{fw}: {name}"] = (workers[fw], name)
            print("breakdown:", flush=True)
            bt = _timed_rounds(calls, args.repeats, "breakdown round")
            for key, ts in bt.items():
                fw, name = key.split(": ", 1)
                breakdown.setdefault(fw, {})[name] = {"median_s": statistics.median(t[0] for t in ts),
                                                      "min_s": min(t[0] for t in ts),
                                                      "median_cpu_s": statistics.median(t[1] for t in ts)}
    finally:
        for w in workers.values():
            w.close()

    ref = "torch-eager" if "torch-eager" in logits_paths else next(iter(logits_paths))
    real = cfg.inputs_kw(args.batch, args.text_tokens)[1] > 0
    diffs = _diffs(logits_paths, ref, None if real.all() else real)

    # ---------------------------------------------------------------- report
    def ratio(a, b):  # b: the torch baseline in the same malloc setting as a
        b = b + ("+malloc" if a.endswith("+malloc") else "")
        if a in results and b in results:
            return results[a]["tokens_per_s"] / results[b]["tokens_per_s"]
        return None

    print()
    hdr = f"{'framework':25s} {'s/forward':>10s} {'best s':>7s} {'cpu s':>7s} {'tokens/s':>9s} {'/sdpa':>6s} " \
          f"{'/eager':>6s} {'compile s':>9s} {'peak RSS MiB':>12s} {'max|dlogit|':>11s}"
    print(hdr)
    print("-" * len(hdr))
    for fw, r in results.items():
        rs, re_ = ratio(fw, "torch-sdpa"), ratio(fw, "torch-eager")
        comp = f"{r['compile_s']:.2f}" if "compile_s" in r else "-"
        d = diffs.get(fw, {}).get("max_abs_diff") if fw != ref else 0.0
        print(f"{fw:25s} {r['median_s']:10.3f} {r['min_s']:7.3f} {r['median_cpu_s']:7.2f} {r['tokens_per_s']:9.0f} "
              f"{(f'{rs:.2f}' if rs else '-'):>6s} {(f'{re_:.2f}' if re_ else '-'):>6s} {comp:>9s} "
              f"{r['peak_rss_mb']:12.0f} {d:11.2e}")
    print(f"(s/forward = median wall, best = min wall, cpu = median process CPU s over all threads; logit "
          f"diffs vs {ref}{' over real tokens' if 'compared' in diffs else ''}; max |logit| there "
          f"{diffs['reference_max_abs_logit']:.3f}; ratios are "
          "tokens/s of the row over torch-sdpa / torch-eager run with the same malloc setting; +malloc = "
          f"{' '.join(f'{k}={v}' for k, v in common.TUNED_MALLOC_ENV.items())}"
          + ("; torch-eager = the official Qwen-VL code" if cfg.official and not no_torch else "") + ")")
    if no_torch:
        print(no_torch)
    goal = common.GOALS["jaxflow_forward_over_torch_sdpa_speed_min"]
    goals = {}
    for fw in results:
        base = baseline + ("+malloc" if fw.endswith("+malloc") else "")
        if fw.startswith("jaxflow-fused") and ratio(fw, base) is not None:
            goals[f"{fw} / {base}"] = r = ratio(fw, base)
            print(f"goal: {fw} faster than {base} (tokens/s ratio > {goal:g}): {r:.2f}x "
                  f"({results[fw]['median_s']:.3f} s vs {results[base]['median_s']:.3f} s per forward) -> "
                  + ("met" if r > goal else f"MISSED: {100 * (1 / r - 1):.0f}% slower"))
    if breakdown:
        print("\nbreakdown (steady state, each piece jitted/run on its own): median wall s, min wall s, median cpu s")
        for fw, parts in breakdown.items():
            for name, st in parts.items():
                print(f"  {fw:21s} {name:30s} {st['median_s']:8.3f} {st['min_s']:8.3f} {st['median_cpu_s']:8.2f}")

    report = {
        "benchmark": "forward", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": {"batch": args.batch, "seq_len": seq, "tokens_per_forward": tokens,
                   "text_tokens": args.text_tokens, "repeats": args.repeats, "warmup": args.warmup,
                   "dtype": "float32", "num_params": prep["num_params"], **cfg.report()},
        "environment": {**env, "python": platform.python_version(), "machine": platform.machine(),
                        "cpu_count": os.cpu_count()},
        "prepare": dict(prep),
        "results": results,
        "ratios": {f"{fw} / {base}{'+malloc' if fw.endswith('+malloc') else ''}": ratio(fw, base)
                   for fw in results if fw.startswith("jaxflow") for base in ("torch-sdpa", "torch-eager")
                   if ratio(fw, base) is not None},
        "goals": {"jaxflow_fused_over_torch_sdpa_min": goal, "baseline": baseline, "measured": goals},
        "torch_side": ("official Qwen-VL remote code (eager), " + common.qwen_vl_refs_dir()) if cfg.official
        and not no_torch else (no_torch or "transformers"),
        "tuned_malloc_env": common.TUNED_MALLOC_ENV,
        "loadavg_1min_before_after": loads, "logit_diffs": diffs, "breakdown_s": breakdown,
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
