"""The cost of the non-finite check (jaxflow.health): a prefill that returns the next token, with and
without the in-program `isfinite(prompt logits).all()` reduction that generate, truncation_generate
and the sweep carry, timed side by side in alternating rounds on the same inputs.

    python benchmarks/bench_finite_check.py [--family llava --batch 4 --text_tokens 64 --rounds 15]

Model: the shared bench config (benchmarks/common.py, random weights). The goal (issue: < 2% of a
forward) is printed beside the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import common


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text_tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    common.add_config_args(ap)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    from jaxflow.forward import forward_core

    config = common.config_from_args(args)
    model = common.random_jaxflow_model(config)
    ids, mask, pix, image_kw = config.inputs_kw(args.batch, args.text_tokens)
    images = model.image_inputs(ids, mask, pix, **image_kw)

    @jax.jit
    def plain(model, ids, images, mask):
        logits = forward_core(model, ids, images, mask).logits[:, -1]
        return jnp.argmax(logits, -1)

    @jax.jit
    def checked(model, ids, images, mask):
        logits = forward_core(model, ids, images, mask).logits[:, -1]
        return jnp.argmax(logits, -1), jnp.isfinite(logits).all()

    fns = {"plain": plain, "checked": checked}
    args_ = (model, jnp.asarray(ids), images, jnp.asarray(mask))
    for f in fns.values():
        jax.block_until_ready(f(*args_))
    times = {k: [] for k in fns}
    for r in range(args.rounds):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for k in order:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[k](*args_))
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["checked"] / med["plain"]
    print(f"config {config.name}: batch {ids.shape[0]} x {ids.shape[1]} tokens, {args.rounds} rounds")
    for k, v in med.items():
        print(f"  {k:8s} {v * 1e3:9.1f} ms (median)")
    print(f"  checked / plain = {ratio:.4f} ({(ratio - 1) * 100:+.2f}%; goal < +2%)")


if __name__ == "__main__":
    main()
