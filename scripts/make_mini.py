"""Build the embedded default data set ``cifar10-mini`` from the shared CIFAR-10 parquet files.

    python scripts/make_mini.py [--source ../shared/data/cifar10] [--out csl/_data/cifar10-mini]

Takes, from each split in its (already shuffled) file order, the first 500 training and 100 test images of
every class, keeps their JPEG bytes as they are (no re-encoding), their ``label`` and ``source`` columns and
the ``classes`` metadata, and writes ``train.parquet`` (5,000 rows) and ``test.parquet`` (1,000 rows),
zstd-compressed, in the same row order as the source. Re-running gives the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
PER_CLASS = {"train": 500, "test": 100}


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices (ascending) of the first ``per_class`` rows of every label."""
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        keep[np.flatnonzero(labels == label)[:per_class]] = True
    return np.flatnonzero(keep)


def make_split(source: Path, out: Path, split: str, per_class: int) -> pa.Table:
    table = pq.read_table(source / f"{split}.parquet")
    labels = table.column("label").to_numpy()
    rows = first_per_class(labels, per_class)
    counts = np.bincount(labels[rows])
    if len(counts) == 0 or (counts != per_class).any():
        raise SystemExit(f"{split}: expected {per_class} images of every class, got {counts.tolist()}")
    metadata = dict(table.schema.metadata or {})
    metadata[b"csl_mini"] = (
        f"first {per_class} images per class of {split}.parquet of the shared CIFAR-10 copy; JPEG bytes unchanged"
    ).encode()
    mini = table.take(pa.array(rows)).replace_schema_metadata(metadata)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(mini, out / f"{split}.parquet", compression="zstd", compression_level=19)
    return mini


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "cifar10")
    parser.add_argument("--out", type=Path, default=REPO / "csl" / "_data" / "cifar10-mini")
    args = parser.parse_args()
    for split, per_class in PER_CLASS.items():
        mini = make_split(args.source, args.out, split, per_class)
        path = args.out / f"{split}.parquet"
        print(f"{path}: {mini.num_rows} images, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
