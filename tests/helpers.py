"""Tiny configurations shared by the framework tests: small enough for a 2-core CPU, large enough to be real."""

from __future__ import annotations

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
