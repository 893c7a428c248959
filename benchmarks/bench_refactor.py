"""jaxflow before/after a code change (default: the model-family refactor, 56644b5 -> HEAD) on the LLaVA
bench config, in one run: forward, truncation sweep and all-layer CAM, old and new code alternately.

    python benchmarks/bench_refactor.py [--old 56644b5 --new HEAD --repeats 5 --batch 4 --text_tokens 64
                                         --answer_tokens 4 --threads 2 --malloc tuned|default
                                         --figures forward,sweep,forward_b1,cam]

Each side is a git worktree of its revision (`git worktree add --detach` into a temp dir, removed at
the end; `--new WORKTREE` uses this checkout as it is, uncommitted edits included). Each side runs in its
own long-lived subprocess, `python benchmarks/bench_refactor.py --worker` with PYTHONPATH=<that tree>
(PYTHONPATH comes before the editable install in site-packages; the worker checks that `jaxflow` was
imported from its tree and prints the path). The benchmark code itself is this checkout's (common.py:
`sweep_cases` and `cam_cases`, the closures bench_sweep.py and bench_cam.py time), so only the library
differs. Both sides load the same weights: one torch LLaVA bench model (common.py, random, fixed seed)
saved with save_pretrained and converted by each side's own `jaxflow.convert_checkpoint`.

Figures (each side: setup = convert, load, one compiling call per figure; then --repeats rounds; in a
round every figure is timed once on each side, back to back, the side order alternating between
figures and rounds, so background load that drifts hits both sides alike):
- forward B:   `jaxflow.forward`, batch --batch, logits to numpy (bench_sweep's unit);
- sweep B:     `jaxflow.truncation_sweep`, all 33 cut layers, same inputs (bench_sweep's sweep);
- forward 1:   `jaxflow.forward`, batch 1, logits on the device (bench_cam's unit);
- cam 1:       `llava_cam(..., "paper")`, batch 1, all 32 layers from one backward (bench_cam's CAM);
and, per side, sweep / forward and cam / forward (medians and per round) next to their goals
(common.GOALS). old/new is printed for every figure as the ratio of the medians, as the ratio of the
fastest rounds ("best": the least disturbed by other load) and as the median of the per-round ratios
(> 1: the new code is faster). --figures times a subset (more rounds in the same time). The first (compiling) call of each figure is
taken once per side, old first, and printed for information. Outputs are compared across the two
sides (last-token logits, the sweep's last-token logits, the CAM maps). Results:
benchmarks/results/refactor.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:  # common only: never the repository root (jaxflow must come from PYTHONPATH)
    sys.path.insert(0, HERE)
import common  # noqa: E402  (imports neither jax nor torch)

FIGURES = ("forward", "sweep", "forward_b1", "cam")
LABELS = {"forward": "forward B={b} (to host)", "sweep": "sweep B={b} ({v} variants)",
          "forward_b1": "forward B=1", "cam": "CAM B=1 ({l} layers)"}


# --------------------------------------------------------------------------- worker (one per tree)


def _w_setup(state, tree, hf_dir, ckpt_dir, out_dir, batch, text_tokens, answer_tokens, figures=FIGURES):
    import numpy as np

    import jaxflow

    where = os.path.realpath(jaxflow.__file__)
    if not where.startswith(os.path.realpath(tree) + os.sep):
        raise RuntimeError(f"jaxflow was imported from {where}, not from {tree}")
    cfg = common.bench_config("llava")
    t0 = time.perf_counter()
    ckpt = common.convert_to_jaxflow(hf_dir, ckpt_dir)
    convert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = jaxflow.load(ckpt)
    load_s = time.perf_counter() - t0
    ids, mask, pix = cfg.inputs(batch, text_tokens)
    ids1, mask1, pix1 = cfg.inputs(1, text_tokens)
    sw = common.sweep_cases(model, ids, pix, mask)
    cc = common.cam_cases(model, ids1, pix1, mask1, common.answer_mask(ids1, answer_tokens), extras=False)
    cases = {"forward": sw["forward"], "sweep": sw["sweep"], "forward_b1": cc["forward"], "cam": cc["cam"]}
    cases = state["cases"] = {k: v for k, v in cases.items() if k in figures}
    first, outs = {}, {}
    for name, fn in cases.items():
        t0 = time.perf_counter()
        outs[name] = common._block(fn())
        first[name] = time.perf_counter() - t0
    keep = {"forward": lambda o: np.asarray(o)[:, -1], "sweep": lambda o: np.asarray(o)[:, :, -1],
            "forward_b1": lambda o: np.asarray(o)[:, -1], "cam": np.asarray}  # last-token logits, the maps
    np.savez(os.path.join(out_dir, "outputs.npz"), **{k: keep[k](o) for k, o in outs.items()})
    return {"jaxflow_file": where, "convert_s": convert_s, "load_s": load_s, "first_call_s": first,
            "rss_after_setup_mb": common.current_rss_mb(), "num_layers": int(model.config.text.num_layers)}


def _w_time(state, name):
    fn = state["cases"][name]
    c0, t0 = time.process_time(), time.perf_counter()
    common._block(fn())
    return [time.perf_counter() - t0, time.process_time() - c0]


def _w_rss(state):
    return common.peak_rss_mb()


def _worker():
    """Line protocol on stdin / a private copy of stdout: {"cmd", "args"} -> {"ok": result} | {"error": tb}."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever else gets printed (jax, transformers) goes to stderr
    handlers = {"setup": _w_setup, "time": _w_time, "rss": _w_rss}
    state = {}
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "exit":
            break
        try:
            reply = {"ok": handlers[msg["cmd"]](state, **msg.get("args", {}))}
        except Exception:  # noqa: BLE001 - reported to the parent
            reply = {"error": traceback.format_exc()}
        proto.write(json.dumps(reply) + "\n")


