"""YADIM: compare the last layer's feature maps, every location against every location of the other view.

The paper's YADIM drops AMDIM's multiscale comparisons for one comparison of last-layer maps. Every location of
view a is an anchor; its positives are all locations of the same image in view b (the crops differ, so no
location-to-location correspondence is assumed); all locations of other images are negatives.

As YADIM ran it (pl_bolts ``FeatureMapContrastiveTask``, which the paper's framework code uses for every
comparison): the maps are scored as the encoder gives them, with no learned head (``head: none``; the paper's
similarity is the dot product of the maps' vectors), and the two directions are averaged (``bidirectional``:
``0.5 * (loss1 + loss2)``). pl_bolts draws one anchor location per image; taking every location as an anchor is the
same objective in expectation, with less variance.
"""

from __future__ import annotations

from torch import Tensor, nn

from csl.extract.heads import Head, locations
from csl.extract.multiscale import same_image_pairs, scale_embeddings
from csl.registry import EXTRACT
from csl.types import Features, Pairs, averaged


class LastMap(nn.Module):
    def __init__(self, channels: int, head: str, proj_hidden: int | None, proj_dim: int) -> None:
        super().__init__()
        self.head = Head(head, channels, proj_hidden, proj_dim)
        self.out_dim = self.head.out_dim

    def embed(self, features: Features) -> dict[str, Tensor]:
        return {"map": self.head(locations(features.maps[-1]))}

    def pairs(self, online_a: dict[str, Tensor], online_b: dict[str, Tensor],
              target_a: dict[str, Tensor] | None, target_b: dict[str, Tensor] | None) -> list[Pairs]:
        cand_a = target_a if target_a is not None else online_a
        cand_b = target_b if target_b is not None else online_b
        result = []
        for anchor_side, cand_side, name in ((online_a, cand_b, "map a→b"), (online_b, cand_a, "map b→a")):
            anchors, anchor_img = scale_embeddings(anchor_side, "map")
            candidates, cand_img = scale_embeddings(cand_side, "map")
            result.append(same_image_pairs(anchors, anchor_img, candidates, cand_img, name))
        return averaged(result)


@EXTRACT.register("last_map")
def last_map(*, map_channels: tuple[int, ...], head: str = "none", proj_hidden: int | None = None,
             proj_dim: int = 128) -> LastMap:
    """head: none (the encoder's own map, as YADIM) | linear | mlp | mlp_bn."""
    return LastMap(map_channels[-1], head, proj_hidden, proj_dim)
