"""Image sets stored as parquet: one row per image, the encoded image bytes and an integer label.

Columns: the image is the first of ``image``/``img``/``jpeg``/``png``/``bytes`` that exists, either binary or a
struct with a ``bytes`` field (the Hugging Face layout); the label is the first of ``label``/``labels``/``target``
(absent: every label is -1). Schema metadata ``classes`` (comma-separated names) names the classes.

Decoding is batched: JPEGs go through ``torchvision.io.decode_jpeg`` on a list of tensors, in chunks over a
small thread pool (it releases the GIL); other formats (PNG, ...) through ``decode_image`` one by one.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from csl.data.image_data import ImageData, balanced_indices

IMAGE_COLUMNS = ("image", "img", "jpeg", "png", "bytes")
LABEL_COLUMNS = ("label", "labels", "target")
SPLIT_NAMES = ("train", "test", "val", "valid", "validation", "unlabeled")
_JPEG_MAGIC = b"\xff\xd8\xff"
_CHUNK = 4096


@contextmanager
def quiet_image_io() -> Iterator[None]:
    """Silence torchvision 0.29's deprecation notice for ``torchvision.io`` image decoding (TorchCodec is its
    successor; it is not a dependency here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
        yield


def parquet_file(path: str | os.PathLike, split: str) -> Path:
    """The parquet file of ``split`` under ``path``: ``path/{split}.parquet``, or ``path`` itself if a file.

    A file named after another split (``test.parquet`` when ``split="train"``) is refused rather than silently
    used for both splits.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        file = path / f"{split}.parquet"
        if not file.is_file():
            found = sorted(p.name for p in path.glob("*.parquet"))
            raise FileNotFoundError(
                f"no {split}.parquet in {path} (found: {', '.join(found) or 'no parquet files'})"
            )
        return file
    if path.is_file():
        if path.stem in SPLIT_NAMES and path.stem != split:
            raise ValueError(
                f"{path} is the '{path.stem}' split but split '{split}' was asked for; "
                f"give the folder (parquet:{path.parent}) to choose splits by name"
            )
        return path
    raise FileNotFoundError(f"no parquet file or folder at {path}")


def _pick(names: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in names), None)


def _bytes_array(column: pa.ChunkedArray) -> pa.Array:
    """One contiguous binary array (int32 or int64 offsets) from an image column."""
    array = column.combine_chunks()
    if pa.types.is_struct(array.type):  # {"bytes": ..., "path": ...}
        if array.type.get_field_index("bytes") < 0:
            raise ValueError(f"image column is a struct without a 'bytes' field: {array.type}")
        array = array.flatten()[array.type.get_field_index("bytes")]
    if not (pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type)):
        try:  # binary_view and the like
            array = array.cast(pa.large_binary())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise ValueError(f"image column must hold encoded image bytes, got type {array.type}") from err
    if array.null_count:
        raise ValueError(f"image column has {array.null_count} missing images")
    return array


def bytes_and_offsets(array: pa.Array) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """Every image's bytes in one copied uint8 buffer, the int64 offsets (image i is ``data[o[i]:o[i+1]]``), and
    which images are JPEGs."""
    offset_type = np.int64 if pa.types.is_large_binary(array.type) else np.int32
    _, offsets_buf, data_buf = array.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=offset_type)[array.offset : array.offset + len(array) + 1]
    offsets = offsets.astype(np.int64)
    start, stop = int(offsets[0]), int(offsets[-1])
    data = torch.from_numpy(np.frombuffer(data_buf, dtype=np.uint8)[start:stop].copy())
    offsets -= start
    return data, offsets, _is_jpeg(data.numpy(), offsets)


def _to_tensors(array: pa.Array) -> tuple[list[Tensor], np.ndarray]:
    """One uint8 tensor per image, all views of a single copied buffer; and which of them are JPEGs."""
    data, offsets, is_jpeg = bytes_and_offsets(array)
    bounds = offsets.tolist()
    return [data[bounds[i] : bounds[i + 1]] for i in range(len(array))], is_jpeg


def _is_jpeg(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Which byte ranges ``data[offsets[i]:offsets[i+1]]`` start with the JPEG marker, without a Python loop."""
    starts, lengths = offsets[:-1], np.diff(offsets)
    is_jpeg = lengths >= len(_JPEG_MAGIC)
    if not len(data):
        return is_jpeg
    for k, byte in enumerate(_JPEG_MAGIC):
        is_jpeg &= data[np.minimum(starts + k, len(data) - 1)] == byte
    return is_jpeg


