"""Projection heads shared by the extraction strategies.

SimCLR's finding (2): a learnable nonlinear projection between the representation and the loss helps. A head maps
the last dimension, so the same head serves a pooled vector (N×C) and every location of a map (N×L×C), which is
AMDIM's 1×1-convolution embedding.
"""

from __future__ import annotations

from torch import Tensor, nn

HEADS = ("none", "linear", "mlp", "mlp_bn", "mlp_nobn")


class Head(nn.Module):
    """none: identity; linear: one layer; mlp: Linear → BatchNorm → ReLU → Linear (BYOL's projector and
    predictor, lightly's ``BYOLProjectionHead``); mlp_bn: the same with a BatchNorm after the last layer too, and no
    biases (SimCLR's reference code, lightly's ``SimCLRProjectionHead``), so the contrasted vectors are
    standardised per dimension over the batch; mlp_nobn: Linear → ReLU → Linear, both with biases and no batch
    norm (MoCo v2's ``--mlp`` head in facebookresearch/moco ``moco/builder.py``, lightly's ``MoCoProjectionHead``):
    a head without batch statistics, so nothing in it couples the samples of a batch."""

    def __init__(self, kind: str, in_dim: int, hidden: int | None, out_dim: int) -> None:
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"head '{kind}' is not one of {', '.join(HEADS)}")
        hidden = hidden or in_dim
        if kind == "none":
            self.net: nn.Module = nn.Identity()
            self.out_dim = in_dim
        elif kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
            self.out_dim = out_dim
        elif kind == "mlp_nobn":
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
            self.out_dim = out_dim
        else:
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden, bias=False),
                nn.BatchNorm1d(hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, out_dim, bias=kind == "mlp"),
                *([nn.BatchNorm1d(out_dim)] if kind == "mlp_bn" else []),
            )
            self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        return self.net(x.reshape(-1, shape[-1])).reshape(*shape[:-1], self.out_dim)


def locations(feature_map: Tensor) -> Tensor:
    """N×C×h×w → N×(h·w)×C: every location of a map as a vector."""
    return feature_map.flatten(2).transpose(1, 2)
