"""CIFAR-10 and STL-10 through torchvision, turned into uint8 tensors at once (no per-image loop)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from csl.data.image_data import ImageData, balanced_indices

STL10_SPLITS = ("train", "test", "unlabeled", "train+unlabeled")
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


class DataNotFoundError(FileNotFoundError):
    """A data set's files are not where they were looked for; the message says how to get them."""


def data_root(root: str | os.PathLike | None) -> Path:
    """``root``, else ``$CSL_DATA``, else ``~/.cache/csl/data``."""
    if root is None:
        root = os.environ.get("CSL_DATA") or Path.home() / ".cache" / "csl" / "data"
    return Path(root).expanduser()


def _subset(images: torch.Tensor, labels: torch.Tensor, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    keep = balanced_indices(labels, limit)
    if len(keep) == len(labels):
        return images, labels
    return images[keep], labels[keep]


def load_cifar10(root: Path, *, split: str, download: bool, limit: int | None) -> ImageData:
    from torchvision.datasets import CIFAR10

    if split not in ("train", "test"):
        raise ValueError(f"cifar10 has splits 'train' and 'test', not '{split}'")
    folder = root / CIFAR10.base_folder
    if not download and not folder.is_dir():
        raise DataNotFoundError(
            f"CIFAR-10 not found in {folder}. Download it with --download (download=True), put it under "
            f"another root with --data-root / $CSL_DATA, or read a parquet copy: parquet:PATH "
            f"(the shared copy: parquet:../shared/data/cifar10)"
        )
    try:
        dataset = CIFAR10(str(root), train=split == "train", download=download)
    except RuntimeError as err:  # files present but incomplete or corrupted
        raise DataNotFoundError(
            f"CIFAR-10 in {folder} is incomplete or corrupted ({err}); remove it and use --download, "
            f"or read a parquet copy: parquet:PATH"
        ) from err
    images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    images, labels = _subset(images, labels, limit)
    return ImageData(images=images, labels=labels, classes=list(dataset.classes), name=f"cifar10/{split}")


def load_stl10(root: Path, *, split: str, download: bool, limit: int | None) -> ImageData:
    from torchvision.datasets import STL10

    if split not in STL10_SPLITS:
        raise ValueError(f"stl10 has splits {', '.join(STL10_SPLITS)}, not '{split}'")
    folder = root / STL10.base_folder
    if not download and not folder.is_dir():
        raise DataNotFoundError(
            f"STL-10 not found in {folder}. Download it with --download (download=True; about 2.6 GB), "
            f"or put it under another root with --data-root / $CSL_DATA"
        )
    try:
        dataset = STL10(str(root), split=split, download=download)
    except RuntimeError as err:
        raise DataNotFoundError(f"STL-10 in {folder} is incomplete or corrupted ({err}); use --download") from err
    images = torch.from_numpy(np.ascontiguousarray(dataset.data))  # already N×3×96×96
    labels = torch.from_numpy(np.asarray(dataset.labels, dtype=np.int64))
    images, labels = _subset(images, labels, limit)
    classes = list(getattr(dataset, "classes", None) or STL10_CLASSES)
    return ImageData(images=images, labels=labels, classes=classes, name=f"stl10/{split}")
