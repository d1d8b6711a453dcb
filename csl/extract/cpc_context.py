"""CPC v2: a context network reads the feature grid top-down and predicts the rows below ("south").

The grid is the encoder's last map, or, with a patch pipeline (``augment: cpc``), the grid of patch vectors. For
each position (r, c) and step k = 1..``context_steps``, the prediction W_k·ctx(r, c) is an anchor whose positive
is the embedding at (r + k, c) of the same image (its only positive, given as ``positive_index``: no M×K mask);
every other position of every image in the batch is a negative. The context network is PixelCNN-like: its
convolutions are padded on top only, so ctx(r, c) sees rows ≤ r and nothing below. Each view is its own prediction
task (CPC uses one view; the second doubles the samples), and with a momentum target the positives and negatives
come from the target's grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csl.extract.heads import Head, locations
from csl.registry import EXTRACT
from csl.types import Features, Pairs, averaged


class CausalBlock(nn.Module):
    """Residual block whose 2×3 convolution sees the current row and the one above, never a row below."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=(2, 3))
        self.mix = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(F.pad(x, (1, 1, 1, 0)))  # left, right, top, bottom
        return x + self.mix(F.relu(h))


class CpcContext(nn.Module):
    def __init__(self, channels: int, head: str, proj_hidden: int | None, proj_dim: int, context_steps: int,
                 context_blocks: int) -> None:
        super().__init__()
        if context_steps < 1:
            raise ValueError(f"context_steps must be ≥ 1, got {context_steps}")
        self.head = Head(head, channels, proj_hidden, proj_dim)
        self.out_dim = self.head.out_dim
        self.context = nn.Sequential(*[CausalBlock(self.out_dim) for _ in range(context_blocks)])
        self.predict = nn.ModuleList(nn.Linear(self.out_dim, self.out_dim) for _ in range(context_steps))

    def embed(self, features: Features) -> dict[str, Tensor]:
        grid = features.maps[-1]
        n, _, h, w = grid.shape
        return {"grid": self.head(locations(grid)).reshape(n, h, w, self.out_dim)}

    def pairs(self, online_a: dict[str, Tensor], online_b: dict[str, Tensor],
              target_a: dict[str, Tensor] | None, target_b: dict[str, Tensor] | None) -> list[Pairs]:
        result = []
        for view, online, target in (("a", online_a, target_a), ("b", online_b, target_b)):
            z = online["grid"]
            n, h, w, d = z.shape
            if h < 2:
                raise ValueError(f"cpc_context needs a grid of at least 2 rows, the encoder gives {h}×{w}")
            ctx = self.context(z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # N×h×w×d
            candidates = (target if target is not None else online)["grid"].reshape(n * h * w, d)
            for k, predictor in enumerate(self.predict[: h - 1], start=1):
                anchors = predictor(ctx[:, : h - k]).reshape(-1, d)
                rows = torch.arange(h - k, device=z.device)
                img = torch.arange(n, device=z.device)
                col = torch.arange(w, device=z.device)
                positive = (img[:, None, None] * h * w + (rows[None, :, None] + k) * w + col[None, None, :]).reshape(-1)
                result.append(Pairs(anchors, candidates, None, None, name=f"{view} k={k}", positive_index=positive))
        return averaged(result)


@EXTRACT.register("cpc_context")
def cpc_context(*, map_channels: tuple[int, ...], head: str = "linear", proj_hidden: int | None = None,
                proj_dim: int = 128, context_steps: int = 3, context_blocks: int = 2) -> CpcContext:
    """context_steps: how many rows ahead to predict (capped by the grid's height)."""
    return CpcContext(map_channels[-1], head, proj_hidden, proj_dim, context_steps, context_blocks)
