"""Data sets as uint8 tensors.

``load(spec, split=...)`` gives an ``ImageData`` (the whole set in memory as uint8 N×3×H×W, on any device) or,
for sets too large for memory, a stream with the same batch interface (``csl.data.stream``): an
``ImageFolderStream`` for ``imagefolder:``, always, and a ``ParquetStream`` for parquet sets (``parquet:`` and
``cifar10-mini``) with ``stream="on"``, or ``"auto"`` when the decoded set would take more than a quarter of the
memory available now (``STREAM_SHARE``). Specs:

    cifar10-mini        5,000 train / 1,000 test CIFAR-10 images embedded in the package (offline, the default)
    cifar10             torchvision's CIFAR-10 under ``root`` (``$CSL_DATA`` or ``~/.cache/csl/data``)
    stl10               torchvision's STL-10 (splits train, test, unlabeled, train+unlabeled), 96×96
    stl10-unlabeled     STL-10's 100,000 unlabelled images alone (its one split, train; evaluate with eval_data)
    parquet:PATH        a parquet file, or a folder of ``{split}.parquet``: encoded image bytes [+ label column]
    imagefolder:PATH    ``PATH/{split}/<class>/<image>`` (or ``PATH/<class>/<image>``), streamed from disk; a
                        folder without subfolders holds unlabelled images

``labels="none"`` reads any of them without labels (every label -1, no classes); for ``imagefolder:`` it reads
every image under the folder and its subfolders (folders that are not classes). A parquet table without a label
column is unlabelled as it is. ``has_labels`` tells from the files' structure alone whether a spec's training
split has labels.

``limit`` keeps the first ``limit`` images, taken round-robin over the classes so a small subset stays balanced.
Nothing is downloaded unless ``download=True``.
"""

from __future__ import annotations

import os
from pathlib import Path

from csl.data.folder import DEFAULT_IMAGE_SIZE, LABEL_MODES, ImageFolderStream, has_class_folders, split_folder
from csl.data.image_data import ImageData, balanced_indices, is_labelled
from csl.data.parquet import decode_images, has_label_column, load_parquet, parquet_file
from csl.data.parquet_stream import ParquetStream
from csl.data.stream import ImageStream
from csl.data.torchvision_sets import DataNotFoundError, data_root, load_cifar10, load_stl10

__all__ = [
    "DEFAULT_DATA",
    "DEFAULT_IMAGE_SIZE",
    "SPEC_FORMS",
    "DataNotFoundError",
    "LABEL_MODES",
    "ImageData",
    "ImageFolderStream",
    "ImageStream",
    "ParquetStream",
    "STREAM_MODES",
    "balanced_indices",
    "decode_images",
    "has_labels",
    "is_labelled",
    "load",
    "mini_path",
]

DEFAULT_DATA = "cifar10-mini"
STREAM_MODES = ("auto", "on", "off")
STREAM_SHARE = 0.25
"""``stream="auto"`` streams a parquet set whose decoded images would take more than this share of the memory
available when it is loaded: a search runs several trials on a machine, each holding its own copy of the training
and test sets, beside its model and its DataLoader workers."""
SPEC_FORMS = ("cifar10-mini", "cifar10", "stl10", "stl10-unlabeled", "parquet:PATH", "imagefolder:PATH")


def mini_path() -> str:
    """The folder of the embedded ``cifar10-mini`` parquet files (``csl/_data/cifar10-mini``)."""
    folder = Path(__file__).resolve().parent.parent / "_data" / "cifar10-mini"
    if not folder.is_dir():
        raise DataNotFoundError(
            f"the embedded cifar10-mini files are missing from {folder}; rebuild them with scripts/make_mini.py"
        )
    return str(folder)


def available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes; where that is unknown, the physical memory's size."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _parquet(path: str, *, split: str, limit: int | None, name: str, image_size: int | None, stream: str,
             workers: int | None) -> ImageData | ParquetStream:  # fmt: skip
    """A parquet set in memory or streamed (``stream``: the module doc's rule)."""
    if stream == "off":
        return load_parquet(path, split=split, limit=limit, name=name, image_size=image_size)
    streamed = ParquetStream.open(path, split=split, image_size=image_size, workers=workers, limit=limit, name=name)
    if stream == "on":
        return streamed
    decoded = len(streamed) * 3 * streamed.image_size**2  # square images: the first one's side (non-square: close)
    if decoded > STREAM_SHARE * available_memory():
        return streamed
    return load_parquet(path, split=split, limit=limit, name=name, image_size=image_size)


