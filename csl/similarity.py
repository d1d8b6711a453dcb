"""Aspect 4, similarity: how an anchor is scored against a candidate.

A similarity is an ``nn.Module`` taking anchors M×d and candidates K×d and returning scores M×K. Every choice
takes ``temperature`` (scores are divided by it) and ``tclip`` (AMDIM's soft clip ``tclip·tanh(s/tclip)``,
which keeps NCE logits bounded; ``None`` turns it off).

The clip stays here, in the one place that reads ``tclip`` (so it is never applied twice), and every loss keeps
receiving the scores it has always received. A loss that must also see the scores *before* the clip (AMDIM's
regulariser ``0.05·mean(s²)`` acts on them: on clipped scores it vanishes exactly where the scores grow) declares
``needs_raw_scores``, and the model asks the similarity for both with ``raw_and_clipped``, which the base class
implements once for every choice.

To add a similarity: a subclass of ``Similarity`` that defines ``score``, and one builder below with
``@SIMILARITY.register("name")``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csl.registry import SIMILARITY


class Similarity(nn.Module, ABC):
    """Shared by every choice: temperature and tanh clip applied to the raw score of ``score``."""

    def __init__(self, temperature: float, tclip: float | None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if tclip is not None and tclip <= 0:
            raise ValueError(f"tclip must be > 0 or None, got {tclip}")
        self.temperature = temperature
        self.tclip = tclip

    @abstractmethod
    def score(self, anchors: Tensor, candidates: Tensor) -> Tensor:
        """Raw scores M×K, before temperature and clip."""

    def raw_and_clipped(self, anchors: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor]:
        """The scores divided by the temperature, before and after the tanh clip (the same tensor without one)."""
        raw = self.score(anchors.float(), candidates.float()) / self.temperature
        if self.tclip is None:
            return raw, raw
        return raw, self.tclip * torch.tanh(raw / self.tclip)

    def forward(self, anchors: Tensor, candidates: Tensor) -> Tensor:
        return self.raw_and_clipped(anchors, candidates)[1]


class Dot(Similarity):
    """AMDIM and YADIM: plain dot product, optionally ÷ √d so the scale does not grow with the width."""

    def __init__(self, temperature: float, tclip: float | None, scale_by_dim: bool) -> None:
        super().__init__(temperature, tclip)
        self.scale_by_dim = scale_by_dim

    def score(self, anchors: Tensor, candidates: Tensor) -> Tensor:
        scores = anchors @ candidates.T
        return scores / math.sqrt(anchors.shape[1]) if self.scale_by_dim else scores


class Cosine(Similarity):
    """SimCLR, MoCo, BYOL: the dot product of L2-normalised vectors."""

    def score(self, anchors: Tensor, candidates: Tensor) -> Tensor:
        return F.normalize(anchors, dim=1) @ F.normalize(candidates, dim=1).T


class Bilinear(Similarity):
    """CPC: a learned map W between the anchor and candidate spaces, s = a·W·c (initialised to the identity)."""

    def __init__(self, dim: int, temperature: float, tclip: float | None) -> None:
        super().__init__(temperature, tclip)
        self.weight = nn.Parameter(torch.eye(dim))

    def score(self, anchors: Tensor, candidates: Tensor) -> Tensor:
        return (anchors @ self.weight) @ candidates.T


@SIMILARITY.register("dot")
def dot(*, temperature: float = 1.0, tclip: float | None = None, scale_by_dim: bool = True) -> Similarity:
    return Dot(temperature, tclip, scale_by_dim)


@SIMILARITY.register("cosine")
def cosine(*, temperature: float = 0.1, tclip: float | None = None) -> Similarity:
    return Cosine(temperature, tclip)


@SIMILARITY.register("bilinear")
def bilinear(*, dim: int, temperature: float = 1.0, tclip: float | None = None) -> Similarity:
    return Bilinear(dim, temperature, tclip)
