"""csl.data: data sets as uint8 tensors (CPU, offline, fast)."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from csl.data import (
    DEFAULT_DATA,
    SPEC_FORMS,
    DataNotFoundError,
    ImageData,
    ImageFolderStream,
    balanced_indices,
    load,
    mini_path,
)

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data" / "cifar10"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def pil_decode(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


# --- cifar10-mini, the embedded default -------------------------------------------------------------------


@pytest.mark.parametrize("split, per_class", [("train", 500), ("test", 100)])
def test_mini_loads_offline_and_balanced(no_network, split, per_class):
    assert DEFAULT_DATA == "cifar10-mini"
    data = load("cifar10-mini", split=split)
    assert isinstance(data, ImageData)
    assert len(data) == 10 * per_class
    assert data.images.dtype == torch.uint8 and data.images.shape == (10 * per_class, 3, 32, 32)
    assert data.labels.dtype == torch.int64 and data.labels.shape == (10 * per_class,)
    assert data.classes == CIFAR10_CLASSES and data.num_classes == 10
    assert torch.bincount(data.labels, minlength=10).tolist() == [per_class] * 10


def test_mini_pixels_match_pil():
    table = pq.read_table(Path(mini_path()) / "train.parquet")
    data = load("cifar10-mini")
    for row in (0, 1, 4999):
        reference = pil_decode(table.column("image")[row].as_py())
        diff = (data.images[row].int() - reference.int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.5
        assert data.labels[row] == table.column("label")[row].as_py()


def test_mini_files_are_small_and_keep_jpeg_bytes():
    for split in ("train", "test"):
        file = Path(mini_path()) / f"{split}.parquet"
        assert file.stat().st_size < 3_000_000
        meta = pq.ParquetFile(file).metadata
        assert meta.row_group(0).column(0).compression == "ZSTD"
        first = pq.read_table(file, columns=["image"]).column("image")[0].as_py()
        assert first[:3] == b"\xff\xd8\xff"


def test_mini_limit_is_balanced():
    data = load("cifar10-mini", split="test", limit=35)
    counts = torch.bincount(data.labels, minlength=10)
    assert len(data) == 35 and counts.max() - counts.min() <= 1


# --- the shared parquet copy ------------------------------------------------------------------------------


@pytest.mark.skipif(not (SHARED / "test.parquet").is_file(), reason="shared CIFAR-10 parquet not present")
def test_shared_parquet_test_split_and_limit():
    full = load(f"parquet:{SHARED}", split="test")
    assert len(full) == 10_000 and full.images.shape == (10_000, 3, 32, 32)
    assert full.classes == CIFAR10_CLASSES
    assert torch.bincount(full.labels).tolist() == [1000] * 10

    subset = load(f"parquet:{SHARED}", split="test", limit=30)
    assert torch.bincount(subset.labels, minlength=10).tolist() == [3] * 10
    # the subset is the first 3 images of each class, in file order
    chosen = torch.cat([torch.nonzero(full.labels == c).flatten()[:3] for c in range(10)]).sort().values
    assert torch.equal(subset.images, full.images[chosen])
    assert torch.equal(subset.labels, full.labels[chosen])


@pytest.mark.skipif(not (SHARED / "test.parquet").is_file(), reason="shared CIFAR-10 parquet not present")
def test_shared_parquet_relative_spec(monkeypatch):
    monkeypatch.chdir(REPO)
    data = load("parquet:../shared/data/cifar10", split="test", limit=20)
    assert len(data) == 20 and data.num_classes == 10


def test_parquet_png_and_jpeg_mixed_without_metadata(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(5)]
    formats = ["PNG", "JPEG", "PNG", "JPEG", "JPEG"]
    blobs = [encode(a, f) for a, f in zip(arrays, formats)]
    table = pa.table({"image": pa.array(blobs, pa.binary()), "label": pa.array([0, 1, 0, 1, 2], pa.int8())})
    pq.write_table(table, tmp_path / "train.parquet")
    data = load(f"parquet:{tmp_path}")
    assert data.images.shape == (5, 3, 8, 8) and data.classes == ["0", "1", "2"]
    for i, blob in enumerate(blobs):
        assert (data.images[i].int() - pil_decode(blob).int()).abs().max() <= 2
    assert torch.equal(data.images[0].permute(1, 2, 0), torch.from_numpy(arrays[0]))  # PNG is lossless

    # the Hugging Face layout: a struct column with the bytes, large_binary offsets, a "labels" column
    struct = pa.StructArray.from_arrays(
        [pa.array(blobs, pa.large_binary()), pa.array([f"{i}.img" for i in range(5)])], names=["bytes", "path"]
    )
    pq.write_table(pa.table({"img": struct, "labels": pa.array([2, 1, None, 1, 0])}), tmp_path / "hf.parquet")
    hf = load(f"parquet:{tmp_path / 'hf.parquet'}", split="test")
    assert torch.equal(hf.images, data.images) and hf.labels.tolist() == [2, 1, -1, 1, 0]

    # a file may be named directly, but not one named after another split
    assert len(load(f"parquet:{tmp_path / 'train.parquet'}")) == 5
    with pytest.raises(ValueError, match="split"):
        load(f"parquet:{tmp_path / 'train.parquet'}", split="test")
    with pytest.raises(FileNotFoundError, match="test.parquet"):
        load(f"parquet:{tmp_path}", split="test")


# --- batches ----------------------------------------------------------------------------------------------


def indexed_data(n: int = 103) -> ImageData:
    """Image i has pixel value i % 256 everywhere and label i, so batches can be traced back."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return ImageData(images=images, labels=torch.arange(n), classes=[str(i) for i in range(n)], name="indexed")


