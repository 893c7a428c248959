"""Figures for truncation: the answer's probability against the cut layer K, cliff marked."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_sweep_report(report, path: str, title: str = "") -> str:
    """Two panels over K: the untruncated answer's probabilities (first token, whole answer) and the
    first token's logit margin, cliff layer marked; writes a PNG."""
    from matplotlib.ticker import MaxNLocator

    ks = np.asarray(report.layers)
    first = np.exp(report.first_token_logprob)
    whole = np.exp(report.answer_logprob)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7.5, 6), sharex=True, constrained_layout=True)
    ax1.plot(ks, first, marker="o", ms=3, color="tab:blue", label="P(first answer token)")
    if len(report.answer_ids[-1]) > 1:
        ax1.plot(ks, whole, marker=".", ms=3, color="tab:purple", alpha=0.7, label="P(whole answer)")
    ax1.axhline(first[-1], color="grey", ls="--", lw=1, label=f"untruncated (K = {ks[-1]}): {first[-1]:.3f}")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax1, ax2):
        ax.axvline(report.cliff, color="tab:red", lw=1.2, label=f"cliff layer {report.cliff}" if ax is ax1 else None)
        ax.grid(alpha=0.3)
    ax1.set_ylabel("answer probability")
    ax1.set_ylim(-0.02, 1.02)
    ax1.legend(loc="best", fontsize=8)
    ax2.plot(ks, report.first_token_margin, marker="o", ms=3, color="tab:green")
    ax2.axhline(0, color="black", lw=0.8)
    ax2.set_ylabel("first-token logit margin")
    ax2.set_xlabel("cut layer K (no query sees an image key in layers >= K)")
    ans = report.reference_answer if len(report.reference_answer) < 60 else report.reference_answer[:57] + "..."
    fig.suptitle(title or f"Truncation sweep: answer {ans!r}", fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