def _undecodable(encoded: list[Tensor], start: int, where: str, error: Exception,
                 rows: list[int] | None = None) -> ValueError:  # fmt: skip
    """The first image of a chunk that does not decode, named by row (the batched decoder does not say which);
    ``rows``: the file's row of each image, where they are not their positions."""
    for i in range(start, len(encoded)):
        try:
            with quiet_image_io():
                decode_image(encoded[i], mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return ValueError(f"{where}row {i if rows is None else rows[i]}: not a decodable image ({first[:200]})")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ValueError(f"{where}rows {start}-{len(encoded) - 1}: images do not decode ({first[:200]})")


def decode_images(encoded: list[Tensor], *, is_jpeg: np.ndarray | None = None, threads: int | None = None,
                  where: str = "") -> Tensor:  # fmt: skip
    """Decode encoded images (uint8 byte tensors) to one uint8 N×3×H×W tensor; all must share one size.

    ``is_jpeg`` (bool per image) marks those that go to the batched JPEG decoder; found from the bytes if None.
    ``where`` (e.g. ``"FILE: "``) starts the message of an image that does not decode, which names its row.
    """
    n = len(encoded)
    if is_jpeg is None:
        is_jpeg = np.array([bytes(t[: len(_JPEG_MAGIC)].numpy()) == _JPEG_MAGIC for t in encoded], dtype=bool)
    if n == 0:
        raise ValueError("no images to decode")
    try:
        with quiet_image_io():
            first = decode_image(encoded[0], mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        raise _undecodable(encoded, 0, where, exc) from None
    out = torch.empty((n, *first.shape), dtype=torch.uint8)

    def decode_chunk(start: int) -> None:
        try:
            decode_into(start)
        except RuntimeError as exc:
            raise _undecodable(encoded, start, where, exc) from None

    def decode_into(start: int) -> None:
        part = encoded[start : start + _CHUNK]
        jpeg = is_jpeg[start : start + len(part)]
        if jpeg.all():
            images = decode_jpeg(part, mode=ImageReadMode.RGB)
        else:  # JPEGs batched, the rest (PNG, ...) one by one
            images = [None if j else decode_image(t, mode=ImageReadMode.RGB) for t, j in zip(part, jpeg)]
            where = np.flatnonzero(jpeg).tolist()
            if where:
                for i, image in zip(where, decode_jpeg([part[i] for i in where], mode=ImageReadMode.RGB)):
                    images[i] = image
        shapes = {tuple(im.shape) for im in images}
        if shapes != {tuple(first.shape)}:
            raise ValueError(
                f"images differ in size ({sorted(shapes)} vs {tuple(first.shape)}); parquet sets must hold "
                "images of one size (use imagefolder:PATH with image_size to resize)"
            )
        torch.stack(images, out=out[start : start + len(part)])

    threads = threads or min(4, os.cpu_count() or 1)
    starts = range(0, n, _CHUNK)
    with quiet_image_io():
        if threads <= 1 or n <= _CHUNK:
            for s in starts:
                decode_chunk(s)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(decode_chunk, starts))
    return out


def has_label_column(file: str | os.PathLike) -> bool:
    """Whether a parquet image table has a label column (read from its schema alone)."""
    return _pick(pq.read_schema(file).names, LABEL_COLUMNS) is not None


@dataclass
class ParquetTable:
    """What a parquet image set holds, read but not decoded: its kept rows' encoded bytes, labels and classes."""

    file: Path
    encoded: pa.Array  # binary, one encoded image per kept row
    labels: Tensor
    classes: list[str]


def read_parquet(path: str | os.PathLike, *, split: str = "train", limit: int | None = None) -> ParquetTable:
    """The ``split`` of a parquet image set (see the module doc), its images left encoded, cut to ``limit``."""
    file = parquet_file(path, split)
    try:
        schema = pq.read_schema(file)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{file}: not a readable parquet file ({str(exc).strip().splitlines()[0][:200]})") from None
    image_col = _pick(schema.names, IMAGE_COLUMNS)
    if image_col is None:
        raise ValueError(f"{file}: no image column (looked for {', '.join(IMAGE_COLUMNS)}; has {schema.names})")
    label_col = _pick(schema.names, LABEL_COLUMNS)
    table = pq.read_table(file, columns=[image_col] + ([label_col] if label_col else []))
    if label_col:
        column = table.column(label_col)
        if not pa.types.is_integer(column.type):
            raise ValueError(f"{file}: label column '{label_col}' must hold integers, got {column.type}")
        labels = torch.from_numpy(column.fill_null(-1).to_numpy().astype(np.int64))  # missing label: -1
    else:
        labels = torch.full((table.num_rows,), -1, dtype=torch.int64)

    keep = balanced_indices(labels, limit)
    images_array = _bytes_array(table.column(image_col))
    if len(keep) < len(labels):
        images_array = images_array.take(pa.array(keep.numpy()))
        labels = labels[keep]
    if len(images_array) == 0:
        raise ValueError(f"{file}: no images" + (f" (limit={limit})" if limit is not None else ""))

    metadata = schema.metadata or {}
    if b"classes" in metadata:
        classes = [c.strip() for c in metadata[b"classes"].decode().split(",")]
    else:
        classes = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    if len(labels) and int(labels.max()) >= len(classes):
        raise ValueError(f"{file}: label {int(labels.max())} but only {len(classes)} classes in its metadata")
    return ParquetTable(file=file, encoded=images_array, labels=labels, classes=classes)


def decode_rows(encoded: list[Tensor], is_jpeg: np.ndarray, *, size: int | None, rows: list[int] | None = None,
                where: str = "", device: torch.device | str = "cpu") -> Tensor:  # fmt: skip
    """Decode a batch of encoded images to uint8 N×3×S×S, each resized and centre-cropped to ``size``
    (``csl.data.stream.ResizeCrop``); with ``size`` None they keep their size, which all must share.

    What a streamed parquet set's workers do to every batch, and what the in-memory set does with ``image_size``,
    so that both give the same pixels. ``device`` cuda: the JPEGs (all must be) are decoded on the GPU in one call
    and resized there. ``rows`` names the images in messages (default: their positions).
    """
    from csl.data.stream import ResizeCrop

    on_gpu = torch.device(device).type == "cuda"
    try:
        with quiet_image_io():
            if on_gpu:
                images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
            elif is_jpeg.all():
                images = decode_jpeg(encoded, mode=ImageReadMode.RGB)
            else:
                images = [None if j else decode_image(t, mode=ImageReadMode.RGB) for t, j in zip(encoded, is_jpeg)]
                jpegs = np.flatnonzero(is_jpeg).tolist()
                for i, image in zip(jpegs, decode_jpeg([encoded[i] for i in jpegs], mode=ImageReadMode.RGB)
                                    if jpegs else []):
                    images[i] = image
    except RuntimeError as exc:
        raise _undecodable(encoded, 0, where, exc, rows) from None
    if size is not None:
        resize = ResizeCrop(size)
        shapes = {tuple(im.shape) for im in images}
        if on_gpu and len(shapes) == 1:  # one call for the batch (a GPU's launches cost more than its arithmetic)
            return resize(torch.stack(images))
        return torch.stack([resize(im) for im in images])
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(
            f"{where}images differ in size ({sorted(shapes)}); a parquet set without image_size must hold images "
            "of one size (give image_size to resize them)"
        )
    return torch.stack(images)


def load_parquet(
    path: str | os.PathLike, *, split: str = "train", limit: int | None = None, name: str = "",
    image_size: int | None = None,
) -> ImageData:
    """The ``split`` of a parquet image set (see the module doc), decoded whole into an ``ImageData``.

    ``image_size``: every image resized and centre-cropped to that side, as a streamed set does (``decode_rows``);
    None keeps the images' own size, which all must share.
    """
    table = read_parquet(path, split=split, limit=limit)
    encoded, is_jpeg = _to_tensors(table.encoded)
    where = f"{table.file}: "
    if image_size is None:
        images = decode_images(encoded, is_jpeg=is_jpeg, where=where)
    else:
        images = torch.empty((len(encoded), 3, image_size, image_size), dtype=torch.uint8)
        for start in range(0, len(encoded), _CHUNK):
            stop = min(start + _CHUNK, len(encoded))
            images[start:stop] = decode_rows(encoded[start:stop], is_jpeg[start:stop], size=image_size,
                                             rows=list(range(start, stop)), where=where)
    return ImageData(images=images, labels=table.labels, classes=table.classes, name=name or f"parquet:{table.file}")