class Worker:
    def __init__(self, tag: str, tree: str, env: dict):
        self.tag, self.tree = tag, tree
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], cwd=tree,
                                     env={**os.environ, **env, "PYTHONPATH": tree}, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def call(self, cmd, **args):
        self.proc.stdin.write(json.dumps({"cmd": cmd, "args": args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.tag} worker died (exit code {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.tag} worker failed:\n{reply['error']}")
        return reply["ok"]

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- parent


def _git(*args) -> str:
    return subprocess.run(["git", "-C", REPO, *args], check=True, capture_output=True, text=True).stdout.strip()


def _build_and_save(hf_dir: str) -> int:
    """Child: the torch LLaVA bench model (fixed seed), saved with save_pretrained."""
    model = common.build_torch_model("eager")
    common.save_torch_model(model, hf_dir)
    return int(sum(p.numel() for p in model.parameters()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default="56644b5", help="revision before the change (default: before the refactor)")
    ap.add_argument("--new", default="HEAD", help="revision after the change, or WORKTREE for this checkout as is")
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds (medians reported)")
    ap.add_argument("--batch", type=int, default=4, help="batch of the forward / sweep figures")
    ap.add_argument("--text_tokens", type=int, default=64)
    ap.add_argument("--answer_tokens", type=int, default=4)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                    help="tuned: workers run with common.TUNED_MALLOC_ENV (as bench_sweep's); default: glibc's")
    ap.add_argument("--figures", default=",".join(FIGURES),
                    help="comma list of figures to time (fewer: more rounds in the same time); the ratios "
                    "sweep / forward and cam / forward need forward+sweep and forward_b1+cam")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "refactor.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker()
    figures = tuple(f for f in FIGURES if f in args.figures.split(","))
    unknown = set(args.figures.split(",")) - set(FIGURES)
    if unknown or not figures:
        raise SystemExit(f"--figures: unknown {sorted(unknown)}; choose from {','.join(FIGURES)}")

    t_start = time.perf_counter()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env = common.set_threads(args.threads)  # children inherit the affinity and the thread variables
    revs = {"old": _git("rev-parse", "--verify", f"{args.old}^{{commit}}")}
    if args.new != "WORKTREE":
        revs["new"] = _git("rev-parse", "--verify", f"{args.new}^{{commit}}")
    cfg = common.bench_config("llava")
    L = cfg.num_layers
    labels = {k: v.format(b=args.batch, v=L + 1, l=L) for k, v in LABELS.items()}
    tmp = tempfile.mkdtemp(prefix="jaxflow-refactor-")
    trees, worktrees, workers = {}, [], {}
    try:
        for tag in ("old", "new"):
            if tag in revs:
                path = os.path.join(tmp, f"tree-{tag}")
                _git("worktree", "add", "--detach", path, revs[tag])
                worktrees.append(path)
                trees[tag] = path
            else:
                trees[tag] = REPO
        new_desc = revs.get("new", "WORKTREE (this checkout, uncommitted edits included)")
        print(f"old {revs['old'][:10]} ({_git('log', '-1', '--format=%s', revs['old'])[:60]}...)\n"
              f"new {new_desc[:10] if 'new' in revs else new_desc}"
              + (f" ({_git('log', '-1', '--format=%s', revs['new'])[:60]}...)" if "new" in revs else ""))
        print(f"bench config {cfg.name}: {cfg.describe()}\nforward/sweep batch {args.batch} x "
              f"{cfg.seq_len(args.text_tokens)} tokens; forward/CAM batch 1, {args.answer_tokens} answer tokens; "
              f"{args.threads} threads; {args.repeats} alternating rounds; malloc {args.malloc}", flush=True)

        hf_dir = os.path.join(tmp, "hf")
        t0 = time.perf_counter()
        n_params, _ = common.run_isolated(_build_and_save, hf_dir)
        print(f"torch bench model built and saved ({n_params / 1e6:.1f}M params, {time.perf_counter() - t0:.1f}s)",
              flush=True)

        worker_env = common.TUNED_MALLOC_ENV if args.malloc == "tuned" else {}
        setup = {}
        for tag in ("old", "new"):  # one after another: compiles do not compete with each other
            workers[tag] = Worker(tag, trees[tag], worker_env)
            out_dir = os.path.join(tmp, f"out-{tag}")
            os.makedirs(out_dir)
            setup[tag] = workers[tag].call("setup", tree=trees[tag], hf_dir=hf_dir,
                                           ckpt_dir=os.path.join(tmp, f"jaxflow-{tag}"), out_dir=out_dir,
                                           batch=args.batch, text_tokens=args.text_tokens,
                                           answer_tokens=args.answer_tokens, figures=figures)
            s = setup[tag]
            print(f"  {tag}: jaxflow from {s['jaxflow_file']}; convert {s['convert_s']:.1f}s, load "
                  f"{s['load_s']:.1f}s, first calls "
                  + ", ".join(f"{k} {v:.1f}s" for k, v in s["first_call_s"].items()), flush=True)

        times = {tag: {f: [] for f in figures} for tag in workers}
        for r in range(args.repeats):
            for i, fig in enumerate(figures):
                for tag in (("old", "new") if (r + i) % 2 == 0 else ("new", "old")):
                    times[tag][fig].append(workers[tag].call("time", name=fig))
            print(f"  round {r + 1}/{args.repeats} (load {os.getloadavg()[0]:.1f}): "
                  + "; ".join(f"{fig} {times['old'][fig][-1][0]:.2f}/{times['new'][fig][-1][0]:.2f}s"
                              for fig in figures) + "  (old/new)", flush=True)
        peak = {tag: w.call("rss") for tag, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
        for path in worktrees:
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", path], capture_output=True)
        subprocess.run(["git", "-C", REPO, "worktree", "prune"], capture_output=True)

    import numpy as np

    outs = {tag: dict(np.load(os.path.join(tmp, f"out-{tag}", "outputs.npz"))) for tag in ("old", "new")}
    shutil.rmtree(tmp, ignore_errors=True)
    diffs = {k: float(np.abs(outs["old"][k] - outs["new"][k]).max()) for k in outs["old"]}

    wall = {tag: {f: [t[0] for t in ts] for f, ts in figs.items()} for tag, figs in times.items()}
    cpu = {tag: {f: [t[1] for t in ts] for f, ts in figs.items()} for tag, figs in times.items()}
    med = {tag: {f: statistics.median(v) for f, v in figs.items()} for tag, figs in wall.items()}
    derived = {"sweep / forward": ("sweep", "forward"), "cam / forward": ("cam", "forward_b1")}
    derived = {k: v for k, v in derived.items() if set(v) <= set(figures)}
    for tag in med:
        for name, (a, b) in derived.items():
            med[tag][name] = med[tag][a] / med[tag][b]
            wall[tag][name] = [x / y for x, y in zip(wall[tag][a], wall[tag][b])]
    rows = list(figures) + list(derived)
    ratio_of_medians = {k: med["old"][k] / med["new"][k] for k in rows}
    median_of_ratios = {k: statistics.median(o / n for o, n in zip(wall["old"][k], wall["new"][k])) for k in rows}
    best = {tag: {f: min(wall[tag][f]) for f in figures} for tag in wall}  # least disturbed by other load
    for tag in best:
        for name, (a, b) in derived.items():
            best[tag][name] = best[tag][a] / best[tag][b]

    print(f"\n{'figure (median of ' + str(args.repeats) + ')':28s} {'old':>9s} {'new':>9s} {'old/new':>8s} "
          f"{'best old':>9s} {'best new':>9s} {'old/new':>8s}   per-round old/new: median; each round")
    for k in rows:
        unit = "x" if k in derived else "s"
        lab = labels.get(k, k)
        per = " ".join(f"{o / n:.2f}" for o, n in zip(wall["old"][k], wall["new"][k]))
        print(f"{lab:28s} {med['old'][k]:8.3f}{unit} {med['new'][k]:8.3f}{unit} {ratio_of_medians[k]:8.3f} "
              f"{best['old'][k]:8.3f}{unit} {best['new'][k]:8.3f}{unit} {best['old'][k] / best['new'][k]:8.3f}   "
              f"{median_of_ratios[k]:.3f}; {per}")
    print("(old/new > 1: the new code is faster / its ratio smaller; best = fastest round, for x rows the ratio "
          "of the fastest rounds; per-round: the two sides' times in the same round)")
    print(f"{'first call (compile), s':28s} " + "; ".join(
        f"{f} {setup['old']['first_call_s'][f]:.1f} / {setup['new']['first_call_s'][f]:.1f}" for f in figures)
          + "  (old / new, one each)")
    print(f"{'peak RSS, MiB':28s} old {peak['old']:.0f}, new {peak['new']:.0f}")
    goal_keys = {"sweep / forward": "sweep_over_forward_max", "cam / forward": "cam_over_forward_max"}
    for tag in ("old", "new") if derived else ():
        print(f"goals, {tag}: " + "; ".join(common.goal_line(k, med[tag][k], goal_keys[k]) for k in derived))
    print("old vs new outputs, max |diff|: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))

    report = {"benchmark": "refactor", "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "revisions": revs,
              "new_is_worktree": "new" not in revs, "args": vars(args), "environment": env,
              "config": {**cfg.report(), "batch": args.batch, "text_tokens": args.text_tokens,
                         "answer_tokens": args.answer_tokens},
              "setup": setup, "wall_s": wall, "best": best, "cpu_s": cpu, "median": med,
              "old_over_new_ratio_of_medians": ratio_of_medians,
              "old_over_new_median_of_round_ratios": median_of_ratios, "peak_rss_mb": peak,
              "output_max_abs_diff": diffs, "goals": common.GOALS, "total_wall_s": time.perf_counter() - t_start}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out} (total wall {report['total_wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
