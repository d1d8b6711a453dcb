"""SimCLR, MoCo, BYOL: the pooled last layer through a projection head, one vector per view."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from csl.extract.heads import Head
from csl.registry import EXTRACT
from csl.types import Features, Pairs


def two_view_pairs(anchors_a: Tensor, anchors_b: Tensor, cands_a: Tensor, cands_b: Tensor, symmetric: bool) -> Pairs:
    """Both directions of a two-view comparison in one score matrix.

    symmetric (SimCLR): anchors and candidates are the same 2N embeddings; the positive of sample i is its other
    view, and i itself is excluded. Otherwise (BYOL, MoCo, SimSiam): anchor i of view a is compared with the
    candidates of view b, so the candidates are the two views swapped; the same-view candidate is excluded.
    Either way each anchor has one positive, given as ``positive_index``.
    """
    n = anchors_a.shape[0]
    device = anchors_a.device
    idx = torch.arange(2 * n, device=device)
    other = (idx + n) % (2 * n)
    anchors = torch.cat([anchors_a, anchors_b])
    if symmetric:
        candidates = anchors
        positive, excluded = other, idx
    else:
        candidates = torch.cat([cands_b, cands_a])
        positive, excluded = idx, other
    exclude = idx[:, None] == excluded[None, :]
    return Pairs(anchors, candidates, None, exclude, name="a:b", positive_index=positive)


class LastVector(nn.Module):
    def __init__(self, vector_dim: int, head: str, proj_hidden: int | None, proj_dim: int,
                 predictor: bool, pred_hidden: int | None) -> None:
        super().__init__()
        self.head = Head(head, vector_dim, proj_hidden, proj_dim)
        self.out_dim = self.head.out_dim
        self.predictor = Head("mlp", self.out_dim, pred_hidden, self.out_dim) if predictor else None

    def embed(self, features: Features) -> dict[str, Tensor]:
        return {"z": self.head(features.vector)}

    def pairs(self, online_a: dict[str, Tensor], online_b: dict[str, Tensor],
              target_a: dict[str, Tensor] | None, target_b: dict[str, Tensor] | None) -> list[Pairs]:
        za, zb = online_a["z"], online_b["z"]
        if target_a is None and self.predictor is None:
            return [two_view_pairs(za, zb, za, zb, symmetric=True)]
        qa, qb = (self.predictor(za), self.predictor(zb)) if self.predictor is not None else (za, zb)
        if target_a is None or target_b is None:  # SimSiam: the candidates are the online embeddings, stop-gradient
            ka, kb = za.detach(), zb.detach()
        else:
            ka, kb = target_a["z"], target_b["z"]
        return [two_view_pairs(qa, qb, ka, kb, symmetric=False)]


@EXTRACT.register("last_vector")
def last_vector(*, vector_dim: int, head: str = "mlp", proj_hidden: int | None = None,
                proj_dim: int = 128, predictor: bool = False, pred_hidden: int | None = None) -> LastVector:
    """head: none | linear | mlp | mlp_bn (csl.extract.heads). predictor: BYOL's online-only MLP on top of the
    projection."""
    return LastVector(vector_dim, head, proj_hidden, proj_dim, predictor, pred_hidden)
