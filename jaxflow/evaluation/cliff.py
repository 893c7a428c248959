"""The cliff layer of a truncation curve, the per-run summary (JSON, CSV, report.html) and the figures.

**Cliff layer.** For a metric m evaluated at cut layers K_0 < K_1 < ... < K_n = L (L = the number
of decoder layers; K = L is the untruncated model, the baseline):

    cliff = the smallest evaluated K such that |m(K') - m(L)| <= epsilon for every evaluated K' >= K.

So from the cliff on, cutting the image out of attention changes the metric by at most epsilon
(absolute; the metrics are fractions in [0, 1], so the default 0.01 is one percentage point);
below it there is a layer where the cut costs (or gains) more. The cliff always exists (K = L
qualifies), is computed per data set and model (one run), and with a partial sweep it is resolved
only to the evaluated layers. A comparison within 1e-9 of epsilon counts as within (so that
0.85 - 0.84 is within 0.01 despite rounding). A NaN value is never within.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os

import numpy as np

CLIFF_DEFINITION = ("smallest evaluated K such that |m(K') - m(L)| <= epsilon for every evaluated K' >= K "
                    "(L = untruncated)")
_SLACK = 1e-9


def cliff_layer(layers, values, epsilon: float = 0.01, *, baseline_layer: int | None = None) -> int:
    """The cliff layer of one curve (definition in the module docstring).

    layers: the evaluated cut layers K (any order, distinct integers); values: the metric at each;
    baseline_layer: the untruncated K (default: the largest of ``layers``, which must be L).
    """
    ks = [int(k) for k in layers]
    vs = [float(v) for v in values]
    if len(ks) != len(vs):
        raise ValueError(f"{len(ks)} layers but {len(vs)} values")
    if not ks:
        raise ValueError("no layers")
    if len(set(ks)) != len(ks):
        raise ValueError(f"layers must be distinct, got {ks}")
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    base_k = max(ks) if baseline_layer is None else int(baseline_layer)
    if base_k not in ks:
        raise ValueError(f"the baseline layer {base_k} is not among the layers {sorted(ks)}")
    if base_k != max(ks):
        raise ValueError(f"the baseline layer {base_k} must be the largest layer (the untruncated model)")
    curve = sorted(zip(ks, vs))
    base = dict(curve)[base_k]
    cliff = base_k
    for k, v in reversed(curve):  # walk down from the baseline while the curve stays within epsilon
        if not (abs(v - base) <= epsilon + _SLACK):  # NaN is never within
            break
        cliff = k
    return cliff


# --------------------------------------------------------------------------- summary


def summary_rows(summary: dict) -> list[dict]:
    """[{"K": k, metric: value, ...}] in K order."""
    return [dict({"K": r["K"]}, **r["metrics"]) for r in summary["per_layer"]]


CAPTION_DATASETS = ("chair", "toy_caption")


def caption_notes(dataset: str, metrics_per_layer, layers) -> list[str]:
    """What a caption set's CHAIR numbers hide: at each K where captions mention no object, a note
    that those captions count as free of hallucination while recall (what they cover) is shown
    beside. Empty for other data sets."""
    if dataset not in CAPTION_DATASETS:
        return []
    notes = []
    for k in layers:
        m = metrics_per_layer[k]
        empty = m.get("empty_ratio")
        if empty:
            notes.append(f"K = {k}: {empty:.0%} of the captions mention no object; they count as free of "
                         f"hallucination (lowering CHAIR_s {m.get('chair_s', 0.0):.4f}) while covering nothing: "
                         f"recall is {m.get('recall', 0.0):.4f}")
    return notes


def build_summary(*, dataset: str, model: str, num_layers: int, layers, metrics_per_layer, primary_metric: str,
                  epsilon: float, n_items: int, sweep: str, params: dict | None = None,
                  extra: dict | None = None) -> dict:
    """The summary of one run: metrics per K, the primary metric's curve, baseline, cliff layer."""
    layers = [int(k) for k in layers]
    per_layer = [{"K": k, "metrics": {m: float(v) for m, v in metrics_per_layer[k].items()}} for k in layers]
    values = [metrics_per_layer[k][primary_metric] for k in layers]
    baseline = float(metrics_per_layer[num_layers][primary_metric]) if num_layers in metrics_per_layer else None
    cliff = None
    if len(layers) > 1 and num_layers in layers:
        cliff = cliff_layer(layers, values, epsilon, baseline_layer=num_layers)
    out = {
        "dataset": dataset, "model": model, "num_layers": num_layers, "sweep": sweep, "n_items": n_items,
        "primary_metric": primary_metric, "layers": layers, "primary": [float(v) for v in values],
        "baseline_layer": num_layers, "baseline": baseline,
        "epsilon": float(epsilon), "cliff_layer": cliff, "cliff_definition": CLIFF_DEFINITION,
        "at_cliff": None if cliff is None else float(metrics_per_layer[cliff][primary_metric]),
        "per_layer": per_layer,
    }
    if dataset in CAPTION_DATASETS:
        out["notes"] = caption_notes(dataset, metrics_per_layer, layers)
    if params is not None:
        out["params"] = params
    if extra:
        out.update(extra)
    return out


