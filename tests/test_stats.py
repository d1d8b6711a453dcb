"""The report's statistics (``search.report.stats``) and the studies' robustness ranking (``experiments.stats``) on
constructed data whose answer is known (fast: no training, no Ray, no MLflow)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from experiments.stats import rank, robustness_scores, robustness_table
from search.report.stats import bootstrap_ci, cell_table, early_stopping_check, grace_vs_final, spearman

ENCODERS = ["resnet18", "resnet50", "wide_resnet"]


def runs(per_encoder: dict[str, dict[str, list[float]]]) -> pd.DataFrame:
    """One row per run: combination, encoder, seed, value."""
    rows = []
    for combination, cells in per_encoder.items():
        for encoder, values in cells.items():
            rows += [{"combination": combination, "encoder": encoder, "seed": s, "value": v}
                     for s, v in enumerate(values)]
    return pd.DataFrame(rows)


def noisy(center: float, n: int, seed: int, sd: float = 0.005) -> list[float]:
    return list(center + np.random.default_rng(seed).normal(0, sd, n))


# ------------------------------------------------------------------------------------------------ ranking


def test_a_clearly_robust_combination_is_ranked_first_and_declared_winner():
    # robust: 0.60 on every encoder. peaky: best mean cell (0.80) but 0.20 on one encoder. flat_low: 0.40 everywhere.
    frame = runs({
        "robust": {e: noisy(0.60, 4, i) for i, e in enumerate(ENCODERS)},
        "peaky": {"resnet18": noisy(0.80, 4, 10), "resnet50": noisy(0.75, 4, 11), "wide_resnet": noisy(0.20, 4, 12)},
        "flat_low": {e: noisy(0.40, 4, 20 + i) for i, e in enumerate(ENCODERS)},
    })
    table = robustness_table(frame, combination="combination", condition="encoder", n_resamples=2000)
    ranked, verdict = rank(table, score="worst")
    assert list(ranked["combination"]) == ["robust", "flat_low", "peaky"]
    assert verdict.winner == "robust"
    assert "above" in verdict.text()
    row = ranked.set_index("combination").loc["peaky"]
    assert row["worst"] == pytest.approx(0.20, abs=0.01)
    assert row["mean"] == pytest.approx(0.583, abs=0.01)
    assert row["spread"] == pytest.approx(0.60, abs=0.01)
    # ranked by spread alone the flat combinations come first, and peaky last
    by_spread, _ = rank(table, score="spread", higher_is_better=False)
    assert by_spread["combination"].iloc[-1] == "peaky"


def test_overlapping_intervals_are_reported_as_tied():
    frame = runs({
        "a": {e: noisy(0.50, 5, i, sd=0.05) for i, e in enumerate(ENCODERS)},
        "b": {e: noisy(0.51, 5, 10 + i, sd=0.05) for i, e in enumerate(ENCODERS)},
        "c": {e: noisy(0.10, 5, 20 + i, sd=0.01) for i, e in enumerate(ENCODERS)},
    })
    table = robustness_table(frame, combination="combination", condition="encoder", n_resamples=2000)
    ranked, verdict = rank(table, score="worst")
    assert verdict.winner is None
    assert sorted(verdict.tied) == ["a", "b"]  # c is far below: not tied
    assert "tied" in verdict.text()
    a, b = ranked.set_index("combination").loc[["a", "b"], ["worst_low", "worst_high"]].to_numpy()
    assert a[0] <= b[1] and b[0] <= a[1]  # the intervals overlap


def test_no_winner_without_intervals_or_with_missing_conditions():
    one_seed = runs({"a": {e: [0.9] for e in ENCODERS}, "b": {e: [0.1] for e in ENCODERS}})
    table = robustness_table(one_seed, combination="combination", condition="encoder", n_resamples=200)
    _, verdict = rank(table)
    assert verdict.winner is None and "fewer than 2 seeds" in verdict.reason
    # "a" never ran on wide_resnet although it could: it is ranked after the complete ones and never wins
    frame = runs({
        "a": {"resnet18": noisy(0.9, 3, 1), "resnet50": noisy(0.9, 3, 2)},
        "b": {e: noisy(0.5, 3, 3 + i) for i, e in enumerate(ENCODERS)},
    })
    table = robustness_table(frame, combination="combination", condition="encoder", n_resamples=500)
    ranked, verdict = rank(table)
    assert list(ranked["combination"]) == ["b", "a"]
    assert ranked.set_index("combination").loc["a", "missing"] == "wide_resnet"
    # ... unless it cannot take that condition (a refused combination): then it is complete
    table = robustness_table(frame, combination="combination", condition="encoder", n_resamples=500,
                             applicable={"a": ["resnet18", "resnet50"], "b": ENCODERS})
    ranked, verdict = rank(table)
    assert ranked["combination"].iloc[0] == "a" and verdict.winner == "a"


def test_two_seeds_never_declare_a_winner_even_when_intervals_separate():
    frame = runs({"a": {e: [0.80, 0.81] for e in ENCODERS}, "b": {e: [0.20, 0.21] for e in ENCODERS}})
    table = robustness_table(frame, combination="combination", condition="encoder", n_resamples=500)
    ranked, verdict = rank(table)
    assert list(ranked["combination"]) == ["a", "b"]
    assert verdict.winner is None and verdict.tied == ["a"]
    assert "fewer than the 3 needed" in verdict.reason and "leader on the point estimate: **a**" in verdict.text()
    assert rank(table, min_seeds=2)[1].winner == "a"


def test_robustness_scores_hand_computed():
    result = robustness_scores({"x": [0.2, 0.4], "y": [0.6, 0.8], "z": [0.5, 0.5]}, n_resamples=4000)
    assert result.scores["mean"] == pytest.approx((0.3 + 0.7 + 0.5) / 3)
    assert result.scores["worst"] == pytest.approx(0.3)
    assert result.scores["spread"] == pytest.approx(0.4)
    low, high = result.intervals["worst"]
    # the worst condition is x (0.2 or 0.4 per seed): its resampled mean lies in [0.2, 0.4]
    assert 0.2 - 1e-12 <= low <= 0.3 <= high <= 0.4 + 1e-12
    assert result.min_seeds == 2 and result.conditions == 3


# ------------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_seeds():
    # the same five values, then each repeated 16 times: same spread, 16× the seeds -> about 1/4 of the width
    few = np.array([0.42, 0.47, 0.50, 0.53, 0.58])
    many = np.tile(few, 16)
    lo_few, hi_few = bootstrap_ci(few, n_resamples=5000, seed=1)
    lo_many, hi_many = bootstrap_ci(many, n_resamples=5000, seed=1)
    assert lo_few <= few.mean() <= hi_few
    assert lo_many <= many.mean() <= hi_many
    assert (hi_many - lo_many) < 0.5 * (hi_few - lo_few)
    # reproducible: same seed, same interval; a wider confidence gives a wider interval
    assert bootstrap_ci(few, n_resamples=5000, seed=1) == (lo_few, hi_few)
    lo99, hi99 = bootstrap_ci(few, n_resamples=5000, seed=1, confidence=0.99)
    assert lo99 <= lo_few and hi99 >= hi_few
    # two values: the mean of a resample is a, b or (a+b)/2, so the 95% interval is [a, b]
    assert bootstrap_ci([0.2, 0.4], n_resamples=4000) == pytest.approx((0.2, 0.4))
    assert all(math.isnan(x) for x in bootstrap_ci([0.3]))


def test_cell_table_counts_seeds_and_failures():
    frame = pd.DataFrame({
        "method": ["m", "m", "m", "n", "n"], "encoder": ["e"] * 5, "value": [0.1, 0.3, np.nan, 0.5, 0.7],
    })
    table = cell_table(frame, by=["method", "encoder"], n_resamples=500).set_index("method")
    assert table.loc["m", "seeds"] == 2 and table.loc["m", "failed"] == 1
    assert table.loc["m", "mean"] == pytest.approx(0.2)
    assert table.loc["n", "std"] == pytest.approx(math.sqrt(0.02))


# ------------------------------------------------------------------------------------------------ rank correlation


def test_spearman_hand_computed():
    # no ties: d = (1,-1,1,-1,0), sum d^2 = 4, rho = 1 - 6*4 / (5*(25-1)) = 0.8
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # ties: ranks x = (1, 2.5, 2.5, 4), y = (1, 3, 2, 4); centred dx = (-1.5, 0, 0, 1.5), dy = (-1.5, .5, -.5, 1.5)
    # sum dx*dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5  ->  rho = 4.5 / sqrt(22.5) = sqrt(0.9)
    assert spearman([0.1, 0.2, 0.2, 0.3], [0.3, 0.5, 0.4, 0.9]) == pytest.approx(math.sqrt(0.9))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)  # monotone, not linear
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # constant side: undefined
    assert spearman([1, 2, np.nan, 3], [1, 2, 5, 3]) == pytest.approx(1.0)  # NaN pair dropped


def test_early_stopping_check_on_a_constructed_history():
    # Five trials over 3 epochs, grace period 1. Values at epoch 1: (0.10, 0.20, 0.20, 0.30, 0.40);
    # at epoch 3: (0.50, 0.30, 0.40, 0.45, 0.60). Ranks at grace (1, 2.5, 2.5, 4, 5); final (4, 1, 2, 3, 5).
    # dx = (-2, -.5, -.5, 1, 2), dy = (1, -2, -1, 0, 2): sum dx dy = -2+1+.5+0+4 = 3.5, sum dx^2 = 9.5, sum dy^2 = 10
    # rho = 3.5 / sqrt(95) = 0.35909...; a sixth trial stopped at epoch 1 is left out (it says nothing).
    grace = {"t1": 0.10, "t2": 0.20, "t3": 0.20, "t4": 0.30, "t5": 0.40}
    final = {"t1": 0.50, "t2": 0.30, "t3": 0.40, "t4": 0.45, "t5": 0.60}
    rows = []
    for t in grace:
        rows += [{"trial": t, "epoch": 1, "value": grace[t]}, {"trial": t, "epoch": 2, "value": 0.0},
                 {"trial": t, "epoch": 3, "value": final[t]}]
    rows.append({"trial": "t6", "epoch": 1, "value": 0.99})
    history = pd.DataFrame(rows)
    pairs = grace_vs_final(history, 1)
    assert list(pairs["trial"]) == ["t1", "t2", "t3", "t4", "t5"]
    check = early_stopping_check(history, 1)
    assert check.trials == 5
    assert check.rho == pytest.approx(3.5 / math.sqrt(95))
    assert check.low and "WARNING" in check.text()
    # a history whose early ranking holds: no warning
    steady = history.assign(value=lambda f: f["value"] + 0.0)
    steady.loc[steady["epoch"] == 3, "value"] = steady.loc[steady["epoch"] == 3, "trial"].map(
        {t: grace[t] + 0.3 + 0.01 * i for i, t in enumerate(grace)})
    good = early_stopping_check(steady, 1)
    assert good.rho > 0.9 and not good.low and "WARNING" not in good.text()
    # nothing past the grace period: not measurable
    assert "not measurable" in early_stopping_check(history[history["epoch"] == 1], 1).text()
