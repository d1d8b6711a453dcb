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
    Either way each anchor has one positive, given as ``positive_index``. (``symmetric`` here is how the
    candidates are formed; the extraction's ``symmetric`` option is whether both directions are compared.)
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


def first_view_anchors(pairs: Pairs, n: int) -> Pairs:
    """The rows of view a's anchors only: SimCLR's NT-Xent in one direction (the candidates stay both views)."""
    assert pairs.positive_index is not None and pairs.exclude is not None
    return Pairs(pairs.anchors[:n], pairs.candidates, None, pairs.exclude[:n], pairs.name,
                 positive_index=pairs.positive_index[:n], weight=pairs.weight)


def one_way_pairs(queries: Tensor, keys: Tensor) -> Pairs:
    """MoCo's one direction: query i of view a against the keys of view b, its positive the key of its own image
    (column i); the other keys are candidates too, which the loss uses as negatives or not (``moco``'s
    ``batch_negatives``)."""
    positive = torch.arange(queries.shape[0], device=queries.device)
    return Pairs(queries, keys, None, None, name="a:b", positive_index=positive)


class LastVector(nn.Module):
    """``one_way`` (``symmetric=False``) declares that only view a's anchors are compared, with view b's
    candidates: a model with a momentum target then runs its online network on view a and its target on view b
    alone (``csl.model.CSLModel``), as MoCo's ``encoder_q(im_q)`` and ``encoder_k(im_k)``."""

    def __init__(self, vector_dim: int, head: str, proj_hidden: int | None, proj_dim: int,
                 predictor: bool, pred_hidden: int | None, symmetric: bool) -> None:
        super().__init__()
        self.head = Head(head, vector_dim, proj_hidden, proj_dim)
        self.out_dim = self.head.out_dim
        self.predictor = Head("mlp", self.out_dim, pred_hidden, self.out_dim) if predictor else None
        self.one_way = not symmetric

    def embed(self, features: Features) -> dict[str, Tensor]:
        return {"z": self.head(features.vector)}

    def pairs(self, online_a: dict[str, Tensor], online_b: dict[str, Tensor] | None,
              target_a: dict[str, Tensor] | None, target_b: dict[str, Tensor] | None) -> list[Pairs]:
        if self.one_way and target_b is not None:  # MoCo: the model encoded view a online and view b as keys
            za = online_a["z"]
            return [one_way_pairs(self.predictor(za) if self.predictor is not None else za, target_b["z"])]
        assert online_b is not None
        za, zb = online_a["z"], online_b["z"]
        if target_a is None and self.predictor is None:
            pairs = two_view_pairs(za, zb, za, zb, symmetric=True)
            return [first_view_anchors(pairs, za.shape[0]) if self.one_way else pairs]
        qa, qb = (self.predictor(za), self.predictor(zb)) if self.predictor is not None else (za, zb)
        if target_a is None or target_b is None:  # SimSiam: the candidates are the online embeddings, stop-gradient
            if self.one_way:
                return [one_way_pairs(qa, zb.detach())]
            ka, kb = za.detach(), zb.detach()
        else:
            ka, kb = target_a["z"], target_b["z"]
        return [two_view_pairs(qa, qb, ka, kb, symmetric=False)]


@EXTRACT.register("last_vector")
def last_vector(*, vector_dim: int, head: str = "mlp", proj_hidden: int | None = None,
                proj_dim: int = 128, predictor: bool = False, pred_hidden: int | None = None,
                symmetric: bool = True) -> LastVector:
    """head: one of ``csl.extract.heads.HEADS``; proj_hidden: its hidden width (default the encoder's vector
    width, as MoCo v2's head). predictor: BYOL's online-only MLP on top of the projection.

    symmetric: compare both directions, view a's anchors with view b's candidates and b's with a's, in one score
    matrix whose loss is their mean (SimCLR, BYOL, MoCo v3, the MoCo CIFAR demo's ``--symmetric``); False
    compares view a's with view b's only: MoCo v1/v2's one asymmetric query → key loss per step."""
    return LastVector(vector_dim, head, proj_hidden, proj_dim, predictor, pred_hidden, symmetric)
