"""Attention-knockout sweep cost on a bench config: `jaxflow.knockout_sweep` (3 paths x every window
of `--window` layers, one program) as a multiple of one plain forward, against the loop of one
`jaxflow.knockout` forward per (path, window) a peer would run, in one process, side by side; and
the same for a deletion curve (`deletion_curves`, `--steps` steps of one ranking, from the
answer-predicting positions) against one knockout forward per step.

    python benchmarks/bench_knockout.py [--family llava --batch 1 --text_tokens 64 --window 9 --rounds 3]

Model: the shared bench config (common.py; LLaVA: 32 decoder layers, 576 image tokens, random init).
Paths: Image->Question, Image->Last, Question->Last (`standard_paths`); with 32 layers and window 9,
24 windows, 72 knockout variants. The forward and the sweep are timed in interleaved rounds (median);
the loop runs once (72 forwards) after them. Goal (issue): a few forwards, >= 10x faster than the loop.
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text_tokens", type=int, default=64)
    ap.add_argument("--window", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="deletion-curve steps")
    common.add_config_args(ap)
    args = ap.parse_args()
    import numpy as np

    import jaxflow
    from jaxflow.analysis.knockout import knockout_sweep, knockout_sweep_loop, standard_paths, token_groups

    cfg = common.config_from_args(args)
    ids, mask, pix, image_kw = cfg.inputs_kw(args.batch, args.text_tokens)
    model = common.random_jaxflow_model(cfg)
    paths = standard_paths(token_groups(ids, mask, model.config.image_token_id))
    L = model.config.text.num_layers

    def fwd():
        return np.asarray(jaxflow.forward(model, ids, pix, mask, **image_kw).logits[:, -1])

    def sweep():
        return knockout_sweep(model, ids, pix, mask, paths, window=args.window, chunk=args.chunk, **image_kw)

    t0 = time.perf_counter()
    fwd()
    c_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = sweep()
    c_sweep = time.perf_counter() - t0
    tf, ts = [], []
    for r in range(args.rounds):
        for name, fn, acc in (("forward", fwd, tf), ("sweep", sweep, ts))[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    f, sw = statistics.median(tf), statistics.median(ts)
    n_var = len(paths) * (L - args.window + 1)
    t0 = time.perf_counter()
    loop = knockout_sweep_loop(model, ids, pix, mask, paths, window=args.window, **image_kw)
    t_loop = time.perf_counter() - t0
    err = float(np.abs(loop - s.probs).max())
    print(f"{cfg.describe() if hasattr(cfg, 'describe') else cfg.name}")
    print(f"batch {args.batch} x {ids.shape[1]} tokens, {L} layers, window {args.window}: {n_var} variants "
          f"({len(paths)} paths x {L - args.window + 1} windows)")
    print(f"  forward           {f:8.3f} s (compile + first call {c_fwd:.1f} s)")
    print(f"  knockout_sweep    {sw:8.3f} s = {sw / f:.2f} forwards (compile + first call {c_sweep:.1f} s)")
    print(f"  loop of knockout  {t_loop:8.3f} s = {t_loop / f:.1f} forwards (one run, first call compiles)")
    print(f"  sweep vs loop     {t_loop / sw:.1f}x faster; max |P difference| {err:.1e}")
    print(f"goal: >= 10x faster than the loop: {t_loop / sw:.1f}x ({'met' if t_loop / sw >= 10 else 'MISSED'}); "
          f"cost {sw / f:.2f} forwards (goal: a few)")
    # deletion curve: the last 4 tokens are the "answer"; one random ranking of the image tokens
    from jaxflow.analysis.deletion import deletion_curves, predicting_mask, random_rankings

    amask = np.zeros(ids.shape, bool)
    amask[:, -4:] = True
    n_img = int((ids[0] == model.config.image_token_id).sum())
    ranking = {"random": random_rankings(ids.shape[0], n_img, seed=0)}

    def deletion():
        return deletion_curves(model, ids, pix, mask, amask, ranking, steps=args.steps, **image_kw)

    deletion()
    td = []
    for r in range(args.rounds):
        for fn, acc in (((fwd, tf), (deletion, td)) if r % 2 == 0 else ((deletion, td), (fwd, tf))):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    f, dl = statistics.median(tf), statistics.median(td)
    from jaxflow.analysis.knockout import knockout

    q = predicting_mask(amask)
    pos = [np.flatnonzero(ids[b] == model.config.image_token_id) for b in range(ids.shape[0])]
    t0 = time.perf_counter()
    for step in range(args.steps + 1):
        keys = np.zeros(ids.shape, bool)
        for b in range(ids.shape[0]):
            keys[b, pos[b][ranking["random"][b][:int(round(step / args.steps * n_img))]]] = True
        np.asarray(knockout(model, ids, pix, mask, q, keys, np.ones(L, bool), **image_kw).logits[:, -5:])
    t_dloop = time.perf_counter() - t0
    print(f"  deletion curve    {dl:8.3f} s = {dl / f:.2f} forwards ({args.steps} steps + the clean one)")
    print(f"  loop of knockout  {t_dloop:8.3f} s = {t_dloop / f:.1f} forwards; curve {t_dloop / dl:.1f}x faster")
    os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"knockout-{cfg.name}.json"), "w") as fh:
        json.dump({"forward_s": f, "sweep_s": sw, "loop_s": t_loop, "variants": n_var, "window": args.window,
                   "forward_rounds": tf, "sweep_rounds": ts, "max_abs_prob_diff": err,
                   "deletion_s": dl, "deletion_loop_s": t_dloop, "deletion_steps": args.steps,
                   "load_average": os.getloadavg()}, fh, indent=1)


if __name__ == "__main__":
    main()
