"""Predicates on the plain values a space file holds, shared by the model and the checks.

YAML gives None, bool, int, float and str; ``True == 1`` in Python, so equality and type checks here tell bools
from ints, and the type descriptions are the words the error messages use.
"""

from __future__ import annotations

import math
from typing import Any

_SCALARS = (type(None), bool, int, float, str)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _same(a: Any, b: Any) -> bool:
    """Equal, with True and 1 told apart."""
    return bool(a == b) and isinstance(a, bool) == isinstance(b, bool)


def _type_ok(value: Any, types: frozenset[type] | None) -> bool:
    if types is None or value is None:
        return True
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int):
        return int in types
    if isinstance(value, float):
        return float in types
    if isinstance(value, str):
        return str in types
    return False


def _describe_types(types: frozenset[type]) -> str:
    words = []
    if bool in types:
        words.append("a bool")
    if float in types:
        words.append("a number")
    elif int in types:
        words.append("an int")
    if str in types:
        words.append("a string")
    if type(None) in types:
        words.append("null")
    return " or ".join(words) or "a value of another type"


def _listing(values: Any) -> str:
    return ", ".join(str(v) for v in values) or "(none)"
