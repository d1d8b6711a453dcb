"""The running "best epoch" rule, the one piece of ``search.best`` that training itself needs.

``csl train --checkpoint`` keeps the best epoch beside the latest, and a search's trials report which epoch a kept
best checkpoint holds; both follow the rule here, which ``search.best`` re-exports and builds its ranking on (imports
point down: ``csl`` cannot import ``search``). An epoch becomes the best only when its value is finite and strictly
better than the best so far, so of equal values the earliest epoch stays best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MODES: tuple[str, ...] = ("max", "min")


@dataclass(frozen=True)
class Best:
    """A trial's best epoch and its value; both None for a trial without a finite value."""

    epoch: int | None = None
    value: float | None = None

    @property
    def found(self) -> bool:
        return self.value is not None


NONE = Best()


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}'; choose one of: {', '.join(MODES)}")


def finite(value: Any) -> bool:
    """A number that can be best: not a bool, not None, not NaN or infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def better(a: float, b: float, mode: str) -> bool:
    """Whether value ``a`` is strictly better than ``b`` under ``mode``."""
    check_mode(mode)
    return a > b if mode == "max" else a < b


def improves(best: Best, value: Any, mode: str) -> bool:
    """Whether an epoch's ``value``, reported after the epochs that gave ``best``, becomes the new best.

    Strictly better only: an equal value keeps the earlier epoch. A best checkpoint is kept exactly when this holds.
    """
    return finite(value) and (not best.found or better(float(value), float(best.value), mode))


def update(best: Best, epoch: int, value: Any, mode: str) -> Best:
    """``best`` after one more epoch (epochs arrive in order)."""
    return Best(int(epoch), float(value)) if improves(best, value, mode) else best