def epoch(data, batch_size: int, seed: int, drop_last: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(data.batches(batch_size, torch.Generator().manual_seed(seed), drop_last=drop_last))


def test_batches_cover_every_image_once():
    data = indexed_data(103)
    batches = epoch(data, 10, seed=0)
    assert [len(y) for _, y in batches] == [10] * 10 + [3]
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == list(range(103))
    for x, y in batches:
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 4, 4)
        assert torch.equal(x[:, 0, 0, 0].long(), y % 256)
    assert labels.tolist() != list(range(103))  # shuffled


def test_batches_drop_last_and_seeds():
    data = indexed_data(103)
    dropped = epoch(data, 10, seed=0, drop_last=True)
    assert [len(y) for _, y in dropped] == [10] * 10
    assert len(list(data.batches(10, torch.Generator().manual_seed(0)))) == 10  # drop_last is the default

    order = lambda seed: torch.cat([y for _, y in epoch(data, 10, seed)])  # noqa: E731
    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))
    assert torch.equal(order(0), torch.randperm(103, generator=torch.Generator().manual_seed(0)))

    generator = torch.Generator().manual_seed(5)  # one generator, successive epochs differ
    first = torch.cat([y for _, y in data.batches(10, generator, drop_last=False)])
    second = torch.cat([y for _, y in data.batches(10, generator, drop_last=False)])
    assert not torch.equal(first, second)


def test_ordered_batches_keep_order_and_last():
    data = indexed_data(25)
    batches = list(data.ordered_batches(10))
    assert [len(y) for _, y in batches] == [10, 10, 5]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(25))


def test_mean_std_and_to():
    data = load("cifar10-mini", split="test")
    mean, std = data.mean_std()
    x = data.images.double() / 255
    assert np.allclose(mean, x.mean(dim=(0, 2, 3)).tolist(), atol=1e-6)
    assert np.allclose(std, x.std(dim=(0, 2, 3), correction=0).tolist(), atol=1e-6)
    moved = data.to("cpu")
    assert isinstance(moved, ImageData) and moved.images.device.type == "cpu" and len(moved) == len(data)


def test_balanced_indices():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    assert balanced_indices(labels, 4).tolist() == [0, 1, 3, 5]
    assert balanced_indices(labels, 3).tolist() == [0, 3, 5]
    assert balanced_indices(labels, None).tolist() == list(range(6))
    assert balanced_indices(torch.full((5,), -1), 2).tolist() == [0, 1]  # unlabelled: simply the first


# --- imagefolder ------------------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(3):
            array = rng.integers(0, 256, (20 + 4 * i, 24, 3), dtype=np.uint8)  # sizes differ
            Image.fromarray(array).save(tmp_path / "train" / c / f"{i}.png")
    return tmp_path


@pytest.mark.parametrize("workers", [0, 1])
def test_imagefolder_stream(image_folder, workers):
    stream = load(f"imagefolder:{image_folder}", image_size=16, workers=workers)
    assert isinstance(stream, ImageFolderStream)
    assert len(stream) == 6 and stream.classes == ["cat", "dog"] and stream.num_classes == 2
    assert stream.labels.tolist() == [0, 0, 0, 1, 1, 1]
    batches = list(stream.batches(4, torch.Generator().manual_seed(0), drop_last=False))
    assert [x.shape for x, _ in batches] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    assert all(x.dtype == torch.uint8 and y.dtype == torch.int64 for x, y in batches)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == [0, 0, 0, 1, 1, 1]
    assert len(list(stream.batches(4, torch.Generator().manual_seed(0)))) == 1  # drop_last
    ordered = list(stream.ordered_batches(4))
    assert torch.equal(torch.cat([y for _, y in ordered]), stream.labels)
    mean, std = stream.mean_std()
    assert all(0 < m < 1 for m in mean) and all(0 < s < 1 for s in std)


def test_imagefolder_splits_and_limit(image_folder):
    direct = load(f"imagefolder:{image_folder / 'train'}", workers=0, limit=2)
    assert direct.labels.tolist() == [0, 1] and direct.image_size == 96
    with pytest.raises(FileNotFoundError, match="test"):
        load(f"imagefolder:{image_folder}", split="test")


# --- errors -----------------------------------------------------------------------------------------------


def test_cifar10_missing_says_how_to_get_it(tmp_path, no_network):
    with pytest.raises(DataNotFoundError) as caught:
        load("cifar10", root=str(tmp_path / "nowhere"), download=False)
    message = str(caught.value)
    assert "--download" in message and "parquet:" in message and "nowhere" in message
    assert isinstance(caught.value, FileNotFoundError)


def test_cifar10_default_root_from_env(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("CSL_DATA", str(tmp_path / "envroot"))
    with pytest.raises(DataNotFoundError, match="envroot"):
        load("cifar10", split="test")


def test_stl10_missing(tmp_path, no_network):
    with pytest.raises(DataNotFoundError, match="--download"):
        load("stl10", root=str(tmp_path), split="unlabeled")
    with pytest.raises(ValueError, match="train\\+unlabeled"):
        load("stl10", root=str(tmp_path), split="validation")


@pytest.mark.parametrize("spec", ["imagenet", "parquet:", "cifar10-mini:x", "folder:/tmp", ""])
def test_unknown_spec_lists_forms(spec):
    with pytest.raises(ValueError) as caught:
        load(spec)
    message = str(caught.value)
    assert repr(spec) in message or f"'{spec}'" in message
    for form in SPEC_FORMS:
        assert form in message