def summary_csv(summary: dict) -> str:
    """One row per K: K, the primary metric, then every other metric (sorted by name)."""
    rows = summary_rows(summary)
    primary = summary["primary_metric"]
    names = sorted({k for r in rows for k in r if k not in ("K", primary)})
    cols = ["K", primary] + names
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([r["K"]] + [repr(float(r[c])) if c in r else "" for c in cols[1:]])
    return buf.getvalue()


def write_summary(out: str, summary: dict, stem: str = "summary") -> tuple[str, str]:
    """{stem}.json and {stem}.csv in out (default summary.json, summary.csv; each written atomically);
    returns their paths."""
    from jaxflow.evaluation.records import write_json_atomic

    jpath, cpath = os.path.join(out, f"{stem}.json"), os.path.join(out, f"{stem}.csv")
    write_json_atomic(jpath, summary)
    tmp = f"{cpath}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(summary_csv(summary))
    os.replace(tmp, cpath)
    return jpath, cpath


def load_summary(path: str) -> dict:
    """A run's summary.json (path: the file or its run directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, "summary.json")
    if not os.path.isfile(path):
        from jaxflow.evaluation.records import EvaluationError

        raise EvaluationError(f"no summary.json at {path}: run scripts/evaluate.py to the end first")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def find_runs(paths) -> list[str]:
    """Run directories (holding summary.json) at or below each path, sorted, without duplicates."""
    from jaxflow.evaluation.records import EvaluationError

    found = []
    for p in paths:
        if not os.path.exists(p):
            raise EvaluationError(f"run directory not found: {p}")
        if os.path.isfile(p) and os.path.basename(p) == "summary.json":
            found.append(os.path.dirname(os.path.abspath(p)))
            continue
        hits = []
        for root, dirs, files in os.walk(p):
            dirs.sort()
            if "summary.json" in files:
                hits.append(os.path.abspath(root))
        if not hits:
            raise EvaluationError(f"no summary.json at or below {p}")
        found.extend(hits)
    return list(dict.fromkeys(found))


# --------------------------------------------------------------------------- figures


def _figure(**kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext or '.png'}"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return path


def _metric_label(dataset: str, metric: str) -> str:
    names = {"f1": "F1", "accuracy": "accuracy", "chair_s": "CHAIR_s", "chair_i": "CHAIR_i", "recall": "recall"}
    return f"{dataset} {names.get(metric, metric)}"


def _draw_curve(ax, summary: dict, metric: str, *, color=None, label=None, epsilon=None, band=True,
                baseline_color=None, cliff_color=None) -> dict:
    """Draws one run's curve; returns its artists ("line", "baseline", "cliff_line") and "cliff"."""
    rows = summary_rows(summary)
    ks = np.array([r["K"] for r in rows])
    vs = np.array([r.get(metric, np.nan) for r in rows], float)
    L = summary["num_layers"]
    eps = summary["epsilon"] if epsilon is None else epsilon
    line, = ax.plot(ks, vs, marker="o", ms=3.5, lw=1.5, color=color, label=label)
    color = line.get_color()
    out = {"line": line, "baseline": None, "cliff_line": None, "cliff": None}
    if L in ks:
        base = float(vs[list(ks).index(L)])
        out["baseline"] = ax.axhline(base, color=baseline_color or color, ls=":", lw=1.2, alpha=0.9)
        if band and len(ks) > 1:
            ax.axhspan(base - eps, base + eps, color=baseline_color or color, alpha=0.1, lw=0)
        if len(ks) > 1:
            out["cliff"] = cliff_layer(ks, vs, eps, baseline_layer=L)
            out["cliff_line"] = ax.axvline(out["cliff"], color=cliff_color or color, ls="--", lw=1.2,
                                           alpha=0.9)
    return out


