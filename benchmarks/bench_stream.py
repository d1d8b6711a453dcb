"""Does data loading keep up? Images/s of the streamed data paths beside the in-memory one and the model's own step.

For each image side in ``--sizes`` (default 96 and 224: STL-10's and ImageNet's), on the shared CIFAR-10 (JPEG
bytes in parquet, resized up as a stream resizes ``imagefolder:`` sets to ``image_size``):

- in memory: ``ImageData.batches`` over the set decoded and resized beforehand (what ``data_stream: off`` does);
- parquet streamed: ``ParquetStream.batches`` (``data_stream: on``), ``--workers`` DataLoader workers decoding and
  resizing; on a GPU also with the batches decoded on the device (nvJPEG) and resized there;
- imagefolder streamed: ``ImageFolderStream.batches`` over a temporary folder of ``--folder-images`` of the same
  JPEG files (written byte for byte, one file each);
- model step: ``Run.train_step`` of SimCLR (ResNet-18 with the ImageNet stem, as for images of this size, at
  ``--width``) on uint8 batches already in memory: what the data path has to keep up with.

A data path's figure is images per second over whole epochs of ``--images`` images (DataLoader start-up
included: a stream starts its workers every epoch), the median of ``--repeats``; its ratio to the model step says
whether it keeps up (above 1) or starves the step (below 1). The step's images/s counts the images of a batch,
not their two views.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from _common import DEFAULT_DATA, describe_machine, median, sync  # sets OMP_WAIT_POLICY first

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from csl import data as datasets  # noqa: E402
from csl.data.parquet import parquet_file  # noqa: E402
from csl.data.stream import default_workers  # noqa: E402
from csl.train import Run  # noqa: E402


def epoch_rate(data: Any, batch_size: int, device: torch.device, repeats: int) -> list[float]:
    """Images/s of whole shuffled epochs of ``data.batches`` (batches on ``device``), one figure per repeat."""
    rates = []
    for repeat in range(repeats):
        generator = torch.Generator().manual_seed(repeat)
        sync(device)
        start = time.perf_counter()
        seen = 0
        for images, _ in data.batches(batch_size, generator):
            seen += images.shape[0]
        sync(device)
        rates.append(seen / (time.perf_counter() - start))
    return rates


def step_rate(memory: Any, *, width: float, batch_size: int, device: torch.device, steps: int, repeats: int
              ) -> list[float]:  # fmt: skip
    """Images/s of SimCLR's ``Run.train_step`` on batches of the in-memory set, after one untimed step."""
    config = {"method": "simclr", "encoder": "resnet18", "stem": "imagenet", "width": width, "batch_size": batch_size,
              "device": str(device), "label_free_samples": 0, "probe": False, "epochs": 1}
    run = Run(config, data=(memory, None))
    batches = [(x.to(device), y.to(device)) for x, y in memory.batches(batch_size, torch.Generator().manual_seed(0))]
    run.train_step(*batches[0])
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for i in range(steps):
            run.train_step(*batches[i % len(batches)])
        sync(device)
        rates.append(steps * batch_size / (time.perf_counter() - start))
    return rates


def write_folder(spec: str, count: int, root: Path) -> Path:
    """``count`` of the set's JPEGs as files ``root/<label>/<row>.jpg``, their bytes as stored (no re-encoding)."""
    table = pq.read_table(parquet_file(spec.partition(":")[2], "train"), columns=["image", "label"]).slice(0, count)
    images, labels = table.column("image").to_pylist(), table.column("label").to_pylist()
    for row, (image, label) in enumerate(zip(images, labels)):
        blob = image["bytes"] if isinstance(image, dict) else image
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{row}.jpg").write_bytes(blob)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="a parquet: set of JPEGs (default: the shared CIFAR-10)")
    parser.add_argument("--sizes", default="96,224", help="image sides, comma-separated (default 96,224)")
    parser.add_argument("--images", type=int, default=2048, help="images per timed epoch of each data path")
    parser.add_argument("--folder-images", type=int, default=2048, help="images copied into the imagefolder")
    parser.add_argument("--batch-size", type=int, default=256, help="batch of the data paths (default 256)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="DataLoader workers of the streams (default: the trainer's, min(8, cores))")
    parser.add_argument("--width", type=float, default=0.25, help="the model step's ResNet-18 width (default 0.25)")
    parser.add_argument("--step-batch", type=int, default=64, help="the model step's batch (default 64)")
    parser.add_argument("--steps", type=int, default=3, help="timed model steps per repeat (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="repeats of each figure; the median is printed")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of this process")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    sizes = [int(s) for s in args.sizes.split(",")]

    print(f"bench_stream: {args.data}, {args.images} images per epoch, batch {args.batch_size}, "
          f"{args.workers} DataLoader workers")
    print(f"machine: {describe_machine(device)}")
    print(f"model step: SimCLR, ResNet-18 (ImageNet stem) width x{args.width:g}, batch {args.step_batch}, "
          f"on {device}")
    results: list[tuple[int, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        folder = write_folder(args.data, args.folder_images, Path(tmp))
        for size in sizes:
            memory = datasets.load(args.data, limit=args.images, image_size=size, stream="off").to(device)
            streamed = datasets.load(args.data, limit=args.images, image_size=size, stream="on",
                                     workers=args.workers)
            on_folder = datasets.load(f"imagefolder:{folder}", image_size=size, workers=args.workers)
            paths: list[tuple[str, Any]] = [("in memory (ImageData)", memory)]
            if device.type == "cuda":
                paths.append(("parquet streamed, decoded on GPU", streamed.to(device)))
                paths.append(("parquet streamed, decoded on CPU", replace(streamed, device_decode=False).to(device)))
            else:
                paths.append(("parquet streamed", streamed))
            paths.append((f"imagefolder streamed ({len(on_folder)})", on_folder.to(device)))
            for name, data in paths:
                rate = median(epoch_rate(data, args.batch_size, device, args.repeats))
                results.append((size, name, rate))
                print(f"  {size:>4} px  {name:<34} {rate:10.1f} images/s", flush=True)
            step = median(step_rate(memory, width=args.width, batch_size=args.step_batch, device=device,
                                    steps=args.steps, repeats=args.repeats))
            results.append((size, "model step", step))
            print(f"  {size:>4} px  {'model step':<34} {step:10.1f} images/s", flush=True)

    print()
    print("| size | path | images/s | x model step |")
    print("|---|---|---|---|")
    for size in sizes:
        step = next(rate for s, name, rate in results if s == size and name == "model step")
        for s, name, rate in results:
            if s == size:
                print(f"| {size} | {name} | {rate:.1f} | {rate / step:.2f} |")


if __name__ == "__main__":
    main()
