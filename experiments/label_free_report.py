"""The label-free validation study's statistics and report: how well each label-free metric tracks accuracy.

For each label-free metric (``csl.metrics.LABEL_FREE``, and ``ssl_loss`` beside them as the naive choice) over the
trials of one search:

- Spearman's ρ with the final kNN accuracy (and the online linear probe's), over all trials (across methods) and
  within each method, with a paired percentile bootstrap over trials (``scipy.stats.bootstrap``); the mean of the
  within-method ρ has a bootstrap stratified by method (each method's trials resampled on their own).
  ρ is *oriented*: multiplied by -1 for a metric whose better direction (``csl.metrics.METRICS[...].mode``) is
  ``min``, so a positive ρ always means "the value the metric prefers goes with higher accuracy".
- The *selection regret*: the kNN accuracy of the best trial minus that of the trial the metric would pick (its
  best value), in points, over all trials and within each method, with the same paired bootstrap. Picking a trial
  at random has an expected regret of (best - mean), the baseline a useful metric must beat.

Pure numpy / scipy / pandas on a table of trials, so it is tested on constructed data; ``write_report`` adds the
Markdown and the PNG scatter (matplotlib, Agg).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from csl.metrics import LABEL_FREE, METRICS

CANDIDATES: tuple[str, ...] = (*LABEL_FREE, "ssl_loss")
"""The metrics judged: the held-out label-free ones, and the SSL loss (comparable within a method only)."""
ACCURACIES: tuple[str, ...] = ("knn_acc", "probe_acc")
CHANCE = 0.10  # CIFAR-10
ALL = "all trials"
MEAN_WITHIN = "mean within"
MIN_TRIALS = 4
"""Fewest trials in a group for a ρ to be reported: with 3, Spearman's ρ takes only four values."""


@dataclass(frozen=True)
class Estimate:
    """A statistic and its bootstrap interval (nan where the group is too small or the resamples degenerate)."""

    value: float
    low: float = math.nan
    high: float = math.nan
    n: int = 0

    def text(self, digits: int = 2) -> str:
        if not math.isfinite(self.value):
            return "—"
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return f"{self.value:+.{digits}f}"
        return f"{self.value:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def orientation(metric: str) -> int:
    return 1 if METRICS[metric].mode == "max" else -1


