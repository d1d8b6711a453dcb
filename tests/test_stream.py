"""Streamed data (csl.data.stream): parquet sets streamed vs in memory, per-worker shards, the data_stream rule."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import csl.data as data_module
from csl.config import resolve
from csl.data import ImageData, ParquetStream, load, mini_path
from csl.registry import ChoiceError
from csl.train import Run
from tests.helpers import tiny

MINI = f"parquet:{mini_path()}"


def epoch(data, batch_size: int, seed: int, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(data.batches(batch_size, torch.Generator().manual_seed(seed), **kwargs))


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == xb.dtype == torch.uint8 and torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("image_size, workers", [(None, 0), (None, 2), (24, 1)])
def test_parquet_streamed_gives_the_in_memory_batches(image_size, workers):
    """The same generator gives the same uint8 batches and labels, in memory or streamed through workers; resized
    sets too (both go through the same decode-and-resize)."""
    memory = load(MINI, limit=96, stream="off", image_size=image_size)
    streamed = load(MINI, limit=96, stream="on", image_size=image_size, workers=workers)
    assert isinstance(memory, ImageData) and isinstance(streamed, ParquetStream)
    assert len(streamed) == 96 and streamed.image_size == memory.image_size == (image_size or 32)
    assert streamed.classes == memory.classes and torch.equal(streamed.labels, memory.labels)
    assert_same_batches(epoch(memory, 16, seed=5), epoch(streamed, 16, seed=5))
    assert_same_batches(list(memory.ordered_batches(40)), list(streamed.ordered_batches(40)))  # last one smaller
    # the subsets a run takes (label-free hold-out) and labels: none stay the same too
    keep = torch.tensor([3, 1, 50, 77, 8, 9, 10, 11])
    assert_same_batches(epoch(memory.subset(keep), 4, seed=1), epoch(streamed.subset(keep), 4, seed=1))
    assert (streamed.unlabeled().labels == -1).all() and streamed.unlabeled().num_classes == 0
    (mean_s, std_s), (mean_m, std_m) = streamed.mean_std(), memory.mean_std()  # under 2048 images: all of them
    assert mean_s == pytest.approx(mean_m, abs=1e-9) and std_s == pytest.approx(std_m, abs=1e-9)


def test_resized_pixels_match_pil(tmp_path):
    """A streamed set of images of several sizes, resized to one side: PIL's antialiased resize and centre crop
    (an independent implementation) within a level or two."""
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 30), (24, 48), (20, 20)]]
    arrays = [np.asarray(Image.fromarray(a).resize((a.shape[1], a.shape[0]), Image.BOX)) for a in arrays]
    blobs = []
    for a in arrays:
        buffer = io.BytesIO()
        Image.fromarray(a).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    pq.write_table(pa.table({"image": pa.array(blobs, pa.binary())}), tmp_path / "train.parquet")
    stream = load(f"parquet:{tmp_path}", stream="on", image_size=16, workers=0)
    images = torch.cat([x for x, _ in stream.ordered_batches(2)])
    for array, image in zip(arrays, images):
        h, w = array.shape[:2]
        scale = 16 / min(h, w)
        size = (round(w * scale), round(h * scale))
        resized = np.asarray(Image.fromarray(array).resize(size, Image.BILINEAR))
        top, left = (size[1] - 16) // 2, (size[0] - 16) // 2
        expected = torch.from_numpy(resized[top : top + 16, left : left + 16].copy()).permute(2, 0, 1)
        assert (image.int() - expected.int()).abs().float().mean() < 1.5
    # without image_size the sizes must agree: one line naming the file
    native = load(f"parquet:{tmp_path}", stream="on", workers=0)
    with pytest.raises(ValueError, match=r"train\.parquet: images differ in size"):
        list(native.ordered_batches(3))


def test_undecodable_row_is_named_by_its_row(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(good, format="JPEG")
    blobs = [good.getvalue()] * 5
    blobs[3] = b"\xff\xd8\xff not a jpeg"
    pq.write_table(pa.table({"image": pa.array(blobs, pa.binary())}), tmp_path / "train.parquet")
    stream = load(f"parquet:{tmp_path}", stream="on", workers=0)
    with pytest.raises(ValueError, match=r"train\.parquet: row 3: not a decodable image"):
        list(stream.ordered_batches(2))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("kind", ["memory", "parquet", "imagefolder"])
@pytest.mark.parametrize("size", [2, 4])
def test_a_shard_is_its_slice_of_every_global_batch(kind, size, image_folder):
    """Worker r of W reads rows r·B/W to (r+1)·B/W of each global batch, in the same global order."""
    if kind == "imagefolder":
        data = load(f"imagefolder:{image_folder}", image_size=12, workers=0)
    else:
        data = load(MINI, limit=40, stream="off" if kind == "memory" else "on", workers=0)
    whole = epoch(data, 8, seed=2)
    per = 8 // size
    for rank in range(size):
        shards = epoch(data, 8, seed=2, shard=(rank, size))
        assert_same_batches(shards, [(x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per])
                                     for x, y in whole])
    with pytest.raises(ValueError, match="batch_size 6 must be divisible by the 4 workers"):
        epoch(data, 6, seed=2, shard=(0, 4))
    with pytest.raises(ValueError, match="drop_last"):
        epoch(data, 8, seed=2, shard=(0, 2), drop_last=False)


def test_data_stream_rule(monkeypatch):
    """auto streams when the decoded set would take over STREAM_SHARE of the memory available; off never; on
    always; the torchvision sets cannot stream; a wrong value names the option and the allowed ones."""
    decoded = 64 * 3 * 32 * 32
    monkeypatch.setattr(data_module, "available_memory", lambda: int(decoded / data_module.STREAM_SHARE) - 1)
    assert isinstance(load("cifar10-mini", limit=64), ParquetStream)
    assert isinstance(load("cifar10-mini", limit=64, stream="off"), ImageData)
    monkeypatch.setattr(data_module, "available_memory", lambda: int(decoded / data_module.STREAM_SHARE) + 1)
    assert isinstance(load("cifar10-mini", limit=64), ImageData)
    assert isinstance(load("cifar10-mini", limit=64, stream="on"), ParquetStream)
    with pytest.raises(ValueError, match="data_stream on: cifar10 is read into memory"):
        load("cifar10", stream="on")
    with pytest.raises(ChoiceError, match="unknown data_stream 'sometimes'; choose one of: auto, on, off"):
        resolve({"method": "simclr", "data_stream": "sometimes"})


def test_a_run_on_streamed_data_trains_as_in_memory():
    """One epoch of SimCLR on cifar10-mini streamed and in memory: the same batches, statistics and views give
    the same losses (to float32 rounding of the normalisation statistics)."""
    losses = {}
    for stream in ("off", "on"):
        run = Run(tiny(method="simclr", data_stream=stream, label_free_samples=0, probe=False))
        assert isinstance(run.train_data, ParquetStream if stream == "on" else ImageData)
        losses[stream] = [float(run.train_step(x, y)) for x, y in run.train_data.batches(16, run.generator)]
        assert 0.0 <= run.evaluate()["knn_acc"] <= 1.0
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-5)
