"""The robustness studies' PNG plots: heatmaps of cells and robustness bars (the marginal and early-stopping plots
every report draws are ``search.report.plots``).

matplotlib is imported only when a plot is drawn, so reading runs and writing tables never pays for it.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from search.report.plots import pyplot
from search.report.tables import metric_label


def heatmap(table: pd.DataFrame, *, rows: str, cols: str, path: Path, title: str, metric: str,
            not_applicable: set[tuple[str, str]] = frozenset(), row_order: Sequence[str] | None = None,
            row_label: str | None = None) -> Path:
    """Mean value per (row, col) cell, annotated; not-applicable cells grey with "n/a", missing ones "—"."""
    plt = pyplot()
    pivot = table.pivot_table(index=rows, columns=cols, values="mean", aggfunc="first")
    if row_order is not None:
        pivot = pivot.reindex([r for r in row_order if r in pivot.index])
    data = pivot.to_numpy(dtype=float)
    n_rows, n_cols = data.shape
    fig, ax = plt.subplots(figsize=(2.2 + 1.25 * n_cols, 1.4 + 0.55 * n_rows))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    finite = data[np.isfinite(data)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 0.01, vmax + 0.01
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    for i, row in enumerate(pivot.index):
        for j, col in enumerate(pivot.columns):
            value = data[i, j]
            if (str(row), str(col)) in not_applicable:
                text, colour = "n/a", "black"
            elif not math.isfinite(value):
                text, colour = "—", "black"
            else:
                text = f"{value:.3f}"
                colour = "white" if (value - vmin) / (vmax - vmin) < 0.6 else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)
    ax.set_xticks(range(n_cols), labels=[str(c) for c in pivot.columns], rotation=30, ha="right")
    ax.set_yticks(range(n_rows), labels=[str(r) for r in pivot.index])
    ax.set_xlabel(cols)
    ax.set_ylabel(row_label or rows)
    ax.set_title(textwrap.fill(title, 60), fontsize=10)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(metric_label(metric))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def robustness_bars(ranked: pd.DataFrame, *, path: Path, title: str, metric: str,
                    row_label: str = "combination") -> Path:
    """Mean and worst case per combination (ranked order), with their bootstrap intervals as error bars."""
    plt = pyplot()
    names = [str(n) for n in ranked["combination"]]
    x = np.arange(len(names))
    width = 0.38
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(names), 4.2))
    for offset, score, colour in ((-width / 2, "mean", "#4c72b0"), (width / 2, "worst", "#dd8452")):
        values = ranked[score].to_numpy(dtype=float)
        low = ranked[f"{score}_low"].to_numpy(dtype=float)
        high = ranked[f"{score}_high"].to_numpy(dtype=float)
        errors = np.vstack([np.where(np.isfinite(low), values - low, 0.0), np.where(np.isfinite(high), high - values,
                                                                                   0.0)])
        bars = ax.bar(x + offset, np.nan_to_num(values), width, yerr=np.clip(errors, 0, None), capsize=3,
                      color=colour, label=f"{score} over conditions")
        for bar, value in zip(bars, values, strict=True):
            if math.isfinite(value):
                ax.annotate(f"{value:.3f}", (bar.get_x() + bar.get_width() / 2, 0), xytext=(0, 3),
                            textcoords="offset points", ha="center", va="bottom", fontsize=7, rotation=90,
                            color="white")
    ax.set_xticks(x, labels=names, rotation=30, ha="right")
    ax.set_ylabel(metric_label(metric))
    ax.set_xlabel(f"{row_label} (ranked by worst case)")
    ax.set_title(textwrap.fill(title, 90), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