def load(
    spec: str,
    *,
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = False,
    limit: int | None = None,
    image_size: int | None = None,
    workers: int | None = None,
    labels: str = "auto",
    stream: str = "auto",
) -> ImageData | ImageStream:
    """Load the ``split`` of the data set named by ``spec`` (see the module doc for the forms).

    root: where ``cifar10`` / ``stl10`` live (default ``$CSL_DATA`` or ``~/.cache/csl/data``); download: fetch
    them if missing. limit: keep a class-balanced first ``limit`` images. image_size: the side images are resized
    and centre-cropped to (``imagefolder:`` default ``DEFAULT_IMAGE_SIZE``; parquet sets default to their own size;
    the torchvision sets keep theirs). workers: a stream's DataLoader workers. labels: ``auto`` (the labels the set
    has) or ``none`` (read it unlabelled). stream: ``auto``, ``on`` or ``off`` for parquet sets (the module doc).
    """
    if not isinstance(spec, str):
        raise TypeError(f"data spec must be a string, got {type(spec).__name__}")
    if labels not in LABEL_MODES:
        raise ValueError(f"unknown labels '{labels}'; choose one of: {', '.join(LABEL_MODES)}")
    if stream not in STREAM_MODES:
        raise ValueError(f"unknown data_stream '{stream}'; choose one of: {', '.join(STREAM_MODES)}")
    kind, sep, path = spec.partition(":")
    if sep and kind == "imagefolder" and path:
        return ImageFolderStream.open(
            path, split=split, image_size=DEFAULT_IMAGE_SIZE if image_size is None else image_size, workers=workers,
            limit=limit, name=f"{spec}/{split}", labels=labels,
        )
    data: ImageData | ParquetStream
    if spec == "cifar10-mini":
        data = _parquet(mini_path(), split=split, limit=limit, name=f"cifar10-mini/{split}", image_size=image_size,
                        stream=stream, workers=workers)
    elif sep and kind == "parquet" and path:
        data = _parquet(path, split=split, limit=limit, name=f"{spec}/{split}", image_size=image_size, stream=stream,
                        workers=workers)
    elif spec in ("cifar10", "stl10", "stl10-unlabeled") and stream == "on":
        raise ValueError(f"data_stream on: {spec} is read into memory (torchvision's files); streaming reads "
                         "parquet:PATH and imagefolder:PATH sets")
    elif spec == "cifar10":
        data = load_cifar10(data_root(root), split=split, download=download, limit=limit)
    elif spec == "stl10":
        data = load_stl10(data_root(root), split=split, download=download, limit=limit)
    elif spec == "stl10-unlabeled":
        if split not in ("train", "unlabeled"):
            raise ValueError(f"stl10-unlabeled is STL-10's unlabeled split alone (split train), not '{split}'; "
                             "evaluate on a labelled set with eval_data (e.g. stl10)")
        data = load_stl10(data_root(root), split="unlabeled", download=download, limit=limit)
        labels = "none"
    else:
        raise ValueError(f"unknown data spec '{spec}'; use one of: {', '.join(SPEC_FORMS)}")
    return data.unlabeled() if labels == "none" else data


def has_labels(spec: str, *, labels: str = "auto", root: str | os.PathLike | None = None) -> bool | None:
    """Whether the training split of ``spec`` has labels, told from the files' structure without reading images.

    ``imagefolder:``: whether its folder has subfolders; ``parquet:``: whether its table has a label column; the
    named sets: by what they are. None where that cannot be told here (the files are missing, the spec unknown):
    loading the data then says what is wrong.
    """
    if labels == "none" or spec == "stl10-unlabeled":
        return False
    kind, sep, path = spec.partition(":")
    try:
        if sep and kind == "imagefolder" and path:
            return has_class_folders(split_folder(path, "train"))
        if sep and kind == "parquet" and path:
            return has_label_column(parquet_file(path, "train"))
    except (OSError, ValueError):
        return None
    return True if spec in ("cifar10-mini", "cifar10", "stl10") else None
