"""Tiny configurations shared by the framework tests: small enough for a 2-core CPU, large enough to be real."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

TINY: dict[str, Any] = {
    "width": 1 / 16,
    "proj_dim": 16,
    "proj_hidden": 32,
    "pred_hidden": 32,
    "batch_size": 16,
    "train_limit": 64,
    "test_limit": 32,
    "epochs": 1,
    "warmup_epochs": 0,
    "device": "cpu",
    "ndf": 64,
    "n_rkhs": 128,
    "n_depth": 1,
    "queue_size": 64,
    "context_hidden": 32,
}


def tiny(**overrides: Any) -> dict[str, Any]:
    return {**TINY, **overrides}


def random_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="session")
def cifar_mini() -> tuple[Any, Any]:
    """The embedded data, decoded once per test session and cut to the tiny sizes."""
    from csl.data import load

    return load("cifar10-mini", split="train", limit=TINY["train_limit"]), load("cifar10-mini", split="test",
                                                                               limit=TINY["test_limit"])


# ------------------------------------------------------------------------------------------------ reading reports


def md_tables(markdown: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every Markdown table of a report: (header cells, rows of cells)."""
    found, block = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif block:
            found.append((block[0], block[2:]))
            block = []
    return found


def table_with(markdown: str, *header: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table whose header starts with ``header``, as {header cell: cell}."""
    for head, rows in md_tables(markdown):
        if head[: len(header)] == list(header):
            return [dict(zip(head, row, strict=True)) for row in rows]
    raise AssertionError(f"no table with header {header} in the report")


# ------------------------------------------------------------------------------------------------ "best", transcribed
# The rule of search.best, read plainly: a trial's best epoch is the epoch of its best finite value (max or min), the
# earliest of equal ones; trials rank by best value, then the earlier best epoch, then trial id; trials without a
# finite value come last, by trial id.


def transcribed_best(history: dict[int, float], mode: str) -> tuple[int, float] | None:
    finite = {e: v for e, v in history.items() if v is not None and math.isfinite(v)}
    if not finite:
        return None
    top = max(finite.values()) if mode == "max" else min(finite.values())
    return min(e for e, v in finite.items() if v == top), top


def transcribed_order(histories: dict[str, dict[int, float]], mode: str) -> list[str]:
    scored, unscored = [], []
    for trial, history in histories.items():
        found = transcribed_best(history, mode)
        if found is None:
            unscored.append(trial)
        else:
            epoch, value = found
            scored.append((-value if mode == "max" else value, epoch, trial))
    return [t for *_, t in sorted(scored)] + sorted(unscored)
