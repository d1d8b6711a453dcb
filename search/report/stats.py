"""The statistics of a report: bootstrap intervals, per-value summaries (cells, marginals) and the early-stopping
check's rank correlation. scipy.stats does the work (``bootstrap``, ``spearmanr``); this module fixes the
conventions every report shares.

Pure numpy / pandas / scipy (no Ray, no MLflow), so it is tested on constructed data with known answers.

- Intervals are percentile bootstraps (``scipy.stats.bootstrap(method="percentile")``), ``DEFAULT_RESAMPLES``
  resamples unless a caller says otherwise, drawn from a ``numpy.random.Generator`` seeded from (seed, key), so a
  report is reproducible. Fewer than two finite values give no interval (``nan``).
- Spearman's rank correlation (average ranks for ties, ``scipy.stats.spearmanr``) drops pairs with a NaN and is
  ``nan`` when fewer than two pairs remain or one side is constant.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

DEFAULT_RESAMPLES = 10_000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_SEED = 0
LOW_RANK_CORRELATION = 0.5


# ------------------------------------------------------------------------------------------------ bootstrap


def finite_values(values: Iterable[float]) -> np.ndarray:
    array = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float).ravel()
    return array[np.isfinite(array)]


def rng_for(seed: int, *key: Any) -> np.random.Generator:
    """A generator for (seed, key): stable across processes (crc32, not Python's salted hash)."""
    words = [int(seed)] + [zlib.crc32(str(k).encode()) for k in key]
    return np.random.default_rng(np.random.SeedSequence(words))


def _check(n_resamples: int, confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")


def percentile_bootstrap(samples: Sequence[np.ndarray], statistic: Callable[..., Any], *, n_resamples: int,
                         confidence: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of ``statistic`` over independent resamples of each of ``samples`` (a stratified bootstrap when
    there are several): ``scipy.stats.bootstrap`` with the percentile method. ``statistic(*samples, axis=-1)``
    may return one value or a vector of them (one interval each)."""
    _check(n_resamples, confidence)
    result = stats.bootstrap(tuple(samples), statistic, n_resamples=int(n_resamples), confidence_level=confidence,
                             method="percentile", vectorized=True, paired=False, rng=rng)
    return np.asarray(result.confidence_interval.low, dtype=float), np.asarray(result.confidence_interval.high,
                                                                                dtype=float)


def bootstrap_ci(
    values: Iterable[float],
    statistic: Callable[..., Any] = np.mean,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values`` (non-finite values dropped).

    ``statistic`` is called as ``statistic(samples, axis=-1)``. Fewer than two values give ``(nan, nan)``.
    """
    _check(n_resamples, confidence)
    data = finite_values(values)
    if data.size < 2:
        return (math.nan, math.nan)
    low, high = percentile_bootstrap([data], statistic, n_resamples=n_resamples, confidence=confidence,
                                     rng=rng_for(seed))
    return (float(low), float(high))


# ------------------------------------------------------------------------------------------------ cells


def cell_table(
    frame: pd.DataFrame,
    *,
    by: Sequence[str],
    value: str = "value",
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> pd.DataFrame:
    """One row per cell (``by`` columns): seeds with a value, mean, std, bootstrap interval of the mean, failed.

    ``failed`` counts rows of the cell whose value is missing or not finite (a failed or diverged run).
    """
    rows = []
    for key, group in frame.groupby(list(by), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        values = finite_values(group[value].to_numpy(dtype=float))
        low, high = bootstrap_ci(values, n_resamples=n_resamples, confidence=confidence, seed=seed)
        rows.append({
            **dict(zip(by, key, strict=True)),
            "seeds": int(values.size),
            "mean": float(values.mean()) if values.size else math.nan,
            "std": float(values.std(ddof=1)) if values.size > 1 else math.nan,
            "ci_low": low,
            "ci_high": high,
            "failed": int(len(group) - values.size),
        })
    return pd.DataFrame(rows, columns=[*by, "seeds", "mean", "std", "ci_low", "ci_high", "failed"])


def marginal_table(frame: pd.DataFrame, key: str, *, value: str = "value", n_resamples: int = DEFAULT_RESAMPLES,
                   confidence: float = DEFAULT_CONFIDENCE, seed: int = DEFAULT_SEED) -> pd.DataFrame:
    """Mean of ``value`` per value of ``key`` over every run that has it, with a bootstrap interval over runs."""
    return cell_table(frame, by=[key], value=value, n_resamples=n_resamples, confidence=confidence, seed=seed)


# ------------------------------------------------------------------------------------------------ rank correlation


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (``scipy.stats.spearmanr``, average ranks for ties). Pairs with a NaN are
    dropped; ``nan`` when fewer than two pairs remain or either side is constant."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.size != b.size:
        raise ValueError(f"x and y differ in length: {a.size} != {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(a, b).statistic)


def grace_vs_final(history: pd.DataFrame, grace_period: int, *, trial: str = "trial", epoch: str = "epoch",
                   value: str = "value") -> pd.DataFrame:
    """Per trial: its metric at the grace period (the last epoch <= grace_period) and at its last epoch.

    Only trials that ran past the grace period are kept: for the others both values are the same number and
    say nothing about whether stopping there was right.
    """
    rows = []
    clean = history[np.isfinite(history[value].astype(float))]
    for name, group in clean.groupby(trial, sort=True):
        group = group.sort_values(epoch)
        early = group[group[epoch] <= grace_period]
        last = group.iloc[-1]
        if early.empty or int(last[epoch]) <= grace_period:
            continue
        rows.append({trial: name, "at_grace": float(early.iloc[-1][value]), "grace_epoch": int(early.iloc[-1][epoch]),
                     "final": float(last[value]), "final_epoch": int(last[epoch])})
    return pd.DataFrame(rows, columns=[trial, "at_grace", "grace_epoch", "final", "final_epoch"])


@dataclass
class EarlyStoppingCheck:
    """Does the ranking at the grace period (what ASHA judges on) predict the ranking at the last epoch?"""

    grace_period: int
    trials: int
    rho: float
    threshold: float
    pairs: pd.DataFrame

    @property
    def low(self) -> bool:
        return not math.isfinite(self.rho) or self.rho < self.threshold

    def text(self) -> str:
        if self.trials < 3 or not math.isfinite(self.rho):
            return (f"not measurable: {self.trials} trial(s) ran past the grace period (epoch {self.grace_period}), "
                    "and a rank correlation needs at least 3 whose values are not all tied")
        line = (f"Spearman rank correlation between the metric at epoch {self.grace_period} (grace period) and at "
                f"the last epoch: rho = {self.rho:.3f} over {self.trials} trials")
        if self.low:
            line += (f". WARNING: rho < {self.threshold}: the ranking at the grace period does not predict the final "
                     "ranking; ASHA may prune slow starters (methods that start slow and overtake, such as "
                     "SimSiam/NNCLR): raise the grace period or use a FIFO scheduler")
        return line


def early_stopping_check(history: pd.DataFrame, grace_period: int, *, threshold: float = LOW_RANK_CORRELATION,
                         trial: str = "trial", epoch: str = "epoch", value: str = "value") -> EarlyStoppingCheck:
    pairs = grace_vs_final(history, grace_period, trial=trial, epoch=epoch, value=value)
    rho = spearman(pairs["at_grace"], pairs["final"]) if len(pairs) >= 2 else math.nan
    return EarlyStoppingCheck(int(grace_period), len(pairs), rho, threshold, pairs)
