"""The report's PNG plots (matplotlib, Agg backend): the marginal effect of each aspect value and the early-stopping
scatter. The robustness studies add their heatmaps and bars (``experiments.report.plots``) with ``pyplot``.

matplotlib is imported only when a plot is drawn, so reading runs and writing tables never pays for it.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from search.report.stats import EarlyStoppingCheck
from search.report.tables import metric_label


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def marginal_plot(marginals: Mapping[str, pd.DataFrame], *, path: Path, title: str, metric: str) -> Path:
    """One panel per aspect: mean value of each of its values over every run that has it, with 95% intervals."""
    plt = pyplot()
    keys = list(marginals)
    n_cols = min(3, len(keys))
    n_rows = math.ceil(len(keys) / n_cols)
    width = max(4.5, 4.2 * n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width, 3.8 * n_rows + 0.6), sharey=True,
                             squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        table = marginals[key]  # in the caller's order: better values first
        x = np.arange(len(table))
        means = table["mean"].to_numpy(dtype=float)
        low, high = table["ci_low"].to_numpy(dtype=float), table["ci_high"].to_numpy(dtype=float)
        errors = np.vstack([np.where(np.isfinite(low), means - low, 0), np.where(np.isfinite(high), high - means, 0)])
        ax.errorbar(x, means, yerr=np.clip(errors, 0, None), fmt="o", capsize=4, color="#4c72b0")
        for xi, (value, n) in enumerate(zip(means, table["seeds"], strict=True)):
            if math.isfinite(value):
                ax.annotate(f"{value:.3f}\nn={n}", (xi, value), xytext=(6, 0), textcoords="offset points",
                            fontsize=7, va="center")
        ax.set_xticks(x, labels=[str(v) for v in table[key]], rotation=35, ha="right")
        ax.set_xlim(-0.5, len(table) - 0.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel(f"{key} value")
        ax.grid(axis="y", alpha=0.3)
    for row in axes:
        row[0].set_ylabel(metric_label(metric))
    fig.suptitle(textwrap.fill(title, int(13 * width)), fontsize=10)  # about 13 characters per inch at 10 pt
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def early_stopping_plot(check: EarlyStoppingCheck, *, path: Path, title: str, metric: str) -> Path | None:
    """Each trial's value at the grace period against its last value; None below two trials (nothing to show)."""
    if check.trials < 2:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.scatter(check.pairs["at_grace"], check.pairs["final"], color="#4c72b0")
    rho = "undefined" if not math.isfinite(check.rho) else f"{check.rho:.2f}"
    ax.set_title(f"{title}\nSpearman rho = {rho} over {check.trials} trials", fontsize=10)
    ax.set_xlabel(f"{metric_label(metric)} at epoch {check.grace_period} (grace period)")
    ax.set_ylabel(f"{metric_label(metric)} at the last epoch")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
