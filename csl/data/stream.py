"""What every streamed image set shares: batches read by DataLoader workers in the order ``ImageData`` draws them.

A stream keeps in memory only what finds an image (file paths, or encoded bytes) and the positions ``indices`` of
the images it holds; each batch is read, decoded and resized by worker processes. The epoch order is
``torch.randperm(len(self), generator=generator)``, exactly as ``ImageData.batches`` draws it, so for the same
generator a streamed set and the same set in memory yield the same batches.

Of several training workers (``csl.distributed``) each passes ``shard=(rank, size)``: every worker draws the same
global order and reads and decodes only its rows of each global batch (``csl.distributed.shard``).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F

from csl.data.image_data import Stats, permutation, uint8_mean_std

Shard = tuple[int, int]
"""(rank, size): worker ``rank`` of ``size`` reads its equal slice of every global batch."""


def batch_rows(order: Sequence[int], batch_size: int, drop_last: bool, shard: Shard | None) -> list[list[int]]:
    """The positions each batch reads: consecutive ``batch_size`` runs of ``order``, cut to ``shard``'s rows.

    A shard needs whole batches (``drop_last``): the last incomplete batch would not split into equal shards.
    """
    from csl.distributed import shard as shard_slice

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(order)
    stop = n - n % batch_size if drop_last else n
    rows = [list(order[i : i + batch_size]) for i in range(0, stop, batch_size)]
    if shard is None or shard[1] == 1:
        return rows
    if not drop_last:
        raise ValueError("a shard of the batches needs drop_last (a last incomplete batch does not split evenly)")
    part = shard_slice(batch_size, *shard)
    return [r[part] for r in rows]


class ResizeCrop:
    """Resize the short side to ``size`` (antialiased) and crop the centre square: uint8 (N×)3×size×size."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Tensor) -> Tensor:
        if image.shape[-2:] != (self.size, self.size):
            image = F.resize(image, [self.size], antialias=True)
            image = F.center_crop(image, [self.size, self.size])
        return image.contiguous()


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(8, cores)


def as_batch(batch: Any) -> Any:
    """The DataLoader's collate for datasets whose ``__getitems__`` already returns a whole batch."""
    return batch


@dataclass(kw_only=True)
class ImageStream(ABC):
    """The batch interface of ``ImageData`` over images read by ``workers`` DataLoader processes (0: in this one).

    Subclasses give ``_dataset()`` (items by position in ``indices``), and may give ``_collate`` and ``_finish``
    (what the main process does to a batch the workers hand over: moving it to ``device``, or decoding it there).
    """

    indices: Tensor
    image_size: int
    workers: int = 0
    name: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _stats: Stats | None = field(default=None, repr=False)

    @abstractmethod
    def _dataset(self) -> Dataset:
        """The items by position in ``indices``: every stream gives its own (folder files, parquet rows)."""

    def _collate(self) -> Any:
        return None  # the DataLoader's default collate

    def _finish(self, batch: Any) -> tuple[Tensor, Tensor]:
        images, labels = batch
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def __len__(self) -> int:
        return len(self.indices)

    def to(self, device: torch.device | str) -> Any:
        """The same set, its batches delivered on ``device``."""
        return replace(self, device=torch.device(device))

    def subset(self, indices: Tensor) -> Any:
        """The images at ``indices`` (positions in this set's order); its mean and std are estimated anew."""
        return replace(self, indices=self.indices[indices.cpu()], _stats=None)

    def _iterate(self, order: Tensor, batch_size: int, drop_last: bool,
                 shard: Shard | None = None) -> Iterator[tuple[Tensor, Tensor]]:  # fmt: skip
        batch_sampler = batch_rows(order.tolist(), batch_size, drop_last, shard)
        if not batch_sampler:
            return
        loader = DataLoader(
            self._dataset(),
            batch_sampler=batch_sampler,
            num_workers=self.workers,
            collate_fn=self._collate(),
            pin_memory=self.device.type == "cuda",
            # Its own generator: a DataLoader draws its workers' base seed from torch's global one otherwise, which
            # would move the global RNG (the model's initialisation, AMDIM's draws) by reading a stream. Nothing
            # random happens in the workers.
            generator=torch.Generator(),
        )
        for batch in loader:
            yield self._finish(batch)

    def batches(self, batch_size: int, generator: torch.Generator, *, drop_last: bool = True,
                shard: Shard | None = None) -> Iterator[tuple[Tensor, Tensor]]:  # fmt: skip
        """One shuffled epoch, in the order ``torch.randperm(len(self), generator=generator)``; with ``shard``
        only that worker's rows of each batch."""
        return self._iterate(permutation(len(self), generator, "cpu"), batch_size, drop_last, shard)

    def ordered_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """All images in order, the last batch possibly smaller (for evaluation)."""
        return self._iterate(torch.arange(len(self)), batch_size, False)

    def mean_std(self, sample: int = 2048, batch_size: int = 256) -> Stats:
        """Per-channel mean and std in [0, 1], estimated from ``sample`` images drawn with a fixed seed.

        Computed once and remembered (for the default arguments).
        """
        if self._stats is not None and sample == 2048:
            return self._stats
        generator = torch.Generator().manual_seed(0)
        chosen = permutation(len(self), generator, "cpu")[:sample]
        stats = uint8_mean_std(images for images, _ in self._iterate(chosen, batch_size, False))
        if sample == 2048:
            self._stats = stats
        return stats
