"""Helper processes for tests/test_multihost.py (jax must start fresh in each: XLA_FLAGS and
jax.distributed are read when jax initialises).

    python tests/_multihost_worker.py slow SECONDS EVALUATE_ARGS...
        scripts/evaluate.py with a pause of SECONDS in every batch (a run to kill half-way)
    python tests/_multihost_worker.py repeat RUNS_JSON
        scripts/evaluate.py's main once per argument list of RUNS_JSON (a JSON list of lists), in one
        process (one jax start for several runs); exits with the first non-zero code
"""
from __future__ import annotations

import json
import os
import runpy
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATE = os.path.join(REPO, "scripts", "evaluate.py")


def slow(seconds: float, args: list[str]) -> None:
    from jaxflow.evaluation import runner

    generate = runner.generate_batch

    def paused(*a, **kw):
        out = generate(*a, **kw)
        time.sleep(seconds)  # before the batch is written: a kill now loses only this batch
        return out

    runner.generate_batch = paused
    sys.argv = [EVALUATE, *args]
    runpy.run_path(EVALUATE, run_name="__main__")


def repeat(runs: list[list[str]]) -> None:
    from jaxflow import cli

    cli.enable_fast_compile()  # what cli.run does for the embedded toy model
    cli.enable_compile_cache()
    sys.argv = [EVALUATE]
    script = runpy.run_path(EVALUATE, run_name="evaluate")
    for args in runs:
        cli.flags.FLAGS.unparse_flags()
        cli.parse_flags([EVALUATE, *args])
        try:
            script["main"]([EVALUATE])
        except SystemExit as e:
            if e.code:
                raise


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "slow":
        slow(float(sys.argv[2]), sys.argv[3:])
    elif mode == "repeat":
        repeat(json.loads(sys.argv[2]))
    else:
        sys.exit(f"unknown mode {mode!r}")