def _rho(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's ρ along ``axis`` (vectorised over resamples): Pearson's r of the ranks, ties averaged."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        return stats.pearsonr(stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis), axis=axis).statistic


def _interval(data: tuple[np.ndarray, ...], statistic: Callable[..., Any], *, paired: bool, n_resamples: int,
              confidence: float, seed: int) -> tuple[float, float]:
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        result = stats.bootstrap(data, statistic, paired=paired, vectorized=True, n_resamples=n_resamples,
                                 confidence_level=confidence, method="percentile", random_state=seed)
    low, high = result.confidence_interval
    if not (math.isfinite(low) and math.isfinite(high)):
        # Resamples that repeat one trial leave ρ undefined (nan); scipy's percentile then spans nothing, so the
        # interval is taken over the defined resamples (its percentiles, at the same confidence).
        tail = 50 * (1 - confidence)
        finite = np.asarray(result.bootstrap_distribution, dtype=float)
        finite = finite[np.isfinite(finite)]
        if finite.size < n_resamples / 2:
            return math.nan, math.nan
        low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def spearman(metric: np.ndarray, accuracy: np.ndarray, *, sign: int = 1, n_resamples: int = 10_000,
             confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Oriented Spearman ρ of ``metric`` with ``accuracy`` and its paired percentile bootstrap over trials."""
    x, y = np.asarray(metric, dtype=float), np.asarray(accuracy, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < MIN_TRIALS:
        return Estimate(math.nan, n=int(x.size))
    value = sign * float(stats.spearmanr(x, y).statistic)
    low, high = _interval((x, y), lambda a, b, axis=-1: sign * _rho(a, b, axis), paired=True,
                          n_resamples=n_resamples, confidence=confidence, seed=seed)
    return Estimate(value, low, high, int(x.size))


def mean_within(groups: Sequence[tuple[np.ndarray, np.ndarray]], *, sign: int = 1, n_resamples: int = 10_000,
                confidence: float = 0.95, seed: int = 0) -> Estimate:
    """The mean over groups (methods) of the oriented within-group ρ; the bootstrap resamples each group's trials
    on their own (scipy's independent resampling of several samples, here the groups' trial indices)."""
    usable = []
    for x, y in groups:
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        keep = np.isfinite(x) & np.isfinite(y)
        if keep.sum() >= MIN_TRIALS:
            usable.append((x[keep], y[keep]))
    if not usable:
        return Estimate(math.nan)
    value = sign * float(np.mean([stats.spearmanr(x, y).statistic for x, y in usable]))
    if len(usable) < 2:  # scipy's bootstrap takes one sample per group; one group is spearman() itself
        x, y = usable[0]
        return spearman(x, y, sign=sign, n_resamples=n_resamples, confidence=confidence, seed=seed)

    def statistic(*indices: np.ndarray, axis: int = -1) -> np.ndarray:
        rhos = [_rho(x[i.astype(int)], y[i.astype(int)], axis) for (x, y), i in zip(usable, indices, strict=True)]
        return sign * np.mean(rhos, axis=0)

    index_samples = tuple(np.arange(len(x), dtype=float) for x, _ in usable)
    low, high = _interval(index_samples, statistic, paired=False, n_resamples=n_resamples, confidence=confidence,
                          seed=seed)
    return Estimate(value, low, high, sum(len(x) for x, _ in usable))


def regret(metric: np.ndarray, accuracy: np.ndarray, *, mode: str, n_resamples: int = 10_000,
           confidence: float = 0.95, seed: int = 0) -> tuple[Estimate, int | None]:
    """(best accuracy - accuracy of the trial ``metric`` picks, in points, with its paired bootstrap; the position
    of the picked trial among the finite ones). Ties in the metric go to the first trial."""
    x, y = np.asarray(metric, dtype=float), np.asarray(accuracy, dtype=float)
    keep = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    if keep.size == 0:
        return Estimate(math.nan), None
    x, y = x[keep], y[keep]
    pick = int(np.argmax(x) if mode == "max" else np.argmin(x))
    value = 100.0 * float(y.max() - y[pick])
    if x.size < 2:
        return Estimate(value, n=1), int(keep[pick])

    def statistic(index: np.ndarray, axis: int = -1) -> np.ndarray:
        i = index.astype(int)
        xs, ys = x[i], y[i]
        chosen = np.argmax(xs, axis=axis) if mode == "max" else np.argmin(xs, axis=axis)
        return 100.0 * (ys.max(axis=axis) - np.take_along_axis(ys, np.expand_dims(chosen, axis), axis).squeeze(axis))

    low, high = _interval((np.arange(x.size, dtype=float),), statistic, paired=True, n_resamples=n_resamples,
                          confidence=confidence, seed=seed)
    return Estimate(value, low, high, int(x.size)), int(keep[pick])


def random_regret(accuracy: np.ndarray, *, n_resamples: int = 10_000, confidence: float = 0.95,
                  seed: int = 0) -> Estimate:
    """The expected regret of a trial picked at random: best - mean, in points, with its bootstrap."""
    y = np.asarray(accuracy, dtype=float)
    y = y[np.isfinite(y)]
    if y.size < 2:
        return Estimate(math.nan)
    value = 100.0 * float(y.max() - y.mean())
    low, high = _interval((y,), lambda a, axis=-1: 100.0 * (a.max(axis=axis) - a.mean(axis=axis)), paired=True,
                          n_resamples=n_resamples, confidence=confidence, seed=seed)
    return Estimate(value, low, high, int(y.size))


# ------------------------------------------------------------------------------------------------ the analysis


@dataclass
class Validation:
    """Every figure of the report, keyed by (metric, accuracy, group); groups are ``ALL``, each method, and
    ``MEAN_WITHIN`` (for ρ only)."""

    trials: pd.DataFrame
    methods: list[str]
    rho: dict[tuple[str, str, str], Estimate]
    regret: dict[tuple[str, str], tuple[Estimate, int | None]]  # (metric, group) -> regret, picked row
    random: dict[str, Estimate]  # group -> random pick's expected regret


def validate(trials: pd.DataFrame, *, n_resamples: int = 10_000, confidence: float = 0.95,
             seed: int = 0) -> Validation:
    """The study's figures from a table of trials (columns ``method``, the accuracies, the candidates)."""
    methods = sorted(trials["method"].unique())
    options = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    groups = {ALL: trials, **{m: trials[trials["method"] == m] for m in methods}}
    rho: dict[tuple[str, str, str], Estimate] = {}
    for metric in CANDIDATES:
        sign = orientation(metric)
        for accuracy in ACCURACIES:
            for name, frame in groups.items():
                if name == ALL and metric == "ssl_loss":
                    continue  # one method's loss is not on another's scale
                rho[(metric, accuracy, name)] = spearman(frame[metric].to_numpy(), frame[accuracy].to_numpy(),
                                                         sign=sign, **options)
            rho[(metric, accuracy, MEAN_WITHIN)] = mean_within(
                [(groups[m][metric].to_numpy(), groups[m][accuracy].to_numpy()) for m in methods], sign=sign,
                **options)
    picks: dict[tuple[str, str], tuple[Estimate, int | None]] = {}
    for metric in CANDIDATES:
        for name, frame in groups.items():
            if name == ALL and metric == "ssl_loss":
                continue
            estimate, position = regret(frame[metric].to_numpy(), frame["knn_acc"].to_numpy(),
                                        mode=METRICS[metric].mode, **options)
            picks[(metric, name)] = (estimate, None if position is None else int(frame.index[position]))
    random = {name: random_regret(frame["knn_acc"].to_numpy(), **options) for name, frame in groups.items()}
    return Validation(trials, methods, rho, picks, random)


# ------------------------------------------------------------------------------------------------ the report


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def _label(trials: pd.DataFrame, index: Any) -> str:
    row = trials.loc[index]
    seed = f" seed {row['seed']}" if "seed" in trials and trials["seed"].nunique() > 1 else ""
    return f"{row['method']} lr={row['lr']:.3g}{seed}"


def findings(result: Validation) -> list[str]:
    """Plain sentences: which metrics track kNN across methods and within them, judged by the intervals."""
    lines = []
    for scope, group in (("across methods (all trials pooled)", ALL), ("within a method (mean of the methods' ρ)",
                                                                       MEAN_WITHIN)):
        tracking, against, unclear = [], [], []
        for metric in CANDIDATES:
            estimate = result.rho.get((metric, "knn_acc", group))
            if estimate is None or not math.isfinite(estimate.value):
                continue
            entry = f"{metric} ({estimate.value:+.2f})"
            if estimate.low > 0:
                tracking.append(entry)
            elif estimate.high < 0:
                against.append(entry)
            else:
                unclear.append(entry)
        lines.append(f"- {scope}: tracks kNN (interval above 0): {', '.join(tracking) or 'none'}; "
                     f"runs against it (interval below 0): {', '.join(against) or 'none'}; "
                     f"not distinguishable from no relation: {', '.join(unclear) or 'none'}.")
    finite = [(metric, est) for (metric, group), (est, _) in result.regret.items()
              if group == ALL and math.isfinite(est.value)]
    if finite:
        metric, est = min(finite, key=lambda item: item[1].value)
        baseline = result.random[ALL]
        lines.append(f"- selection across methods: {metric} picks the trial closest to the best "
                     f"(regret {est.value:.1f} points); a random pick costs {baseline.value:.1f} points on average.")
    return lines


def markdown(result: Validation, design: Mapping[str, Any], figure: str | None) -> str:
    trials = result.trials
    confidence = int(round(100 * float(design.get("confidence", 0.95))))
    knn = trials["knn_acc"]
    lines = [f"# {design.get('title', 'Label-free metrics validated against labels')}", ""]
    lines += [f"Scale {design.get('scale')}: {design.get('scale_description', '')}.", "",
              f"{len(trials)} trials ({', '.join(f'{m} {int((trials.method == m).sum())}' for m in result.methods)})"
              f", each the preset with its learning rate scaled by one of "
              f"{', '.join(f'{f:g}' for f in design.get('lr_factors', []))}; {design.get('epochs')} epochs. "
              f"Final kNN accuracy {knn.min():.3f} to {knn.max():.3f} (chance {CHANCE:.2f}); the label-free metrics "
              f"are measured on {design.get('label_free_samples')} SSL training images held out of training.", "",
              f"ρ: Spearman's rank correlation, oriented (+ means the value the metric prefers goes with higher "
              f"accuracy), with a {confidence}% percentile bootstrap over trials ({design.get('n_resamples')} "
              f"resamples, paired; '{MEAN_WITHIN}' resamples each method's trials on their own). ssl_loss is "
              f"compared within a method only (each method's loss has its own scale). '—': fewer than "
              f"{MIN_TRIALS} trials.", ""]
    if design.get("unfinished"):
        lines += [f"{design['unfinished']} more trials did not finish (interrupted, diverged or failed) and are left "
                  "out; `csl-search resume <study folder>/grid` continues an interrupted search, then `--report`.", ""]
    lines += ["## Findings", "", *findings(result), ""]
    groups = [ALL, *result.methods, MEAN_WITHIN]
    for accuracy, title in (("knn_acc", "kNN accuracy"), ("probe_acc", "linear (online probe) accuracy")):
        lines += [f"## Spearman's ρ with final {title}", ""]
        rows = [[metric, *(result.rho.get((metric, accuracy, g), Estimate(math.nan)).text() for g in groups)]
                for metric in CANDIDATES]
        lines += _table(["metric", *groups], rows) + [""]
    lines += ["## Selection regret (kNN points)", "",
              "Best kNN accuracy minus that of the trial each metric would pick (its preferred extreme), in points "
              "(100 × fraction), over all trials and within each method (tuning the learning rate of one method).",
              ""]
    header = ["metric", f"{ALL}: regret", f"{ALL}: picks", *(f"{m}: regret" for m in result.methods)]
    rows = []
    for metric in CANDIDATES:
        overall = result.regret.get((metric, ALL))
        picked = "—" if overall is None or overall[1] is None else _label(trials, overall[1])
        rows.append([metric, overall[0].text(1) if overall else "—", picked,
                     *(result.regret[(metric, m)][0].text(1) for m in result.methods)])
    rows.append(["(random pick: best - mean)", result.random[ALL].text(1), "—",
                 *(result.random[m].text(1) for m in result.methods)])
    lines += _table(header, rows) + ["", f"Best trial: {_label(trials, knn.idxmax())}, kNN {knn.max():.4f}.", ""]
    if figure:
        lines += ["## Metric against kNN accuracy", "", f"![label-free metrics against kNN]({figure})", ""]
    lines += ["## Trials", ""]
    columns = ["method", "lr", "seed", "knn_acc", "probe_acc", *CANDIDATES]
    ordered = trials.sort_values(["method", "lr", "seed"])
    lines += _table(columns, [[str(r["method"]), f"{r['lr']:.3g}", str(r["seed"]), *(f"{r[c]:.4f}" for c in
                                                                                      columns[3:])]
                              for _, r in ordered.iterrows()])
    return "\n".join(lines) + "\n"


def scatter(result: Validation, path: Path) -> Path:
    """One panel per candidate metric: its final value against final kNN accuracy, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 3
    rows = math.ceil(len(CANDIDATES) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, CANDIDATES, strict=False):
        for method in result.methods:
            part = result.trials[result.trials["method"] == method]
            ax.scatter(part[metric], part["knn_acc"], label=method, s=22)
        shown = [f"{scope} {rho.value:+.2f}" for scope, rho in (
            ("all", result.rho.get((metric, "knn_acc", ALL))), ("within", result.rho[(metric, "knn_acc", MEAN_WITHIN)]))
            if rho is not None and math.isfinite(rho.value)]
        ax.set_title(f"{metric}: oriented ρ {', '.join(shown) or '—'}", fontsize=9)
        ax.set_xlabel(f"{metric} ({METRICS[metric].mode} is better)", fontsize=8)
        ax.set_ylabel(f"kNN accuracy (chance {CHANCE:.2f})", fontsize=8)
    for ax in list(axes.flat)[len(CANDIDATES):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(trials: pd.DataFrame, design: Mapping[str, Any], folder: Path, *, n_resamples: int = 10_000,
                 seed: int = 0) -> tuple[Path, Validation]:
    """``folder/report.md`` and ``folder/label_free_vs_knn.png``; returns the Markdown's path and the figures."""
    result = validate(trials, n_resamples=n_resamples, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    figure = scatter(result, folder / "label_free_vs_knn.png")
    path = folder / "report.md"
    path.write_text(markdown(result, {**design, "n_resamples": n_resamples}, figure.name), encoding="utf-8")
    return path, result
