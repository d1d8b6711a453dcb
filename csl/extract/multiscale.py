"""AMDIM: compare representations across scales of the encoder.

Scales, in AMDIM's notation at 32×32: ``1`` the global vector (1×1), ``5`` the last feature map (5×5 in AMDIM's
encoder), ``7`` the map before it (7×7). A comparison ``a:b`` scores anchors of scale ``a`` from one view against
candidates of scale ``b`` from the other view, both ways; a candidate is a positive when it comes from the same
image, at any location ("NCE over all locations of other images"); against the global scale that is one
candidate, given as ``positive_index``. Local anchors are drawn at ``anchor_locations`` random positions per image,
as AMDIM does for its 5:5 term, so the score matrix stays N·A × N·L rather than N·L × N·L.

Heads: AMDIM scores the encoder's own embeddings (its 1×1, 5×5 and 7×7 outputs all have n_rkhs channels), so by
default (``head=None``) no head is learned when every compared scale has the same width; a ``linear`` head to
``proj_dim`` brings scales of different widths (a ResNet's stages) to one size (``default_head``).

Weights: amdim-public ``costs.py`` averages the two directions of each comparison and ``train.py`` sums the
comparisons (``loss_g2l = 1t5 + 1t7 + 5t5``, plus the regulariser of every term, also halved per direction), so
each comparison's direction weighs 1/2 and three comparisons weigh 3: a mean over them would cut AMDIM's
effective learning rate by 3.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from csl.extract.heads import Head, locations
from csl.registry import EXTRACT
from csl.types import Features, Pairs

SCALES = ("1", "5", "7")


def parse_comparisons(comparisons: str | list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    items = comparisons.split(",") if isinstance(comparisons, str) else list(comparisons)
    parsed = []
    for item in items:
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(p in SCALES for p in parts):
            raise ValueError(f"comparison '{item.strip()}' is not 'a:b' with a, b in {', '.join(SCALES)} (e.g. '1:5')")
        parsed.append((parts[0], parts[1]))
    if not parsed:
        raise ValueError("comparisons is empty; give e.g. '1:5, 1:7, 5:5'")
    return parsed


def scale_embeddings(embedded: dict[str, Tensor], scale: str) -> tuple[Tensor, Tensor]:
    """Flatten one scale to (vectors K×d, image index of each vector K)."""
    x = embedded[scale]
    n = x.shape[0]
    if x.dim() == 2:
        return x, torch.arange(n, device=x.device)
    return x.reshape(-1, x.shape[-1]), torch.arange(n, device=x.device).repeat_interleave(x.shape[1])


def sample_locations(x: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Pick ``count`` random locations per image of N×L×d: (N·count × d, image index)."""
    n, num_locations, _ = x.shape
    picks = torch.randint(num_locations, (n, count), device=x.device)
    chosen = torch.gather(x, 1, picks[..., None].expand(-1, -1, x.shape[-1]))
    return chosen.reshape(n * count, -1), torch.arange(n, device=x.device).repeat_interleave(count)


def default_head(widths: list[int]) -> str:
    """No head where the compared embeddings already share a width (AMDIM's encoder), else a linear one."""
    return "none" if len(set(widths)) == 1 else "linear"


def same_image_pairs(anchors: Tensor, anchor_img: Tensor, candidates: Tensor, cand_img: Tensor, name: str) -> Pairs:
    return Pairs(anchors, candidates, anchor_img[:, None] == cand_img[None, :], None, name=name)


class Multiscale(nn.Module):
    def __init__(self, vector_dim: int, map_channels: tuple[int, ...], comparisons: list[tuple[str, str]],
                 head: str | None, proj_hidden: int | None, proj_dim: int, anchor_locations: int) -> None:
        super().__init__()
        used = {s for pair in comparisons for s in pair}
        if "7" in used and len(map_channels) < 2:
            raise ValueError(
                "multiscale comparisons with scale 7 need an intermediate feature map, but the encoder (or a patch "
                "pipeline, whose only map is the patch grid) gives one map; use comparisons without 7, e.g. '1:5, 5:5'"
            )
        in_dims = {"1": vector_dim, "5": map_channels[-1], "7": map_channels[-2] if len(map_channels) > 1 else 0}
        head = default_head([in_dims[s] for s in used]) if head is None else head
        self.heads = nn.ModuleDict({s: Head(head, in_dims[s], proj_hidden, proj_dim) for s in sorted(used)})
        dims = {h.out_dim for h in self.heads.values()}
        if len(dims) != 1:
            widths = ", ".join(f"{s}: {in_dims[s]}" for s in sorted(used))
            raise ValueError(f"head 'none' leaves the compared scales at different widths ({widths}); use head "
                             f"'linear' or 'mlp', or leave head unset")
        self.out_dim = dims.pop()
        self.comparisons = comparisons
        self.anchor_locations = anchor_locations

    def embed(self, features: Features) -> dict[str, Tensor]:
        sources = {"1": features.vector, "5": features.maps[-1], "7": features.maps[-2] if len(features.maps) > 1 else None}
        out = {}
        for scale, head in self.heads.items():
            x = sources[scale]
            out[scale] = head(x if x.dim() == 2 else locations(x))
        return out

    def pairs(self, online_a: dict[str, Tensor], online_b: dict[str, Tensor],
              target_a: dict[str, Tensor] | None, target_b: dict[str, Tensor] | None) -> list[Pairs]:
        cand_a = target_a if target_a is not None else online_a
        cand_b = target_b if target_b is not None else online_b
        result = []
        for src, trg in self.comparisons:
            for anchor_side, cand_side, direction in ((online_a, cand_b, "a→b"), (online_b, cand_a, "b→a")):
                x = anchor_side[src]
                anchors, anchor_img = scale_embeddings(anchor_side, src) if x.dim() == 2 else sample_locations(
                    x, self.anchor_locations)
                candidates, cand_img = scale_embeddings(cand_side, trg)
                name = f"{src}:{trg} {direction}"
                if trg == "1":  # one global candidate per image, in image order: an anchor's only positive
                    pairs = Pairs(anchors, candidates, None, None, name, positive_index=anchor_img)
                else:
                    pairs = same_image_pairs(anchors, anchor_img, candidates, cand_img, name)
                pairs.weight = 0.5  # the mean of the two directions, summed over the comparisons (AMDIM's train.py)
                result.append(pairs)
        return result


@EXTRACT.register("multiscale")
def multiscale(*, vector_dim: int, map_channels: tuple[int, ...], comparisons: str = "1:5, 1:7, 5:5",
               head: str | None = None, proj_hidden: int | None = None, proj_dim: int = 128,
               anchor_locations: int = 1) -> Multiscale:
    """comparisons: AMDIM's 'a:b' list (pl_bolts wrote these as '01, 02, 11'). head: none | linear | mlp | mlp_bn,
    or None for none where the compared scales share a width, else linear (``default_head``)."""
    return Multiscale(vector_dim, tuple(map_channels), parse_comparisons(comparisons), head, proj_hidden, proj_dim,
                      anchor_locations)
