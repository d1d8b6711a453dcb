"""Data sets as uint8 tensors.

``load(spec, split=...)`` gives an ``ImageData`` (the whole set in memory as uint8 N×3×H×W, on any device) or,
for folders of images too large for memory, an ``ImageFolderStream`` with the same batch interface. Specs:

    cifar10-mini        5,000 train / 1,000 test CIFAR-10 images embedded in the package (offline, the default)
    cifar10             torchvision's CIFAR-10 under ``root`` (``$CSL_DATA`` or ``~/.cache/csl/data``)
    stl10               torchvision's STL-10 (splits train, test, unlabeled, train+unlabeled), 96×96
    parquet:PATH        a parquet file, or a folder of ``{split}.parquet``: encoded image bytes + label column
    imagefolder:PATH    ``PATH/{split}/<class>/<image>`` (or ``PATH/<class>/<image>``), streamed from disk

``limit`` keeps the first ``limit`` images, taken round-robin over the classes so a small subset stays balanced.
Nothing is downloaded unless ``download=True``.
"""

from __future__ import annotations

import os
from pathlib import Path

from csl.data.folder import DEFAULT_IMAGE_SIZE, ImageFolderStream
from csl.data.image_data import ImageData, balanced_indices
from csl.data.parquet import decode_images, load_parquet
from csl.data.torchvision_sets import DataNotFoundError, data_root, load_cifar10, load_stl10

__all__ = [
    "DEFAULT_DATA",
    "DEFAULT_IMAGE_SIZE",
    "SPEC_FORMS",
    "DataNotFoundError",
    "ImageData",
    "ImageFolderStream",
    "balanced_indices",
    "decode_images",
    "load",
    "mini_path",
]

DEFAULT_DATA = "cifar10-mini"
SPEC_FORMS = ("cifar10-mini", "cifar10", "stl10", "parquet:PATH", "imagefolder:PATH")


def mini_path() -> str:
    """The folder of the embedded ``cifar10-mini`` parquet files (``csl/_data/cifar10-mini``)."""
    folder = Path(__file__).resolve().parent.parent / "_data" / "cifar10-mini"
    if not folder.is_dir():
        raise DataNotFoundError(
            f"the embedded cifar10-mini files are missing from {folder}; rebuild them with scripts/make_mini.py"
        )
    return str(folder)


def load(
    spec: str,
    *,
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = False,
    limit: int | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    workers: int | None = None,
) -> ImageData | ImageFolderStream:
    """Load the ``split`` of the data set named by ``spec`` (see the module doc for the forms).

    root: where ``cifar10`` / ``stl10`` live (default ``$CSL_DATA`` or ``~/.cache/csl/data``); download: fetch
    them if missing. limit: keep a class-balanced first ``limit`` images. image_size, workers: for
    ``imagefolder:`` only (the side images are resized and centre-cropped to, and the DataLoader workers).
    """
    if not isinstance(spec, str):
        raise TypeError(f"data spec must be a string, got {type(spec).__name__}")
    kind, sep, path = spec.partition(":")
    if spec == "cifar10-mini":
        data = load_parquet(mini_path(), split=split, limit=limit, name=f"cifar10-mini/{split}")
    elif spec == "cifar10":
        data = load_cifar10(data_root(root), split=split, download=download, limit=limit)
    elif spec == "stl10":
        data = load_stl10(data_root(root), split=split, download=download, limit=limit)
    elif sep and kind == "parquet" and path:
        data = load_parquet(path, split=split, limit=limit, name=f"{spec}/{split}")
    elif sep and kind == "imagefolder" and path:
        return ImageFolderStream.open(
            path, split=split, image_size=image_size, workers=workers, limit=limit, name=f"{spec}/{split}"
        )
    else:
        raise ValueError(f"unknown data spec '{spec}'; use one of: {', '.join(SPEC_FORMS)}")
    return data
