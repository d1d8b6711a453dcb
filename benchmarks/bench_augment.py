"""SimCLR augmentation throughput: the batched pipeline against torchvision v2 image by image in a DataLoader.

    .venv/bin/python benchmarks/bench_augment.py            # from the repository root
    .venv/bin/python benchmarks/bench_augment.py --data PATH --limit 5000 --batch-size 256 --epochs 3 --threads 1,2
    .venv/bin/python benchmarks/bench_augment.py --device cuda --threads 1      # ours on a GPU, where there is one

Both sides start from the same decoded uint8 images (the first ``--limit`` of CIFAR-10's train split; decoding is
not timed), make two SimCLR views of every image at 32×32 and normalise them:

- ours: ``AUGMENT.build("simclr")`` on whole shuffled batches in the main process, once per ``--threads`` value
  (``torch.set_num_threads``; 2 is this machine's cores, the same CPUs the two workers get, and 1 is shown too);
- torchvision: RandomResizedCrop, RandomHorizontalFlip, RandomApply(ColorJitter(0.8, 0.8, 0.8, 0.2), p=0.8),
  RandomGrayscale(0.2), RandomApply(GaussianBlur(3, (0.1, 2.0)), p=0.5), ToDtype, Normalize on uint8 tensors, twice
  per image, in a DataLoader with 2 persistent workers (each single-threaded, as DataLoader sets them).

Each side runs one untimed warm-up epoch, then ``--epochs`` timed ones, the sides taking turns epoch by epoch so
that they see the same spells of load; the best epoch of each is reported (other work on the machine only ever
slows an epoch down). The load average is printed with the figures.

OpenMP's wait policy is left as the environment sets it, as a user's own script would have it. On an idle
machine OpenMP's default (libgomp: spin briefly, then sleep) is the one that lets two threads pay: measured here,
2 threads 12,800-14,600 images/s with the default (10.5-11.7x torchvision's 1,170-1,300), 4,200-4,400 with
``OMP_WAIT_POLICY=PASSIVE`` (every one of the many small ops then wakes a sleeping thread: 3.8-4.1x), 1 thread
7,600-8,500 either way (6.3-6.8x). On a busy machine set ``OMP_WAIT_POLICY=PASSIVE``: spinning threads then wait
at every op's barrier for a thread that is not running (measured at a load average of 4-7: 2 threads spinning
400-1,700 images/s, passive 4,200-7,200, 1 thread 8,900-10,000). ``OMP_WAIT_POLICY=ACTIVE`` (spin without end)
takes the cores from torchvision's workers between our epochs and must not be used here. The policy does not
touch torchvision's single-threaded workers. The 2-thread line is the like-for-like comparison (the same two
cores as the two workers); the 1-thread line is the conservative one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision.io import decode_jpeg  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere, without installing the package

import csl.augment  # noqa: E402, F401  (registers the pipelines)
from csl.registry import AUGMENT  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10" / "train.parquet"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
SIZE = 32


def load_images(path: Path, limit: int) -> torch.Tensor:
    blobs = pq.read_table(path, columns=["image"]).slice(0, limit).column("image").to_pylist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.stack([decode_jpeg(torch.tensor(bytearray(blob), dtype=torch.uint8)) for blob in blobs])


def torchvision_transform() -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomResizedCrop(SIZE),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 2.0))], p=0.5),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(MEAN), list(STD)),
        ]
    )


class TwoViews(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.transform = torchvision_transform()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        return self.transform(image), self.transform(image)


Epoch = Callable[[], None]


def ours_epoch(images: torch.Tensor, batch_size: int, threads: int, seed: int) -> Epoch:
    """Our pipeline on whole batches, on the images' device (uint8 there, as the trainer holds them)."""
    # the ImageNet recipe the torchvision side runs (at 32 px the pipeline's own defaults are SimCLR's CIFAR ones)
    pipeline = AUGMENT.build("simclr", image_size=SIZE, mean=MEAN, std=STD, jitter_strength=1.0, blur_prob=0.5)
    generator = torch.Generator(device=images.device).manual_seed(seed)

    def run_epoch() -> None:
        torch.set_num_threads(threads)
        order = torch.randperm(len(images), generator=generator, device=images.device)
        for start in range(0, len(images), batch_size):
            first, second = pipeline(images[order[start : start + batch_size]], generator)
            assert first.shape[1:] == (3, SIZE, SIZE)
        if images.is_cuda:
            torch.cuda.synchronize(images.device)

    return run_epoch


def torchvision_epoch(images: torch.Tensor, batch_size: int, workers: int) -> Epoch:
    loader = DataLoader(
        TwoViews(images), batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )

    def run_epoch() -> None:
        for first, second in loader:
            assert first.shape[1:] == (3, SIZE, SIZE)

    return run_epoch


def best_rates(epochs: dict[str, Epoch], rounds: int, count: int) -> dict[str, float]:
    """images/s of each side's best epoch; the sides take turns, so each sees the same spells of load."""
    for run_epoch in epochs.values():
        run_epoch()  # warm-up (and the DataLoader workers' start)
    best = {name: float("inf") for name in epochs}
    for _ in range(rounds):
        for name, run_epoch in epochs.items():
            start = time.perf_counter()
            run_epoch()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: count / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 train parquet (JPEG column 'image')")
    parser.add_argument("--limit", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs of each side, taken in turns")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for torchvision")
    parser.add_argument("--threads", default="1,2", help="torch threads for ours, comma-separated")
    parser.add_argument("--device", default="cpu", help="where ours runs: cpu (the comparison above) or cuda")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)  # the DataLoader's shuffling
    images = load_images(args.data, args.limit)
    on_device = images.to(args.device)
    where = "" if on_device.device.type == "cpu" else f" on {on_device.device}"
    epochs = {
        f"ours, batched{where}, {t} thread{'s' if t > 1 else ''}:": ours_epoch(on_device, args.batch_size, t, args.seed)
        for t in (int(t) for t in args.threads.split(","))
    }
    torchvision_label = f"torchvision v2, per image, {args.workers} DataLoader workers:"
    epochs[torchvision_label] = torchvision_epoch(images, args.batch_size, args.workers)
    load_before = os.getloadavg()[0]
    rates = best_rates(epochs, args.epochs, len(images))
    theirs = rates.pop(torchvision_label)
    print(f"{len(images)} images, batch {args.batch_size}, two views at {SIZE}x{SIZE}, best of {args.epochs} epochs")
    print(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY') or 'unset (the OpenMP default)'}")
    for label, rate in rates.items():
        print(f"{label:<50}{rate:9.0f} images/s   {rate / theirs:5.1f}x torchvision")
    print(f"{torchvision_label:<50}{theirs:9.0f} images/s")


if __name__ == "__main__":
    main()
