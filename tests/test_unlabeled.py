"""Unlabelled data: the data forms that have no labels.

The unlabelled folder is made here: 40 random 32×32 PNGs directly under one folder (no class subfolders).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from csl.data import DataNotFoundError, has_labels, is_labelled, load


def save_images(folder: Path, count: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("flat")
    save_images(folder, 40)
    return folder


def test_a_folder_without_subfolders_is_unlabelled(flat_folder: Path) -> None:
    stream = load(f"imagefolder:{flat_folder}", workers=0, image_size=16)
    assert len(stream) == 40 and stream.classes == [] and stream.num_classes == 0
    assert stream.labels.tolist() == [-1] * 40 and not is_labelled(stream)
    images, labels = next(iter(stream.ordered_batches(8)))
    assert images.shape == (8, 3, 16, 16) and labels.tolist() == [-1] * 8
    assert has_labels(f"imagefolder:{flat_folder}") is False
    few = stream.subset(torch.tensor([0, 5, 7]))
    assert len(few) == 3 and few.indices.tolist() == [0, 5, 7] and few.labels.tolist() == [-1] * 3


def test_nested_folders_that_are_not_classes_with_labels_none(tmp_path: Path) -> None:
    save_images(tmp_path / "site_a" / "2024", 3)
    save_images(tmp_path / "site_b", 2, seed=1)
    (tmp_path / "site_b" / "notes.txt").write_text("not an image")
    as_classes = load(f"imagefolder:{tmp_path}", workers=0)
    assert as_classes.classes == ["site_a", "site_b"] and as_classes.labels.tolist() == [0, 0, 0, 1, 1]
    unlabelled = load(f"imagefolder:{tmp_path}", workers=0, labels="none")
    assert len(unlabelled) == 5 and unlabelled.classes == [] and unlabelled.labels.tolist() == [-1] * 5
    assert has_labels(f"imagefolder:{tmp_path}") is True
    assert has_labels(f"imagefolder:{tmp_path}", labels="none") is False
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images in .*empty"):
        load(f"imagefolder:{empty}", labels="none")


def test_parquet_without_labels_and_labels_none(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(6):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    pq.write_table(pa.table({"image": pa.array(encoded, pa.binary())}), tmp_path / "train.parquet")
    data = load(f"parquet:{tmp_path}")
    assert data.labels.tolist() == [-1] * 6 and data.classes == [] and not is_labelled(data)
    assert has_labels(f"parquet:{tmp_path}") is False
    mini = load("cifar10-mini", limit=20, labels="none")
    assert mini.labels.tolist() == [-1] * 20 and mini.classes == [] and len(mini) == 20
    assert has_labels("cifar10-mini") is True and has_labels("cifar10-mini", labels="none") is False
    assert has_labels("parquet:/nonexistent/csl-test") is None  # cannot tell: loading it will say why
    with pytest.raises(ValueError, match="unknown labels 'no'"):
        load("cifar10-mini", labels="no")


def test_stl10_unlabeled_is_its_own_spec(tmp_path: Path) -> None:
    assert has_labels("stl10-unlabeled") is False and has_labels("stl10") is True
    with pytest.raises(DataNotFoundError, match="STL-10 not found"):
        load("stl10-unlabeled", root=str(tmp_path))
    with pytest.raises(ValueError, match="eval_data"):
        load("stl10-unlabeled", split="test", root=str(tmp_path))
