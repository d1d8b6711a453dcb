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

    anchors: M×d. candidates: K×d. positives: M×K bool, the candidates that are positives of each anchor
    (at least one per anchor). exclude: M×K bool or None, candidates that are neither positive nor negative
    for that anchor (an anchor compared with itself in NT-Xent); losses mask them out, they never subtract them.
    name: a label for the comparison (``"1:5"``, ``"k=2"``), used in logs.
    """

    anchors: Tensor
    candidates: Tensor
    positives: Tensor
    exclude: Tensor | None = None
    name: str = ""
