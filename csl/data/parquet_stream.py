"""A parquet image set too large to hold decoded: its encoded bytes in memory, batches decoded by DataLoader workers.

Why the bytes stay in memory rather than being read from the file per batch: a shuffled batch touches rows of
every row group, so reading from disk would decompress the whole file for each batch; the encoded JPEGs are small
(the shared CIFAR-10's 60,000 images are about 1 KB each, ~40x less than decoded at 96 px and ~250x at 224 px).
The workers share the one bytes buffer with the main process (fork, copy-on-write: it is a single object, so no
reference counts are written into its pages).

On a GPU with JPEG bytes the workers only gather each batch's bytes, and the main process decodes the batch on the
device in one call (``torchvision.io.decode_jpeg(..., device="cuda")``) and resizes it there, so CPU decoding does
not starve the GPU. nvJPEG's pixels can differ from libjpeg-turbo's by a few levels (IDCT and upsampling
rounding); on the CPU the pixels are exactly those of the same set loaded into memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from csl.data.parquet import bytes_and_offsets, decode_rows, read_parquet
from csl.data.stream import ImageStream, as_batch, default_workers


class _Rows(Dataset):
    """The chosen rows of a parquet set; ``__getitems__`` reads a whole batch (decoded, or its bytes gathered)."""

    def __init__(self, stream: ParquetStream, decode: bool) -> None:
        self.data = stream.data
        self.offsets = stream.offsets
        self.is_jpeg = stream.is_jpeg
        self.labels = stream.all_labels
        self.indices = stream.indices.tolist()
        self.size = stream.image_size if stream.resize else None
        self.where = f"{stream.file}: "
        self.decode = decode

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, positions: list[int]) -> tuple[Tensor, ...]:
        rows = [self.indices[p] for p in positions]
        labels = self.labels[rows]
        if not self.decode:  # one tensor of the batch's bytes and their offsets: decoded on the GPU
            offsets = torch.tensor([0] + [int(self.offsets[r + 1] - self.offsets[r]) for r in rows]).cumsum(0)
            data = torch.cat([self.data[int(self.offsets[r]) : int(self.offsets[r + 1])] for r in rows])
            return data, offsets, labels
        encoded = [self.data[int(self.offsets[r]) : int(self.offsets[r + 1])] for r in rows]
        images = decode_rows(encoded, self.is_jpeg[rows], size=self.size, rows=rows, where=self.where)
        return images, labels


@dataclass(kw_only=True)
class ParquetStream(ImageStream):
    """A parquet image set (``csl.data.parquet``) read in batches of uint8 N×3×S×S by ``workers`` processes.

    ``resize``: every image resized and centre-cropped to ``image_size`` (as ``imagefolder:``); otherwise the images
    keep their own size (``image_size`` is then the first image's height), which all must share.
    """

    file: str
    data: Tensor  # uint8: every kept row's encoded bytes, one after another
    offsets: np.ndarray  # int64, len(rows) + 1: row r is data[offsets[r]:offsets[r + 1]]
    is_jpeg: np.ndarray
    all_labels: Tensor
    classes: list[str] = field(default_factory=list)
    resize: bool = False
    device_decode: bool = True  # on a CUDA device, JPEGs decoded there (False: by the workers, as on a CPU)

    def __repr__(self) -> str:
        return (f"ParquetStream({self.name!r}, {len(self)}×3×{self.image_size}×{self.image_size} uint8, "
                f"{self.num_classes} classes, {self.workers} workers, {self.device})")

    @classmethod
    def open(cls, path: str, *, split: str = "train", image_size: int | None = None, workers: int | None = None,
             limit: int | None = None, name: str = "") -> ParquetStream:  # fmt: skip
        table = read_parquet(path, split=split, limit=limit)
        data, offsets, is_jpeg = bytes_and_offsets(table.encoded)
        first = decode_rows([data[: int(offsets[1])]], is_jpeg[:1], size=image_size, rows=[0],
                            where=f"{table.file}: ")
        return cls(
            file=str(table.file),
            data=data,
            offsets=offsets,
            is_jpeg=is_jpeg,
            all_labels=table.labels,
            classes=table.classes,
            resize=image_size is not None,
            indices=torch.arange(len(offsets) - 1),
            image_size=int(first.shape[-2]),
            workers=default_workers() if workers is None else workers,
            name=name or f"parquet:{table.file}",
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> Tensor:
        """int64 labels in the order of ``ordered_batches`` (no decoding)."""
        return self.all_labels[self.indices]

    def unlabeled(self) -> ParquetStream:
        """The same images without labels (every label -1, no classes): ``labels: none``."""
        return replace(self, all_labels=torch.full_like(self.all_labels, -1), classes=[])

    @property
    def gpu_decode(self) -> bool:
        """Whether batches are decoded on the device: a CUDA device, and JPEGs only (nvJPEG reads nothing else)."""
        return self.device_decode and self.device.type == "cuda" and bool(self.is_jpeg[self.indices.numpy()].all())

    def _dataset(self) -> Dataset:
        return _Rows(self, decode=not self.gpu_decode)

    def _collate(self) -> object:
        return as_batch

    def _finish(self, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        if len(batch) == 2:
            return super()._finish(batch)
        data, offsets, labels = batch
        bounds = offsets.tolist()
        encoded = [data[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]
        images = decode_rows(encoded, np.ones(len(encoded), dtype=bool), size=self.image_size if self.resize else None,
                             where=f"{self.file}: ", device=self.device)
        return images, labels.to(self.device, non_blocking=True)