def _min_yspan(ax, span: float = 0.1) -> None:
    """A flat curve is drawn on an axis at least ``span`` tall (not zoomed into rounding noise)."""
    lo, hi = ax.get_ylim()
    if hi - lo < span:
        mid = (lo + hi) / 2
        ax.set_ylim(mid - span / 2, mid + span / 2)


def plot_curve(summary: dict, path: str, *, metric: str | None = None, epsilon: float | None = None) -> str:
    """The primary metric (or ``metric``) against the cut layer K: baseline (K = L) as a dotted line
    with the +-epsilon band, the cliff layer as a dashed vertical line. Writes a PNG; returns path."""
    from matplotlib.ticker import MaxNLocator

    metric = metric or summary["primary_metric"]
    eps = summary["epsilon"] if epsilon is None else epsilon
    fig = _figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    art = _draw_curve(ax, summary, metric, color="tab:blue", epsilon=eps, baseline_color="tab:gray",
                      cliff_color="tab:red")
    L = summary["num_layers"]
    rows = {r["K"]: r for r in summary_rows(summary)}
    handles, labels = [art["line"]], [f"{metric} at cut layer K"]
    if art["baseline"] is not None:
        handles.append(art["baseline"])
        labels.append(f"baseline (K = L = {L}): {rows[L][metric]:.4f}, band +-{eps:g}")
    if art["cliff_line"] is not None:
        handles.append(art["cliff_line"])
        labels.append(f"cliff layer K = {art['cliff']} (epsilon {eps:g})")
    ax.legend(handles, labels, loc="best", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-0.5, L + 0.5)
    _min_yspan(ax)
    ax.grid(alpha=0.3)
    ax.set_xlabel("cut layer K (image tokens masked from layer K on; K = L: untruncated)")
    ax.set_ylabel(_metric_label(summary["dataset"], metric))
    ax.set_title(f"{summary['model']} on {summary['dataset']} ({summary['n_items']} items): "
                 f"{metric} vs truncation layer", fontsize=10)
    return _save(fig, path)


