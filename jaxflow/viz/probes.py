"""Figure of the per-layer probes: held-out accuracy against layer, the truncation cliff marked."""
from __future__ import annotations

import os

import numpy as np

GROUP_TITLES = {"answer": "the answer", "presence": "what is in the image", "question": "what the question asks"}


def plot_probes(summary: dict, path: str, *, title: str = "") -> str:
    """One panel per probe group present (answer, presence, question) of a probes.json summary
    (`jaxflow.analysis.probes.run_probes`): each probe's held-out accuracy per layer with its 95%
    interval (band) and its chance level (dotted); the answer panel also shows the truncation curve's
    accuracy (image cut from layer K on, same items) and every panel the cliff layer (dashed). Writes a
    PNG; returns path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    probes = summary["probes"]
    groups = [g for g in ("answer", "presence", "question") if any(p["group"] == g for p in probes)]
    groups += sorted({p["group"] for p in probes} - set(groups))
    layers = np.asarray(summary["layers"])
    L = int(summary["num_layers"])
    fig = Figure(figsize=(5.2 * len(groups), 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, len(groups), i + 1) for i in range(len(groups))]
    trunc = summary.get("truncation")
    cliff = summary.get("cliff_layer")
    for ax, g in zip(axes, groups):
        mine = [p for p in probes if p["group"] == g]
        colors = _colors(len(mine))
        for p, c in zip(mine, colors):
            acc = np.asarray(p["accuracy"])
            ax.plot(layers, acc, marker="o", ms=3, color=c, label=f"{p['name']} (n_test {p['n_test']})")
            ax.fill_between(layers, p["ci_low"], p["ci_high"], color=c, alpha=0.15, lw=0)
            ax.axhline(p["chance"], color=c, ls=":", lw=1, alpha=0.7)
        if g == "answer" and trunc is not None:
            has_acc = all("accuracy" in r["metrics"] for r in trunc["per_layer"])
            metric = "accuracy" if has_acc else trunc["primary_metric"]
            ks = [r["K"] for r in trunc["per_layer"]]
            ax.plot(ks, [r["metrics"][metric] for r in trunc["per_layer"]], marker="s", ms=3, color="tab:gray",
                    ls="--", label=f"model's {metric}, image cut from layer K on")
        if cliff is not None:
            ax.axvline(cliff, color="tab:red", ls="--", lw=1.2,
                       label=f"truncation cliff K = {cliff} ({trunc['primary_metric']}, epsilon {trunc['epsilon']:g})")
        ax.set_title(f"probes for {GROUP_TITLES.get(g, g)}", fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.3, L + 0.3)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_xlabel(f"layer l (residual entering decoder layer l; l = {L}: the last layer's output)", fontsize=8)
        ax.set_ylabel("held-out accuracy (95% Wilson band; dotted: chance)")
        ax.legend(loc="lower right", fontsize=7)
    n = summary.get("split", {}).get("n_test")
    fig.suptitle(title or f"{summary['model']} on {summary['dataset']} ({summary['n_items']} items, {n} held out): "
                 "linear probes at the last prompt token", fontsize=11)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext or '.png'}"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return path


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
