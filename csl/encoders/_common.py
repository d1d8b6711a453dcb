"""Helpers shared by the encoder builders: channel scaling and option checks."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from csl.registry import ChoiceError


def scaled(channels: float, width: float) -> int:
    """``channels * width`` rounded half-up to an int, at least 1."""
    return max(1, math.floor(channels * width + 0.5))


def check_positive(name: str, option: str, value: float) -> float:
    """A positive finite number (``width``, ``widen``), else ChoiceError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ChoiceError(f"encoder '{name}': {option} must be a positive number, got {value!r}")
    return float(value)


def check_choice(name: str, option: str, value: Any, allowed: Iterable[Any]) -> Any:
    allowed = list(allowed)
    if value not in allowed:
        raise ChoiceError(
            f"encoder '{name}': {option}={value!r} is not supported; choose one of: {', '.join(map(str, allowed))}"
        )
    return value
