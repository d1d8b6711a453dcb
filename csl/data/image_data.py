"""An image set held whole in memory as one uint8 tensor, and the index helpers both data kinds share."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]


def permutation(n: int, generator: torch.Generator, device: torch.device | str) -> Tensor:
    """``torch.randperm(n)`` drawn from ``generator`` and placed on ``device``.

    Drawn on the generator's own device (randperm refuses a generator of another device), so a CPU generator
    can shuffle data held on a GPU and vice versa; the order depends only on the generator's state.
    """
    perm = torch.randperm(n, generator=generator, device=generator.device)
    return perm.to(device)


def balanced_indices(labels: Tensor, limit: int | None) -> Tensor:
    """Ascending indices of the first ``limit`` items, taken round-robin over the classes.

    Every class gives its 1st item (in the given order), then its 2nd, and so on, so a small ``limit`` stays
    class-balanced (classes with fewer items run out first). Items without a label (< 0) count as one more
    class, so a fully unlabelled set simply yields its first ``limit`` items. ``None`` keeps everything.
    """
    n = labels.numel()
    if limit is None or limit >= n:
        return torch.arange(n)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    labels = labels.to(torch.int64).clamp(min=-1).cpu()
    order = torch.sort(labels, stable=True).indices  # grouped by class, original order within a class
    sorted_labels = labels[order]
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    group_start = torch.cummax(torch.where(starts, torch.arange(n), torch.zeros(n, dtype=torch.int64)), 0).values
    rank = torch.empty(n, dtype=torch.int64)
    rank[order] = torch.arange(n) - group_start  # position of each item within its class
    key = rank * n + torch.arange(n)  # round-robin over classes; ties broken by original position
    chosen = torch.topk(key, limit, largest=False).indices
    return torch.sort(chosen).values


def is_labelled(data: object) -> bool:
    """Whether any image of ``data`` (an ``ImageData`` or ``ImageFolderStream``) has a label (>= 0)."""
    labels = getattr(data, "labels", None)
    return labels is not None and bool((labels >= 0).any())


def uint8_mean_std(chunks: Iterator[Tensor]) -> Stats:
    """Per-channel mean and std in [0, 1] of uint8 N×C×H×W chunks.

    Per image and channel the sums run in float32 (exact for the plain sum, relative error ~1e-7 for squares),
    across images in float64: as fast as a float32 reduction, as accurate as a float64 one for this purpose.
    """
    total = squares = None
    count = 0
    for chunk in chunks:
        x = chunk.reshape(chunk.shape[0], chunk.shape[1], -1).float()
        s = x.sum(dim=2).double().sum(dim=0)
        q = x.square_().sum(dim=2).double().sum(dim=0)
        total = s if total is None else total + s
        squares = q if squares is None else squares + q
        count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
    if total is None or not count:
        raise ValueError("mean_std of an empty image set")
    mean = total.cpu() / (255.0 * count)
    std = (squares.cpu() / (255.0**2 * count) - mean.square()).clamp_(min=0).sqrt_()
    if mean.numel() != 3:
        raise ValueError(f"mean_std expects 3 channels, got {mean.numel()}")
    m, s = mean.tolist(), std.tolist()
    return (m[0], m[1], m[2]), (s[0], s[1], s[2])


@dataclass
class ImageData:
    """An image set in memory, labelled or not.

    images: uint8 N×3×H×W. labels: int64 N (-1 where an image has no label, as STL-10's unlabeled split).
    classes: class names, index = label. name: a label for logs (``"cifar10-mini/train"``).
    """

    images: Tensor
    labels: Tensor
    classes: list[str]
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 N×C×H×W, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")
        if self.labels.dtype != torch.int64:
            self.labels = self.labels.to(torch.int64)

    def __repr__(self) -> str:
        shape = "×".join(map(str, self.images.shape))
        return f"ImageData({self.name!r}, {shape} uint8, {self.num_classes} classes, {self.images.device})"

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        """The side of the (square) images; for non-square images, the height."""
        return self.images.shape[2]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> ImageData:
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def subset(self, indices: Tensor) -> ImageData:
        indices = indices.to(self.images.device)
        return replace(self, images=self.images[indices], labels=self.labels[indices])

    def unlabeled(self) -> ImageData:
        """The same images without labels (every label -1, no classes): ``labels: none``."""
        return replace(self, labels=torch.full_like(self.labels, -1), classes=[])

    def mean_std(self, chunk: int = 4096) -> Stats:
        """Per-channel mean and std in [0, 1], in chunks of ``chunk`` images (never a float copy of the set)."""
        return uint8_mean_std(self.images[i : i + chunk] for i in range(0, len(self), chunk))

    def batches(
        self, batch_size: int, generator: torch.Generator, *, drop_last: bool = True,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One shuffled epoch of (uint8 images, int64 labels) on the data's device.

        The order is ``torch.randperm(n, generator=generator)``: the same generator state gives the same order.
        With ``drop_last`` (the default, for training) a last incomplete batch is left out. ``shard=(rank, size)``:
        only worker ``rank``'s rows of every batch (``csl.distributed.shard``), the same global order on every one.
        """
        from csl.distributed import shard as shard_slice

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        part = slice(None)
        if shard is not None and shard[1] > 1:
            if not drop_last:
                raise ValueError("a shard of the batches needs drop_last (a last incomplete batch does not split "
                                 "evenly)")
            part = shard_slice(batch_size, *shard)
        n = len(self)
        perm = permutation(n, generator, self.images.device)
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            index = perm[i : i + batch_size][part]
            yield self.images[index], self.labels[index]

    def ordered_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """All images in order, the last batch possibly smaller (for evaluation)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for i in range(0, len(self), batch_size):
            yield self.images[i : i + batch_size], self.labels[i : i + batch_size]
