"""``search.best``, the one meaning of "best", against a plain transcription of its rule (``tests.helpers``)
(fast: no Ray, no MLflow)."""

from __future__ import annotations

import math
import random

import pytest

from search import best
from search.results import best_trial, ranked, score
from tests.helpers import transcribed_best, transcribed_order


def random_histories(rng: random.Random) -> dict[str, dict[int, float]]:
    """Trials with few distinct values (so ties of value and of epoch happen), NaN/inf epochs, empty trials."""
    histories = {}
    for i in range(rng.randint(1, 8)):
        epochs = rng.randint(0, 5)
        history = {}
        for epoch in range(1, epochs + 1):
            history[epoch] = rng.choice([0.1, 0.2, 0.3, 0.3, math.nan, math.inf, -math.inf])
        histories[f"t{rng.randint(0, 99):02d}{i}"] = history
    return histories


@pytest.mark.parametrize("mode", ["max", "min"])
def test_best_epoch_and_ranking_follow_the_transcribed_rule(mode: str) -> None:
    rng = random.Random(mode)
    for _ in range(300):
        histories = random_histories(rng)
        for history in histories.values():
            found = best.best_of(list(history.items())[::-1], mode)  # any order in
            expected = transcribed_best(history, mode)
            assert (found.epoch, found.value) == (expected if expected else (None, None))
        trials = {t: best.best_of(h.items(), mode) for t, h in histories.items()}
        order = best.ranked(list(trials), mode=mode, best=trials.__getitem__, trial_id=str)
        assert order == transcribed_order(histories, mode)


def test_ties_keep_the_earlier_epoch_then_the_trial_id() -> None:
    assert best.best_of([(3, 0.5), (1, 0.5), (2, 0.4)], "max") == best.Best(1, 0.5)
    assert best.best_of([(1, float("nan")), (2, 0.7)], "min") == best.Best(2, 0.7)
    assert best.best_of([], "max") == best.NONE and not best.NONE.found
    same = {"b": best.Best(2, 0.5), "a": best.Best(2, 0.5), "early": best.Best(1, 0.5), "none": best.NONE}
    assert best.ranked(list(same), mode="max", best=same.__getitem__, trial_id=str) == ["early", "a", "b", "none"]
    # a running trial: only a strictly better epoch replaces the best (what a kept best checkpoint follows)
    running = best.NONE
    for epoch, value in enumerate([0.3, 0.5, 0.5, float("nan"), 0.4], start=1):
        running = best.update(running, epoch, value, "max")
    assert running == best.Best(2, 0.5)
    assert not best.improves(running, 0.5, "max") and best.improves(running, 0.51, "max")
    with pytest.raises(ValueError, match="unknown mode 'best'; choose one of: max, min"):
        best.best_of([(1, 0.1)], "best")


def test_results_rows_are_scored_and_ranked_by_the_rule() -> None:
    """results.parquet's best_* / last_* columns and the table's order come from search.best."""
    history = [
        {"trial_id": "late", "epoch": 1, "knn_acc": 0.1, "ssl_loss": 5.0},
        {"trial_id": "late", "epoch": 2, "knn_acc": 0.4, "ssl_loss": 4.0},
        {"trial_id": "early", "epoch": 1, "knn_acc": 0.5, "ssl_loss": 6.0},
        {"trial_id": "early", "epoch": 2, "knn_acc": 0.2, "ssl_loss": 3.0},
        {"trial_id": "nan", "epoch": 1, "knn_acc": math.nan, "ssl_loss": math.nan},
    ]
    trials = [{"trial_id": t} for t in ("nan", "late", "early")]
    score(trials, history, metric="knn_acc", mode="max")
    rows = {r["trial_id"]: r for r in trials}
    # knn_acc at the best epoch (by knn_acc), and ssl_loss at that same epoch: "best_" names the epoch
    assert (rows["early"]["best_epoch"], rows["early"]["best_knn_acc"], rows["early"]["best_ssl_loss"]) == (1, 0.5, 6.0)
    assert (rows["early"]["last_knn_acc"], rows["late"]["best_epoch"]) == (0.2, 2)
    assert rows["nan"]["best_epoch"] is None and rows["nan"]["best_knn_acc"] is None
    assert [r["trial_id"] for r in ranked(trials, "knn_acc", "max")] == ["early", "late", "nan"]
    assert best_trial(trials, "knn_acc", "max") == best.BestTrial("knn_acc", "early", None, 1, 0.5)
    score(trials, history, metric="ssl_loss", mode="min")
    assert [r["trial_id"] for r in ranked(trials, "ssl_loss", "min")] == ["early", "late", "nan"]
    assert rows["late"]["best_epoch"] == 2 and rows["early"]["best_knn_acc"] == 0.2
