"""Throughput on 1, 2, 4 and 8 simulated CPU devices: a sanity curve of the sharded entry points, not
a speed claim (the simulated devices share the machine's cores).

    python benchmarks/bench_scale.py [--devices 1,2,4,8 --batch 8 --text_tokens 64 --rounds 3 --family llava]

For each device count N a fresh process (XLA_FLAGS=--xla_force_host_platform_device_count=N) builds
the bench config's random model (common.py), shards it on a mesh and times, in interleaved rounds
(median), a forward of `--batch` rows and the all-K truncation sweep, each against the same model on
one device of the same process (so every ratio is measured side by side). Meshes: data:N (rows on
"data", weights replicated) and, for N > 1, model:N (tensor parallel: heads, MLP, vocabulary split).
Prints a table and one JSON line per device count.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def child(args) -> dict:
    import jax
    import numpy as np

    import common
    import jaxflow
    from jaxflow import sharding as S

    cfg = common.config_from_args(args)
    ids, mask, pix, image_kw = cfg.inputs_kw(args.batch, args.text_tokens)
    single = common.random_jaxflow_model(cfg)
    n = jax.device_count()
    models = {"1 device": single, f"data:{n}": S.shard(single, S.make_mesh((n, 1)))}
    if n > 1:
        models[f"model:{n}"] = S.shard(single, S.make_mesh((1, n)))

    def fwd(m):
        return np.asarray(jaxflow.forward(m, ids, pix, mask, **image_kw).logits[:, -1])

    def sweep(m):
        return np.asarray(jaxflow.truncation_sweep(m, ids, pix, mask, all_logits=False, **image_kw).last_logits)

    out = {"devices": n, "tokens": int(ids.size), "times": {}, "diff": {}}
    for what, fn in (("forward", fwd), ("sweep", sweep)):
        ref = fn(single)
        for name, m in models.items():  # compile, check agreement
            out["diff"][f"{what} {name}"] = float(np.abs(fn(m) - ref).max())
        times = {name: [] for name in models}
        for r in range(args.rounds):
            order = list(models.items())[:: 1 if r % 2 == 0 else -1]
            for name, m in order:
                t0 = time.perf_counter()
                fn(m)
                times[name].append(time.perf_counter() - t0)
        for name in models:
            out["times"][f"{what} {name}"] = statistics.median(times[name])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text_tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    import common

    common.add_config_args(ap)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    for n in (int(x) for x in args.devices.split(",")):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--batch={args.batch}",
               f"--text_tokens={args.text_tokens}", f"--rounds={args.rounds}", f"--family={args.family}", f"--tiles={args.tiles}"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            sys.exit(f"{n} devices failed:\n{res.stderr[-3000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"\n{args.family} bench config, batch {args.batch}, {rows[0]['tokens']} tokens per forward; "
          "time relative to one device in the same process (lower is faster); CPU cores are shared")
    print(f"{'devices':>8} {'what':>8} {'mesh':>10} {'seconds':>9} {'vs 1 device':>12} {'max |diff|':>11}")
    for r in rows:
        n = r["devices"]
        for what in ("forward", "sweep"):
            base = r["times"][f"{what} 1 device"]
            for mesh in ([f"data:{n}"] + ([f"model:{n}"] if n > 1 else [])):
                t = r["times"][f"{what} {mesh}"]
                print(f"{n:>8} {what:>8} {mesh:>10} {t:9.3f} {t / base:11.2f}x {r['diff'][f'{what} {mesh}']:11.1e}")


if __name__ == "__main__":
    main()
