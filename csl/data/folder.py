"""Image sets too large for memory: a folder per class, or a folder of unlabelled images, decoded and resized by
DataLoader workers.

``ImageFolderStream`` has the interface of ``ImageData`` that the trainer uses (``batches``,
``ordered_batches``, ``__len__``, ``num_classes``, ``classes``, ``labels``, ``mean_std``, ``to``, ``subset``,
``name``, ``image_size``), but keeps only file paths in memory: each batch is read from disk by worker processes.

Labels: with ``labels="auto"`` the subfolders of the split's folder are the classes (torchvision's
``ImageFolder``); a folder without subfolders holds unlabelled images (label -1). ``labels="none"`` reads every
image under the folder and its subfolders, unlabelled: folders that are not classes (dates, sites, batches).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import make_dataset
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as F

from csl.data.image_data import balanced_indices
from csl.data.parquet import SPLIT_NAMES, quiet_image_io
from csl.data.stream import ImageStream, ResizeCrop, default_workers

DEFAULT_IMAGE_SIZE = 96
"""Side of the images an ``imagefolder:`` set yields: STL-10's size, a common one for self-supervised
learning at modest cost (ImageNet-style 224 is 5.4× the pixels); pass ``image_size`` to change it."""


def read_image(path: str) -> Tensor:
    """uint8 3×H×W from an image file: torchvision's decoders, PIL for the formats they lack (BMP, TIFF, ...).

    A file that neither reads is a ValueError naming it (raised in a DataLoader worker, it ends the message that
    the main process re-raises).
    """
    try:
        with quiet_image_io():
            return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except RuntimeError as first:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                return F.pil_to_tensor(image.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            reason = str(first).strip().splitlines()[0][:200] if str(first).strip() else type(exc).__name__
            raise ValueError(f"{path}: not a readable image ({reason})") from None


LABEL_MODES = ("auto", "none")
"""What ``labels`` may say: ``auto``, the labels a data set has (class folders, a label column); ``none``, none."""


class UnlabeledImageFolder(ImageFolder):
    """Every image under ``root`` and its subfolders, in sorted path order, each labelled -1; no classes.

    Built on ``ImageFolder``'s documented extension points (``find_classes``, ``make_dataset``): the root itself
    is walked as the one folder, so files, extensions and links are found exactly as torchvision finds them.
    """

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        return [], {}

    @staticmethod
    def make_dataset(directory: str | os.PathLike, class_to_idx: dict[str, int],
                     extensions: tuple[str, ...] | None = None, is_valid_file: Callable[[str], bool] | None = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        try:
            return make_dataset(directory, {"": -1}, extensions=extensions, is_valid_file=is_valid_file)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"no images in {directory} or its subfolders "
                                    f"(image files end in {', '.join(extensions or ())})") from err


def has_class_folders(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds subfolders, which ``labels="auto"`` reads as classes."""
    return any(entry.is_dir() for entry in os.scandir(path))


class _Items(Dataset):
    """The chosen items of an ImageFolder, as (uint8 image, label)."""

    def __init__(self, folder: ImageFolder, indices: list[int]) -> None:
        self.folder = folder
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.folder[self.indices[i]]


def split_folder(path: str | os.PathLike, split: str) -> Path:
    """``path/split`` if it exists; else ``path`` itself, unless ``path`` holds other splits' folders."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"no image folder at {path}")
    if (path / split).is_dir():
        return path / split
    others = [s for s in SPLIT_NAMES if (path / s).is_dir()]
    if others:
        raise FileNotFoundError(f"no '{split}' split in {path} (it has: {', '.join(others)})")
    return path


@dataclass(kw_only=True)
class ImageFolderStream(ImageStream):
    """Images under ``root/<class>/<file>`` (or unlabelled under ``root``), read in batches of uint8 N×3×S×S
    (S = ``image_size``).

    Build with ``ImageFolderStream.open(path, ...)`` or ``csl.data.load("imagefolder:PATH")``. Every batch is
    decoded and resized by ``workers`` DataLoader processes (0: in this process); batches are moved to
    ``device`` (pinned first when it is a GPU).
    """

    folder: ImageFolder  # or an UnlabeledImageFolder
    image_size: int = DEFAULT_IMAGE_SIZE

    def __repr__(self) -> str:
        return (
            f"ImageFolderStream({self.name!r}, {len(self)}×3×{self.image_size}×{self.image_size} uint8, "
            f"{self.num_classes} classes, {self.workers} workers, {self.device})"
        )

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        split: str = "train",
        image_size: int = DEFAULT_IMAGE_SIZE,
        workers: int | None = None,
        limit: int | None = None,
        name: str = "",
        labels: str = "auto",
    ) -> ImageFolderStream:
        if labels not in LABEL_MODES:
            raise ValueError(f"unknown labels '{labels}'; choose one of: {', '.join(LABEL_MODES)}")
        root = split_folder(path, split)
        kind = ImageFolder if labels == "auto" and has_class_folders(root) else UnlabeledImageFolder
        try:
            folder = kind(str(root), loader=read_image, transform=ResizeCrop(image_size))
        except FileNotFoundError as exc:  # class folders without image files (an unlabelled folder says so itself)
            if kind is UnlabeledImageFolder:
                raise
            raise FileNotFoundError(f"{root}: no images in its class folders ({exc})") from None
        indices = balanced_indices(torch.as_tensor(folder.targets, dtype=torch.int64), limit)
        return cls(
            folder=folder,
            indices=indices,
            image_size=image_size,
            workers=default_workers() if workers is None else workers,
            name=name or f"imagefolder:{root}",
        )

    @property
    def classes(self) -> list[str]:
        return list(self.folder.classes)

    @property
    def num_classes(self) -> int:
        return len(self.folder.classes)

    @property
    def labels(self) -> Tensor:
        """int64 labels in the order of ``ordered_batches`` (cheap: from the file list, no decoding)."""
        return torch.as_tensor(self.folder.targets, dtype=torch.int64)[self.indices]

    def _dataset(self) -> Dataset:
        return _Items(self.folder, self.indices.tolist())
