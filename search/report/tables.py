"""Markdown text of the report: numbers, intervals, metric names and tables.

One formatter for every cell, so a value reads the same in every table (4 decimals, "—" for no value) and the
tests can parse the tables back against MLflow to that precision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from csl.metrics import METRICS


def metric_label(metric: str) -> str:
    """The metric's name with its unit (the last parenthesis of its description in ``csl.metrics``), for axis
    labels and prose, e.g. ``knn_acc (fraction)``; an unknown metric as it is."""
    known = METRICS.get(metric)
    if known is None or not known.description.endswith(")"):
        return metric
    return f"{metric} ({known.description.rsplit('(', 1)[1]}"


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, (float, np.floating)):
        return "—" if not math.isfinite(float(value)) else f"{float(value):.{digits}f}"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value).replace("|", "\\|") or "—"


def ci(low: Any, high: Any) -> str:
    if low is None or high is None or not (math.isfinite(float(low)) and math.isfinite(float(high))):
        return "—"
    return f"[{float(low):.4f}, {float(high):.4f}]"


def md_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table; ``columns`` = (key, header). A key ``a|b`` renders the interval [a, b]."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        cells = []
        for key, _ in columns:
            if "|" in key:
                low, high = key.split("|")
                cells.append(ci(row.get(low), row.get(high)))
            else:
                cells.append(fmt(row.get(key)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
