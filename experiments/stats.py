"""Statistics of the robustness studies: robustness scores over conditions with stratified bootstrap intervals,
and ranking with ties. The general pieces (bootstrap intervals, cells, Spearman, the early-stopping check) are
``search.report.stats``, which every report shares.

Vocabulary of the studies:

- a *combination* is what is being judged (a method preset, or a combination found by a search);
- a *condition* is what it must be robust to (an encoder, an extraction strategy, or an encoder × extraction pair);
- a *cell* is one combination under one condition; it holds one value per *seed*: the run's ``final`` value, its
  metric at its last epoch (the model the fixed budget produced, the same epoch for every run; not its best epoch,
  which would be chosen on the evaluation split).

Robustness of a combination is summarised over its conditions from the per-condition means:

- ``mean``  the average over conditions (how good it is on a typical choice);
- ``worst`` the minimum over conditions (how good it is whatever the user picks) - the default ranking score;
- ``spread`` max - min over conditions (how much the choice of condition can cost).

Intervals are percentile bootstraps over seeds, stratified by condition (``scipy.stats.bootstrap`` with one sample
per condition, resampled independently): each resample redraws, within every condition, as many seeds as it has
(with replacement), recomputes the per-condition means and the three scores. The generator is seeded, so a report
is reproducible. A winner is declared only when its interval lies entirely above the runner-up's; otherwise the
leaders whose intervals overlap the leader's are reported as tied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from search.report.stats import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    finite_values,
    percentile_bootstrap,
    rng_for,
)

MIN_SEEDS_FOR_WINNER = 3
"""Fewest seeds per cell for which a winner may be declared: a percentile bootstrap over two seeds spans just the
two observed values (and collapses to a point when they are equal), so it under-covers badly."""
SCORES = ("worst", "mean", "spread")
SCORE_DIRECTION = {"worst": "max", "mean": "max", "spread": "min"}
"""Which way is better for each robustness score when the metric itself is higher-is-better."""


# ------------------------------------------------------------------------------------------------ robustness


def _scores(*conditions: np.ndarray, axis: int = -1) -> np.ndarray:
    """(worst, mean, spread) - the order of ``SCORES`` - of per-condition means, for each resample at once."""
    means = np.stack([values.mean(axis=axis) for values in conditions])
    return np.stack([means.min(axis=0), means.mean(axis=0), means.max(axis=0) - means.min(axis=0)])


@dataclass
class Robustness:
    """Robustness scores of one combination over its conditions (see the module docstring)."""

    combination: str
    conditions: int
    min_seeds: int
    failed: int
    missing: list[str]
    scores: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    condition_means: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {"combination": self.combination, "conditions": self.conditions,
                               "min_seeds": self.min_seeds, "failed": self.failed,
                               "missing": ", ".join(self.missing)}
        for name in SCORES:
            out[name] = self.scores[name]
            out[f"{name}_low"], out[f"{name}_high"] = self.intervals[name]
        return out


def robustness_scores(
    per_condition: dict[str, Sequence[float]],
    *,
    combination: str = "",
    expected: Sequence[str] | None = None,
    failed: int = 0,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> Robustness:
    """Mean, worst and spread over conditions, each with a bootstrap interval stratified by condition.

    ``per_condition`` maps a condition to its seed values (non-finite dropped). ``expected`` lists the conditions
    the combination should have; those with no value are reported in ``missing``. Intervals are ``nan`` unless
    every present condition has at least two seeds (a one-seed condition would look certain).
    """
    cleaned = {c: finite_values(v) for c, v in per_condition.items()}
    present = {c: v for c, v in cleaned.items() if v.size}
    missing = [c for c in (expected or cleaned) if c not in present]
    nan2 = (math.nan, math.nan)
    if not present:
        return Robustness(combination, 0, 0, failed, missing, {s: math.nan for s in SCORES},
                          {s: nan2 for s in SCORES})
    means = np.array([v.mean() for v in present.values()])
    scores = {"mean": float(means.mean()), "worst": float(means.min()), "spread": float(means.max() - means.min())}
    min_seeds = int(min(v.size for v in present.values()))
    intervals = {s: nan2 for s in SCORES}
    if min_seeds >= 2:
        low, high = percentile_bootstrap(list(present.values()), _scores, n_resamples=n_resamples,
                                         confidence=confidence, rng=rng_for(seed, combination))
        intervals = {name: (float(low[i]), float(high[i])) for i, name in enumerate(SCORES)}
    return Robustness(combination, len(present), min_seeds, failed, missing, scores, intervals,
                      {c: float(v.mean()) for c, v in present.items()})


def robustness_table(
    frame: pd.DataFrame,
    *,
    combination: str,
    condition: str | Sequence[str],
    value: str = "value",
    applicable: dict[str, Sequence[str]] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> pd.DataFrame:
    """Robustness of every combination in ``frame`` (one row per run) over the ``condition`` column(s).

    ``applicable`` maps a combination to the conditions it can take (default: every condition seen in the
    frame); a condition it cannot take (a refused combination) is neither expected nor missing.
    """
    conditions = [condition] if isinstance(condition, str) else list(condition)
    frame = frame.copy()
    frame["_condition"] = frame[conditions].astype(str).agg(" / ".join, axis=1)
    every = sorted(frame["_condition"].unique())
    rows = []
    for name, group in frame.groupby(combination, sort=True):
        values = group[value].to_numpy(dtype=float)
        per = {c: g[value].to_numpy(dtype=float) for c, g in group.groupby("_condition", sort=True)}
        expected = list(applicable.get(name, every)) if applicable else every
        result = robustness_scores(
            per, combination=str(name), expected=expected, failed=int((~np.isfinite(values)).sum()),
            n_resamples=n_resamples, confidence=confidence, seed=seed,
        )
        rows.append(result.row())
    columns = ["combination", "conditions", "min_seeds", "failed", "missing"]
    columns += [c for s in SCORES for c in (s, f"{s}_low", f"{s}_high")]
    return pd.DataFrame(rows, columns=columns)


# ------------------------------------------------------------------------------------------------ ranking


@dataclass
class Verdict:
    """Outcome of a ranking: a declared winner, or the leaders that cannot be told apart."""

    score: str
    ranked: list[str]
    winner: str | None
    tied: list[str]
    reason: str

    def text(self) -> str:
        if self.winner is not None:
            return f"winner: **{self.winner}** ({self.reason})"
        if len(self.tied) == 1:
            return f"no winner declared ({self.reason}); leader on the point estimate: **{self.tied[0]}**"
        return f"no winner: {', '.join(f'**{t}**' for t in self.tied)} are tied ({self.reason})"


def rank(table: pd.DataFrame, *, score: str = "worst", higher_is_better: bool = True,
         name: str = "combination", min_seeds: int = MIN_SEEDS_FOR_WINNER) -> tuple[pd.DataFrame, Verdict]:
    """Sort ``table`` by ``score`` (complete combinations first, equal scores by the mean) and decide the winner.

    A combination is complete when it has a value for every condition it can take (``missing`` empty). The
    leader is a winner only when its interval and the runner-up's are both known and separate (leader's low
    above the runner-up's high, for a higher-is-better score) and both rest on at least ``min_seeds`` seeds per
    cell (column ``min_seeds`` when present); otherwise every combination whose interval overlaps the leader's
    (or that has no interval) is tied with it.
    """
    sign = -1.0 if higher_is_better else 1.0
    table = table.copy()
    missing = table["missing"].fillna("").astype(str) if "missing" in table else pd.Series("", index=table.index)
    table["complete"] = missing.eq("")
    key = table[score].astype(float).map(lambda v: sign * v if math.isfinite(v) else math.inf)
    # Equal scores (accuracies are multiples of 1/test-set size) are ordered by the mean, then by name.
    second = "mean" if score != "mean" and "mean" in table else score
    key2 = table[second].astype(float).map(lambda v: -v if math.isfinite(v) else math.inf)
    table = table.assign(_key=key, _key2=key2, _incomplete=~table["complete"])
    table = table.sort_values(["_incomplete", "_key", "_key2", name])
    table = table.drop(columns=["_key", "_key2", "_incomplete"]).reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    names = [str(n) for n in table[name]]
    if len(table) == 0:
        return table, Verdict(score, [], None, [], "nothing to rank")
    if len(table) == 1:
        return table, Verdict(score, names, names[0], [names[0]], "the only combination")
    low, high = f"{score}_low", f"{score}_high"

    def interval(i: int) -> tuple[float, float]:
        return float(table.loc[i, low]), float(table.loc[i, high])

    def separates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        if not all(math.isfinite(x) for x in (*a, *b)):
            return False
        return a[0] > b[1] if higher_is_better else a[1] < b[0]

    def seeds(i: int) -> float:
        return float(table.loc[i, "min_seeds"]) if "min_seeds" in table else math.inf

    lead, runner = interval(0), interval(1)
    enough = min(seeds(0), seeds(1)) >= min_seeds
    if separates(lead, runner) and bool(table.loc[0, "complete"]) and enough:
        reason = (f"its {score} interval [{lead[0]:.4f}, {lead[1]:.4f}] lies "
                  f"{'above' if higher_is_better else 'below'} the runner-up {names[1]}'s "
                  f"[{runner[0]:.4f}, {runner[1]:.4f}]")
        return table, Verdict(score, names, names[0], [names[0]], reason)
    tied = [names[0]] + [names[i] for i in range(1, len(table)) if not separates(lead, interval(i))]
    if not all(math.isfinite(x) for x in lead):
        reason = f"the leader {names[0]} has no {score} interval (a cell with fewer than 2 seeds)"
    elif not bool(table.loc[0, "complete"]):
        reason = f"the leader {names[0]} is missing conditions"
    elif separates(lead, runner) and not enough:
        reason = (f"cells have {int(min(seeds(0), seeds(1)))} seeds, fewer than the {min_seeds} needed before a "
                  "percentile-bootstrap interval is trusted to separate two combinations")
    else:
        reason = (f"their {score} intervals overlap the leader's [{lead[0]:.4f}, {lead[1]:.4f}]; "
                  "more seeds would be needed to separate them")
    return table, Verdict(score, names, None, tied, reason)