def cliff_figure(run_dirs, out: str, *, epsilon: float | None = None, metric: str | None = None) -> dict:
    """The combined figure (like the paper's Figure 5): one panel per data set, one curve per model
    (run), each with its baseline (dotted) and cliff layer (dashed). run_dirs: run directories or
    folders holding them (searched recursively for summary.json). epsilon: recompute the cliffs
    with this epsilon (default: each run's own). metric: plot this metric instead of each data
    set's primary one. Writes a PNG at out; returns {"path", "cliffs": [(dataset, model, K)]}."""
    from matplotlib.ticker import MaxNLocator

    from jaxflow.evaluation.records import EvaluationError

    runs = [load_summary(d) for d in find_runs(run_dirs)]
    runs = [s for s in runs if len(s["layers"]) > 1]
    if metric is not None:
        for s in runs:
            have = set(summary_rows(s)[0]) - {"K"}
            if metric not in have:
                raise EvaluationError(f"metric {metric!r} is not in the {s['dataset']} run of {s['model']}; "
                                      f"it has: {', '.join(sorted(have))}")
    if not runs:
        raise EvaluationError("none of the runs has a truncation curve (all were --sweep none)")
    order = ["pope", "textvqa", "scienceqa", "chair"]
    datasets = sorted({s["dataset"] for s in runs}, key=lambda d: (order.index(d) if d in order else 99, d))
    n = len(datasets)
    ncols = min(n, 2) if n != 3 else 3
    nrows = math.ceil(n / ncols)
    fig = _figure(figsize=(5.2 * ncols, 3.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = {}
    cliffs = []
    palette = [f"C{i}" for i in range(10)]
    for ax, ds in zip(axes, datasets):
        for s in sorted((s for s in runs if s["dataset"] == ds), key=lambda s: s["model"]):
            m = metric or s["primary_metric"]
            color = colors.setdefault(s["model"], palette[len(colors) % len(palette)])
            eps = s["epsilon"] if epsilon is None else epsilon
            art = _draw_curve(ax, s, m, color=color, epsilon=eps, band=False)
            art["line"].set_label(f"{s['model']}: cliff K = {art['cliff']}")
            cliffs.append((ds, s["model"], art["cliff"]))
        m = metric or runs[[r["dataset"] for r in runs].index(ds)]["primary_metric"]
        ax.set_title(_metric_label(ds, m))
        ax.set_xlabel("cut layer K")
        ax.set_ylabel(m)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _min_yspan(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in axes[n:]:
        ax.set_visible(False)
    eps_note = f"epsilon {epsilon:g}" if epsilon is not None else "each run's epsilon"
    fig.suptitle(f"Truncation curves: metric vs cut layer K; dotted = untruncated baseline, dashed = cliff layer "
                 f"({eps_note})", fontsize=10)
    _save(fig, out)
    return {"path": out, "cliffs": cliffs}


# --------------------------------------------------------------------------- report.html


REPORT_HTML = "report.html"


def evaluation_report_html(summary: dict, *, model: dict | None = None, settings: dict | None = None,
                           figure: str | None = None, prompt=None, unknown=None, examples=None) -> str:
    """One run's self-contained report page (`jaxflow.viz.html_report`): the cliff layer and baseline,
    the metrics per cut layer K (every metric; the cliff row highlighted), the metric-vs-K figure
    embedded, the model, the settings, an example prompt as tokenised (`prompt`: HTML from
    `html_report.prompt_html`), the words the tokenizer does not know (`unknown`: HTML from
    `html_report.unknown_words_table`, None when every word is known) and example predictions
    (`examples`: (header, rows))."""
    from jaxflow.viz import html_report as H

    primary = summary["primary_metric"]
    rows = summary_rows(summary)
    names = sorted({k for r in rows for k in r if k not in ("K", primary)})
    L, cliff = summary["baseline_layer"], summary["cliff_layer"]
    table_rows, hl = [], []
    for i, r in enumerate(rows):
        mark = "cliff" if r["K"] == cliff else ""
        if r["K"] == L:
            mark = (mark + ", " if mark else "") + "baseline (untruncated)"
        counts = [int(r[n]) if (n == "n" or n.endswith("/n")) and isinstance(r.get(n), float) and r[n].is_integer()
                  else r.get(n) for n in names]  # item counts stored as floats
        table_rows.append([r["K"], r.get(primary)] + counts + [mark])
        if r["K"] == cliff:
            hl.append(i)
    facts = {"data set": summary["dataset"], "items scored": summary["n_items"], "primary metric": primary,
             "baseline (K = L)": summary["baseline"], "cliff layer": cliff, "metric at the cliff": summary["at_cliff"],
             "epsilon": summary["epsilon"], "cliff definition": summary["cliff_definition"],
             "cut layers evaluated": f"{len(summary['layers'])} ({summary['sweep']})"}
    skipped = summary.get("skipped_at_run_time") or []
    if skipped:
        facts["skipped at run time"] = f"{len(skipped)} item(s) with unreadable images (see summary.json)"
    notes = [H.note(n, "warn") for n in summary.get("notes") or []]
    parts = [H.section("Result", H.kv_table(facts, ("run", "")),
                       H.note("no curve: --sweep none evaluates the untruncated model only") if cliff is None else None,
                       *notes),
             H.section("Metrics per cut layer K", H.table(["K", primary] + names + [""], table_rows,
                                                           left=(len(names) + 2,), highlight=hl)),
             H.figure(figure, f"{os.path.basename(figure)}: {primary} against K, baseline dotted with the epsilon band, "
                              "cliff dashed") if figure and os.path.isfile(figure) else None]
    if model:
        parts.append(H.section("Model", H.kv_table(model, ("model", ""))))
    if settings:
        parts.append(H.section("Settings", H.kv_table(settings)))
    if prompt is not None or unknown is not None:
        parts.append(H.section("Prompt as tokenised (the first item)", prompt,
                               unknown if unknown is not None else
                               H.note("every word of the prompts is known to the tokenizer", "ok")))
    if examples:
        header, ex_rows = examples
        parts.append(H.section(f"Predictions of the first {len(ex_rows)} items",
                               H.table(header, ex_rows, left=tuple(range(1, len(header))))))
    return H.page(f"jaxflow evaluation: {summary['model']} on {summary['dataset']}", *parts,
                  subtitle=f"{summary['n_items']} items, cut layers {summary['sweep']}")



def write_report(out: str, summary: dict, **kw) -> str:
    """report.html in the run directory `out` (written atomically); kw as `evaluation_report_html`
    (figure default: the run's truncation_curve.png)."""
    from jaxflow.evaluation.records import CURVE_PNG
    from jaxflow.viz.html_report import write_html

    kw.setdefault("figure", os.path.join(out, CURVE_PNG))
    return write_html(os.path.join(out, REPORT_HTML), evaluation_report_html(summary, **kw))
