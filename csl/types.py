"""The data that flows between aspects.

    images uint8 N×3×H×W on the device
      → augment(images, generator)       two views: N×3×S×S, or patch grids N×P×3×p×p (CPC)
      → encoder(view)                    Features: pooled vector and feature maps
      → extract.embed(features)          dict of embeddings (the part a momentum target copies)
      → extract.pairs(...)               list[Pairs]: anchors, candidates, which candidates are positives
      → similarity(anchors, candidates)  scores M×K
      → loss(scores, pairs)              scalar

Every stage sees only the output of the stage before, so any extraction composes with any similarity and loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Features:
    """What an encoder returns.

    vector: N×D, the pooled last layer (what evaluation uses).
    maps: feature maps from shallow to deep, each N×C×h×w; ``maps[-1]`` is the last layer's map.
    An encoder declares ``vector_dim`` and ``map_channels`` (one entry per map) when it is built, so heads are
    sized without dummy forward passes.
    """

    vector: Tensor
    maps: list[Tensor]


@dataclass
class Pairs:
    """One comparison: every anchor is scored against every candidate.

    anchors: M×d. candidates: K×d. The positives of each anchor are given one of two ways, exactly one of them:
    - positives: M×K bool, the candidates that are positives of each anchor (at least one per anchor); needed when
      an anchor has several (a global vector against every location of the same image);
    - positive_index: M int64, the column of each anchor's only positive. Single-positive comparisons (CPC, the
      two views of SimCLR, MoCo, BYOL) give this instead, so InfoNCE-type losses take a cross-entropy fast path
      and nothing builds an M×K mask (at CPC's sizes the mask path dominated the loss's memory and time); a loss
      that needs the mask asks ``positive_mask()``.
    exclude: M×K bool or None, candidates that are neither positive nor negative for that anchor (an anchor
    compared with itself in NT-Xent); losses mask them out, they never subtract them. A positive is never excluded.
    name: a label for the comparison (``"1:5"``, ``"k=2"``), used in logs.
    weight: this comparison's weight in the model's loss, ``sum(weight * loss(scores, pairs))`` over the
    extraction's comparisons. The extraction sets it as its reference combines its terms (a sum over steps or
    scales, a mean over directions): a mean where the reference sums would scale the effective learning rate.
    """

    anchors: Tensor
    candidates: Tensor
    positives: Tensor | None
    exclude: Tensor | None = None
    name: str = ""
    positive_index: Tensor | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if (self.positives is None) == (self.positive_index is None):
            raise ValueError("Pairs needs exactly one of positives (an M×K mask) and positive_index (M columns)")
        if self.positive_index is not None and self.positive_index.shape != self.anchors.shape[:1]:
            raise ValueError(f"positive_index must hold one column per anchor ({self.anchors.shape[0]}), "
                             f"got shape {tuple(self.positive_index.shape)}")

    def positive_mask(self) -> Tensor:
        """The M×K positives mask, built from ``positive_index`` only when a loss needs the mask."""
        if self.positives is not None:
            return self.positives
        assert self.positive_index is not None
        columns = torch.arange(self.candidates.shape[0], device=self.positive_index.device)
        return self.positive_index[:, None] == columns[None, :]


def averaged(comparisons: list[Pairs]) -> list[Pairs]:
    """The comparisons weighted equally, weights summing to 1: the model's loss is their mean."""
    for pairs in comparisons:
        pairs.weight = 1.0 / len(comparisons)
    return comparisons
