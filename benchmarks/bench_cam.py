"""LLaVA-CAM cost: all L layers from one backward vs one plain forward vs a per-layer loop, one run.

    python benchmarks/bench_cam.py [--family llava|internvl|qwen2_vl|qwen_vl --tiles 1|3 --answer_tokens 4
                                    --text_tokens 64 --repeats 3 --loop_repeats 1 --threads 2 --no_extras
                                    --no_loop --no_torch]

Model: a shared bench config (benchmarks/common.py), random weights (a torch model saved with
save_pretrained and pushed through jaxflow's real converter). --family llava (default): LLaVA-1.5
structure, 32 decoder layers of width 256, 576 image tokens, vocab 32064. --family internvl: InternVL3
structure, 28 Qwen2 layers of width 256, one image of --tiles 448 px tiles (256 tokens each), vocab
151674 (the maps are stitched onto the tile grid: 1x1, or 1x2 + thumbnail). --family qwen2_vl: Qwen2-VL
structure, 28 Qwen2 layers of width 256 with M-RoPE, vocab 151936; the row holds one 672 px image
(48x48 patches -> 576 tokens; batch 1 takes the first of the config's two image sizes), every call
given image_grid_thw. --family qwen_vl: Qwen-VL (v1) structure, 32 Qwen layers of width 256 with
dynamic NTK and logn (seq_length 2048: plain regime), one 448 px image (256 tokens), vocab 151936;
the weights are written by the official reference (reference.make_model, ../shared/refs/qwen_vl_v1
or $JAXFLOW_QWEN_VL_REFS) and converted. Input: one row of the image tokens + --text_tokens text
tokens, the last --answer_tokens of which are the answer (teacher-forced target).

qwen_vl also times the torch side, the OFFICIAL remote code (QWenLMHeadModel, eager attention), in
the same rounds (common.official_cam_cases): `torch_forward` (one official forward), `torch_cam`
(autograd as tests/golden/qwen_vl/make_golden.py: hooks keep each block's ln_2 output, one forward
through the pixel feed and one backward, weights requiring grad as loaded, then the paper map) and
`torch_cam_frozen` (the same with the weights frozen: activation gradients only, what jaxflow
computes). The raw paper maps of jaxflow and torch are compared. Without the refs folder (or with
--no_torch) the torch side is skipped with a message and jaxflow runs on its own random init.

Timed, all through public functions (host-side validation, host<->device copies included), each the
median of --repeats runs (the loop: --loop_repeats, default 1) after a warm-up (compile) run, in rounds (forward, CAM, loop, ...) so that
background load drifting during the run affects all alike:
- forward:  `jaxflow.forward` (fused attention, all logits) — the unit;
- cam:      `jaxflow.analysis.cam.llava_cam(..., "paper")` — every layer's map from one forward and
            one backward (gradients w.r.t. zero deltas at all L MLP inputs at once);
- loop:     `cam_site(..., per_layer_loop=True)` — the reference code's way: for each layer its own
            forward and backward (a delta at that layer only), L passes (skipped with --no_loop);
- extras (unless --no_extras): per-answer-token CAM, SmoothGrad with 4 copies, attention shares,
  information-flow saliency.
(the closures: common.cam_cases). The single-backward gradients are checked against the loop's. Goals
(common.GOALS), printed next to the figures: CAM <= 3.5x a forward; loop >= 8x the CAM. Results:
benchmarks/results/cam.json (LLaVA) or cam-<config>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import common  # noqa: E402  (imports neither jax nor torch)


def _one_loop_layer(model, ids, pix, mask, amask, image_kw=None):
    """One unit of the per-layer loop (compiles it): layer 0's gradient from its own forward and backward,
    called with the arguments `cam_site(..., per_layer_loop=True)` gives it (matched by parameter name,
    so trees with and without its `img_rows` argument both work)."""
    import inspect

    import jax.numpy as jnp

    from jaxflow.analysis._common import answer_targets, prepare
    from jaxflow.analysis.cam import _site_one_layer_jit

    p = prepare(model, ids, pix, mask, amask, require_answer=True, **(image_kw or {}))
    tp, tt, tv, _ = answer_targets(p.input_ids, p.spans.answer)
    by_name = {"model": model, "ids": jnp.asarray(p.input_ids), "pixels": p.images,
               "mask": jnp.asarray(p.attention_mask), "img_pos": jnp.asarray(p.image_positions),
               "tgt_pos": jnp.asarray(tp), "tgt_tok": jnp.asarray(tt), "tgt_valid": jnp.asarray(tv),
               "logprob": jnp.bool_(False), "layer": jnp.int32(0)}
    if hasattr(p, "image_rows"):
        by_name["img_rows"] = jnp.asarray(p.image_rows)
    names = [n for n, q in inspect.signature(_site_one_layer_jit).parameters.items()
             if q.kind is q.POSITIONAL_OR_KEYWORD]
    return _site_one_layer_jit(*(by_name[n] for n in names), impl="fused")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_config_args(ap)
    ap.add_argument("--text_tokens", type=int, default=64)
    ap.add_argument("--answer_tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop_repeats", type=int, default=1, help="timed runs of the (slow) per-layer loop")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--no_extras", action="store_true", help="skip per-token, SmoothGrad, attention, flow")
    ap.add_argument("--no_loop", action="store_true", help="skip the per-layer loop (and the gradient check)")
    ap.add_argument("--no_torch", action="store_true", help="qwen_vl: skip the torch side (the official code)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/cam[-<config>].json")
    args = ap.parse_args()
    cfg = common.config_from_args(args)
    args.out = args.out or common.results_path("cam", cfg)
    threads = common.set_threads(args.threads)

    import numpy as np

    import jaxflow
    from jaxflow.analysis.cam import cam_site, llava_cams

    print(f"bench config {cfg.name}: {cfg.describe()}", flush=True)
    no_torch = None
    if cfg.official:
        no_torch = "the torch side is off (--no_torch)" if args.no_torch else common.torch_side_missing(cfg)
    official = None  # the official Qwen-VL model (torch side of qwen_vl)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-cam-") as work:
        if cfg.official and no_torch:
            print(no_torch + "; jaxflow runs on its own random init", flush=True)
            model = common.random_jaxflow_model(cfg)
        elif cfg.official:
            import torch

            torch.set_num_threads(args.threads)
            print(f"writing the official model (reference.make_model, {common.qwen_vl_refs_dir()}) and converting "
                  "it ...", flush=True)
            odir = common.make_official_model(os.path.join(work, "official"), cfg)
            model = jaxflow.load(common.convert_to_jaxflow(odir, os.path.join(work, "jaxflow")))
            official = common.load_official_model(odir)
        else:
            print("building the bench model (torch, random weights) and converting it ...", flush=True)
            model = common.build_jaxflow_model(common.build_torch_model("eager", config=cfg), work)
    build_s = time.perf_counter() - t0
    ids, mask, pix, image_kw = cfg.inputs_kw(batch=1, text_tokens=args.text_tokens)
    amask = common.answer_mask(ids, args.answer_tokens)
    n_layers = model.config.text.num_layers

    cases = common.cam_cases(model, ids, pix, mask, amask, extras=not args.no_extras, image_kw=image_kw)
    if args.no_loop:
        del cases["loop"]
    if official is not None:
        cases.update(common.official_cam_cases(official, ids, pix, mask, amask))
    first = {}
    for name, fn in cases.items():  # warm-up = compilation
        print(f"compiling {name} ...", flush=True)
        t = time.perf_counter()
        if name == "loop":  # one layer compiles the loop's unit; a whole warm-up loop would cost L passes
            common._block(_one_loop_layer(model, ids, pix, mask, amask, image_kw))
        else:
            common._block(fn())
        first[name] = time.perf_counter() - t
    times = {name: [] for name in cases}
    last = {}
    for r in range(args.repeats):
        for name, fn in cases.items():
            if name == "loop" and r >= args.loop_repeats:
                continue
            t = time.perf_counter()
            last[name] = common._block(fn())
            times[name].append(time.perf_counter() - t)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    med = {k: float(np.median(v)) for k, v in times.items()}

    torch_maps = None
    if official is not None:  # jaxflow's raw paper maps vs the official autograd's (both variants)
        mine = np.asarray(llava_cams(model, ids, pix, amask, ("paper",), attention_mask=mask, **image_kw)
                          .raw["paper"]).reshape(last["torch_cam"].shape)
        torch_maps = {}
        for k in ("torch_cam", "torch_cam_frozen"):
            scale = float(np.abs(last[k]).max())
            torch_maps[k] = {"max_abs_diff": float(np.abs(mine - last[k]).max()), "max_abs_map": scale,
                             "max_rel_err": float(np.abs(mine - last[k]).max() / max(scale, 1e-30))}
    rel = None
    if "loop" in last:
        # single backward vs the timed loop's output
        g1, _ = cam_site(model, ids, pix, amask, attention_mask=mask, **image_kw)
        g2, _ = last["loop"]
        rel = float(np.abs(g1 - g2).max() / np.abs(g2).max())
    with_loop = "loop" in med

    res = {
        "config": {"bench_config": cfg.report(), "decoder_layers": n_layers, "hidden": model.config.text.hidden_size,
                   "image_tokens": cfg.tokens_per_image, "text_tokens": args.text_tokens,
                   "sequence": int(ids.shape[1]), "answer_tokens": args.answer_tokens, "batch": 1,
                   "vocab": model.config.text.vocab_size},
        "threads": threads, "platform": platform.platform(), "build_convert_s": build_s,
        "median_s": med, "all_s": times, "first_call_s": first,
        "compile_s": {k: max(0.0, first[k] - (med[k] / n_layers if k == "loop" else med[k])) for k in med},
        "ratios": {"cam_over_forward": med["cam"] / med["forward"]},
        # the same ratios within each round (robust to background load that drifts between rounds)
        "ratios_per_round": {"cam_over_forward": [c / f for c, f in zip(times["cam"], times["forward"])]},
        "goals": {"cam_over_forward_max": common.GOALS["cam_over_forward_max"], "loop_over_cam_min": 8.0},
        "single_backward_vs_loop_max_rel_err": rel,
        "torch_side": ("official Qwen-VL remote code (eager), " + common.qwen_vl_refs_dir()) if official is not None
        else (no_torch or "transformers (only to build the weights)"),
        "maps_vs_official": torch_maps,
    }
    if official is not None:  # the official code (Qwen-VL), same rounds
        res["ratios"].update(
            official_cam_over_cam=med["torch_cam"] / med["cam"],
            official_cam_frozen_over_cam=med["torch_cam_frozen"] / med["cam"],
            official_forward_over_forward=med["torch_forward"] / med["forward"],
            official_cam_over_official_forward=med["torch_cam"] / med["torch_forward"],
            official_cam_frozen_over_official_forward=med["torch_cam_frozen"] / med["torch_forward"])
        res["ratios_per_round"].update(
            official_cam_over_cam=[a / b for a, b in zip(times["torch_cam"], times["cam"])],
            official_forward_over_forward=[a / b for a, b in zip(times["torch_forward"], times["forward"])])
    if with_loop:
        res["ratios"].update(loop_over_cam=med["loop"] / med["cam"], loop_over_forward=med["loop"] / med["forward"])
        res["ratios_per_round"]["loop_over_cam"] = [lp / c for lp, c in zip(times["loop"], times["cam"])]
    res["goals"]["met"] = bool(res["ratios"]["cam_over_forward"] <= res["goals"]["cam_over_forward_max"]
                               and (not with_loop or res["ratios"]["loop_over_cam"] >= 8.0))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2)
    os.replace(tmp, args.out)

    print(f"\nbench config {cfg.name}: {n_layers} layers, hidden {model.config.text.hidden_size}, vocab "
          f"{cfg.vocab_size}, {cfg.tokens_per_image} image + {args.text_tokens} text tokens, batch 1, "
          f"{args.threads} threads; median of {args.repeats}")
    for k, v in med.items():
        print(f"  {k:18s} {v:8.3f} s   ({v / med['forward']:5.2f}x forward, compile {res['compile_s'][k]:.1f} s)")
    r, rr = res["ratios"], res["ratios_per_round"]
    print(common.goal_line(f"all-layer CAM / forward ({med['cam']:.3f} s / {med['forward']:.3f} s)",
                           r["cam_over_forward"], "cam_over_forward_max")
          + f"; per round {', '.join(f'{x:.2f}' for x in rr['cam_over_forward'])}")
    if with_loop:
        print(f"per-layer loop = {r['loop_over_cam']:.1f}x the all-layer CAM (goal >= 8; same round "
              f"{', '.join(f'{x:.1f}' for x in rr['loop_over_cam'])}); gradients single-backward vs loop: max rel "
              f"err {rel:.1e}")
    if official is not None:
        print(f"official Qwen-VL code (torch, eager): forward {med['torch_forward']:.3f} s, CAM by autograd "
              f"{med['torch_cam']:.3f} s ({r['official_cam_over_official_forward']:.2f}x its forward), with frozen "
              f"weights {med['torch_cam_frozen']:.3f} s ({r['official_cam_frozen_over_official_forward']:.2f}x)")
        print(f"official time / jaxflow time (> 1: jaxflow faster): CAM {r['official_cam_over_cam']:.2f}x (frozen-"
              f"weight autograd {r['official_cam_frozen_over_cam']:.2f}x; per round "
              f"{', '.join(f'{x:.2f}' for x in rr['official_cam_over_cam'])}), forward "
              f"{r['official_forward_over_forward']:.2f}x; raw paper maps vs the official autograd's: max rel err "
              + ", ".join(f"{k} {v['max_rel_err']:.1e}" for k, v in torch_maps.items()))
    elif no_torch:
        print(no_torch)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
