"""Toy training throughput: steps/s and samples/s of the jitted train step, and the cost of building a
batch (PIL rendering, tokenising, preprocessing; done in a background thread during training), for
the batch layouts scripts/train_toy.py offers, measured side by side in one run.

    python benchmarks/bench_toy_train.py [--steps 20]

Wall time to the accuracy target is read from a training run's log.jsonl
(`jaxflow.toy.train.log_summary`; scripts/train_toy.py prints it); see docs/toy.md.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxflow.data.tiny_tokenizer import build_tiny_tokenizer
from jaxflow.toy import data as toy_data
from jaxflow.toy import train as T


def measure(name, make, tc, steps):
    cfg, tok = T.toy_config(), build_tiny_tokenizer()
    graphdef, state = nnx.split(T.Llava(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    tx = T.optimizer(tc)
    opt = tx.init(params)
    t0 = time.perf_counter()
    batches = [make(s, tok, cfg) for s in range(steps + 1)]
    build = (time.perf_counter() - t0) / (steps + 1)
    batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]
    shapes = {b["input_ids"].shape for b in batches}
    for b in batches:  # compile every shape first
        if b["input_ids"].shape in shapes:
            params, opt, loss, _ = T.train_step(params, opt, b, graphdef=graphdef, tx=tx, grounding=tc.grounding,
                                                 align=tc.align)
            shapes.discard(b["input_ids"].shape)
    jax.block_until_ready(loss)
    times = []
    for b in batches[1:]:
        t = time.perf_counter()
        params, opt, loss, _ = T.train_step(params, opt, b, graphdef=graphdef, tx=tx, grounding=tc.grounding,
                                                 align=tc.align)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
    step = float(np.median(times))
    n = batches[0]["input_ids"].shape[0]
    questions = n * tc.turns
    print(f"{name:<44} {step:7.3f} s/step {1 / step:6.2f} steps/s {n / step:7.1f} images/s "
          f"{questions / step:7.1f} questions/s  batch build {build:.3f} s")
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {args.steps} timed steps each (median)")
    single = T.TrainConfig(batch_size=32, turns=1, grounding=0.0, question_words=False, align=0.0)
    recipe = T.TrainConfig()  # the shipped model's: 16 six-question dialogs, grounding, question words, align
    a = measure("32 single questions", lambda s, tok, cfg: T.make_batch(
        toy_data.examples(0, s, 32), tok, cfg), single, args.steps)
    b = measure(f"{recipe.batch_size} dialogs x {recipe.turns} turns (the recipe)", lambda s, tok, cfg: T.make_dialog_batch(
        toy_data.dialogs(0, s, recipe.batch_size, recipe.turns), tok, cfg, recipe.question_words), recipe, args.steps)
    print(f"questions/s, recipe dialogs vs single questions: "
          f"{(recipe.batch_size * recipe.turns / b) / (32 / a):.2f}x")

if __name__ == "__main__":
    main()
