"""CPC v2's prediction task: a causal context network reads the grid and predicts the targets some rows ahead.

The grid is the encoder's last map, or, with a patch pipeline (``augment: cpc``), the grid of patch vectors (the
latents). As the pseudocode of Hénaff et al. 2019 (appendix A.2, ``CPC`` and ``pixelCNN``):

    context = pixelCNN(latents)                       # ctx(r, c) sees rows <= r only
    targets = Conv1x1(target_dim)(latents)            # the candidates: every position of every image
    for i in range(steps_to_ignore, steps_to_predict):
        preds = Conv1x1(target_dim)(context)[:, :-(i + 1)] * emb_scale   # one head per step
        loss += cross_entropy(preds @ targets.T, the target i + 1 rows below)

So the offsets predicted are k = steps_to_ignore + 1 .. steps_to_predict: with the paper's 2 and 3, k = 3 only.
Other readings are options: the CPCModel of the Berkeley deep-unsupervised-learning course (``deepul_helper``)
takes steps_to_predict as a count, k = 3, 4, 5 (``steps_to_predict: 5`` here); pl_bolts' ``CPCTask`` predicts
k = 2..6 of a 7-row grid (``steps_to_ignore: 1, steps_to_predict: 6``), though it counts each k k - 1 times, has
one prediction head for all steps, and pads its PixelCNN's top row with ones. Offsets beyond the grid are
skipped. The nearer rows are ignored because at 8×8 patches with stride 4 the patch one row down shares half
its pixels with the anchor's patch: k = 1 is solved by low-level continuity.

Each prediction W_k·ctx(r, c)·emb_scale is an anchor whose one positive is the target at (r + k, c) of the same
image (``positive_index``: no M×K mask); every other position of every image in the batch is a negative, as the
pseudocode's logits. The similarity is a plain dot product and the loss InfoNCE: the bilinear score is W_k here.

``directions`` repeats the task in other directions (among CPC v2's improvements is predicting in more
directions than downwards; the pseudocode shows one): the grid is flipped or transposed so that the direction
runs down its rows, and one causal context network serves every direction (as rschwarz15/CPCV2-PyTorch
``cpc_models/CPC.py``, which rotates the grid), each direction with its own prediction heads;
``context_per_direction`` gives each its own context network instead. The targets are one projection for all.

Weights (``Pairs.weight``): the pseudocode sums its per-step losses (each a mean over its anchors), and directions
are summed as separate tasks; the two views are two samples of the same task, so their losses are averaged.
With a momentum target the targets come from the target's grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csl.registry import EXTRACT
from csl.types import Features, Pairs

DIRECTIONS = ("south", "north", "east", "west")


def orient(grid: Tensor, direction: str) -> Tensor:
    """A grid (…×h×w) turned so that ``direction`` runs down its rows: south as it is, north upside down, east
    transposed (columns become rows), west transposed and upside down."""
    if direction in ("east", "west"):
        grid = grid.transpose(-2, -1)
    if direction in ("north", "west"):
        grid = grid.flip(-2)
    return grid


def parse_directions(directions: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in directions.split(","))
    for name in names:
        if name not in DIRECTIONS:
            raise ValueError(f"cpc_context directions: '{name}' is not one of {', '.join(DIRECTIONS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"cpc_context directions: '{directions}' names a direction twice")
    return names


class PixelCnnBlock(nn.Module):
    """One residual block of the pseudocode's ``pixelCNN``: 1×1 → ReLU → 1×3 (zero-padded left and right) →
    one zero row padded on top → 2×1 (no padding) → ReLU → 1×1 back to the input width, added to the input.

    The 2×1 convolution over (row r - 1, row r) is the only vertical mixing, so a position sees its own row and
    the rows above, never one below.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(dim, hidden, kernel_size=1)
        self.across = nn.Conv2d(hidden, hidden, kernel_size=(1, 3), padding=(0, 1))
        self.down = nn.Conv2d(hidden, hidden, kernel_size=(2, 1))
        self.expand = nn.Conv2d(hidden, dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.across(F.relu(self.reduce(x)))
        h = F.relu(self.down(F.pad(h, (0, 0, 1, 0))))  # left, right, top, bottom
        return x + self.expand(h)


class PixelCnn(nn.Module):
    """The pseudocode's context network: ``blocks`` residual blocks on the latents (N×C×h×w), then a ReLU."""

    def __init__(self, dim: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[PixelCnnBlock(dim, hidden) for _ in range(blocks)])

    def forward(self, latents: Tensor) -> Tensor:
        return F.relu(self.blocks(latents))


class CpcContext(nn.Module):
    def __init__(self, channels: int, *, steps_to_ignore: int, steps_to_predict: int, emb_scale: float,
                 target_dim: int, context_blocks: int, context_hidden: int, directions: tuple[str, ...],
                 context_per_direction: bool) -> None:
        super().__init__()
        if not 0 <= steps_to_ignore < steps_to_predict:
            raise ValueError(f"cpc_context needs 0 <= steps_to_ignore < steps_to_predict, got {steps_to_ignore} "
                             f"and {steps_to_predict}")
        self.offsets = tuple(range(steps_to_ignore + 1, steps_to_predict + 1))
        self.directions = directions
        self.emb_scale = emb_scale
        self.out_dim = target_dim
        self.targets = nn.Linear(channels, target_dim)  # a 1×1 convolution on every location
        contexts = directions if context_per_direction else ("shared",)
        self.context = nn.ModuleDict({name: PixelCnn(channels, context_hidden, context_blocks) for name in contexts})
        self.predict = nn.ModuleDict({
            direction: nn.ModuleList(nn.Linear(channels, target_dim) for _ in self.offsets) for direction in directions
        })

    def embed(self, features: Features) -> dict[str, Tensor]:
        latents = features.maps[-1]  # N×C×h×w
        return {"latents": latents, "targets": self.targets(latents.permute(0, 2, 3, 1))}  # targets N×h×w×d

    def plan(self, h: int, w: int, device: torch.device) -> list[tuple[str, int, Tensor, Tensor]]:
        """What is predicted from where on an h×w grid: (direction, offset, context positions, target positions),
        positions as row-major indices of the grid, one entry per anchor in the order of the anchors."""
        index = torch.arange(h * w, device=device).view(h, w)
        result = []
        for direction in self.directions:
            turned = orient(index, direction)
            for k in self.offsets:
                if k < turned.shape[0]:
                    result.append((direction, k, turned[:-k].reshape(-1), turned[k:].reshape(-1)))
        if not result:
            raise ValueError(f"cpc_context predicts {self.offsets[0]} to {self.offsets[-1]} rows ahead, beyond a "
                             f"grid of {h}×{w}; lower steps_to_ignore, or use a larger grid")
        return result

    def pairs(self, online_a: dict[str, Tensor], online_b: dict[str, Tensor],
              target_a: dict[str, Tensor] | None, target_b: dict[str, Tensor] | None) -> list[Pairs]:
        views = (("a", online_a, target_a), ("b", online_b, target_b))
        result = []
        for view, online, target in views:
            latents = online["latents"]
            n, _, h, w = latents.shape
            targets = (target if target is not None else online)["targets"]
            candidates = targets.reshape(n * h * w, self.out_dim)
            image_start = torch.arange(n, device=latents.device)[:, None] * (h * w)
            contexts: dict[str, Tensor] = {}
            for direction, k, _, target_at in self.plan(h, w, latents.device):
                if direction not in contexts:
                    net = self.context[direction if direction in self.context else "shared"]
                    contexts[direction] = net(orient(latents, direction)).permute(0, 2, 3, 1)  # N×h'×w'×C
                head = self.predict[direction][self.offsets.index(k)]
                anchors = head(contexts[direction][:, :-k]).reshape(-1, self.out_dim) * self.emb_scale
                positive = (image_start + target_at[None, :]).reshape(-1)
                result.append(Pairs(anchors, candidates, None, None, name=f"{view} {direction} k={k}",
                                    positive_index=positive, weight=1.0 / len(views)))
        return result


@EXTRACT.register("cpc_context")
def cpc_context(*, map_channels: tuple[int, ...], steps_to_ignore: int = 2, steps_to_predict: int = 3,
                emb_scale: float = 0.1, target_dim: int = 64, context_blocks: int = 5, context_hidden: int = 256,
                directions: str = "south", context_per_direction: bool = False) -> CpcContext:
    """Defaults: CPC v2's pseudocode. steps_to_ignore / steps_to_predict: the offsets predicted are
    steps_to_ignore + 1 .. steps_to_predict rows ahead; directions: comma-separated, of south, north, east, west."""
    return CpcContext(map_channels[-1], steps_to_ignore=steps_to_ignore, steps_to_predict=steps_to_predict,
                      emb_scale=emb_scale, target_dim=target_dim, context_blocks=context_blocks,
                      context_hidden=context_hidden, directions=parse_directions(directions),
                      context_per_direction=context_per_direction)
