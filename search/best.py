"""What "best" means, written once: every command that names a best trial or a best epoch calls this module.

A trial's **best epoch** is the epoch whose value of the search metric is best by the search's mode (``max`` or
``min``), over its reported epochs with a finite value; of several epochs with that value, the earliest. Its **best
value** is that epoch's value. A trial without a finite value has no best epoch.

The **ranking** of trials: by best value (better first); equal best values by the earlier best epoch (the trial that
got there with less training), then by trial id (so every reader breaks the last tie the same way); trials without
a best value after all the others, by trial id.

Users: ``search.results`` (results.parquet's ``best_*`` columns and the table a search prints), ``search.compare``,
the search report (``search.report``), the parent run's ``csl.best_*`` tags and metric (``search.run``), and, for a
running trial, ``improves`` (the test a kept best checkpoint passes: the trainable's checkpoint score,
``search.trainable``, and ``csl train --checkpoint``, which is why the running rule lives in ``csl.best``). The
robustness studies score a run at its last epoch instead (the model the budget produced, the same epoch for every
run): they call that value ``final``, never best.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

# The running rule lives in csl (``csl train --checkpoint`` keeps a best epoch too); this module is its home for
# every reader in search.
from csl.best import NONE, Best, better, finite, improves, update  # noqa: F401 - re-exported
from csl.best import check_mode as _check

T = TypeVar("T")


def best_of(points: Iterable[tuple[int, Any]], mode: str) -> Best:
    """The best epoch of (epoch, value) pairs in any order (an epoch given twice: give its latest value only)."""
    _check(mode)
    best = NONE
    for epoch, value in sorted(((int(e), v) for e, v in points), key=lambda p: p[0]):
        best = update(best, epoch, value, mode)
    return best


def rank_key(best: Best, mode: str, trial_id: str) -> tuple:
    """The sort key of the ranking (module docstring): ascending = best first."""
    _check(mode)
    if not best.found:
        return (1, 0.0, 0, str(trial_id))
    sign = -1.0 if mode == "max" else 1.0
    return (0, sign * float(best.value), int(best.epoch if best.epoch is not None else 0), str(trial_id))


def ranked(items: Sequence[T], *, mode: str, best: Callable[[T], Best], trial_id: Callable[[T], str]) -> list[T]:
    """``items`` (trial rows, runs, ...) in the order of the ranking; ``best`` / ``trial_id`` read one item."""
    return sorted(items, key=lambda item: rank_key(best(item), mode, trial_id(item)))


@dataclass(frozen=True)
class BestTrial:
    """The search's best trial, as the parent run records it (``csl.best_*`` tags, ``best_<metric>`` metric)."""

    metric: str
    trial_id: str
    run_id: str | None
    epoch: int
    value: float
