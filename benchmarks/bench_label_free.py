"""What the label-free evaluation costs: its time as a share of an epoch's training time, beside kNN's.

    .venv/bin/python benchmarks/bench_label_free.py                     # the trainer's default data, cifar10-mini
    .venv/bin/python benchmarks/bench_label_free.py --data parquet:../shared/data/cifar10 --samples auto,2048
    .venv/bin/python benchmarks/bench_label_free.py --device cuda --width 1 --batch-size 512
    .venv/bin/python benchmarks/bench_label_free.py --limit 400 --test-limit 100 --samples 16 --repeats 1  # smoke

One ``csl.train.Run`` per held-out size in ``--samples`` (``auto``: the trainer's default, ``label_free_samples:
None``; or a number of images), ``--method`` (default simclr) with a ResNet-18 at ``--width``. Each round trains
one epoch (``epoch_time``: the training steps, as the trainer reports it) and then times the label-free
evaluation (``Run.evaluate_label_free``: the held-out images' clean view and two augmented views through the
encoder, then RankMe, α-ReQ, alignment and uniformity) and the label evaluation (``Run.evaluate_labels``: kNN over
the training set and the test split, and the probe). The share is the label-free time over the epoch's time,
per round (the two ran next to each other, under similar load) and as a ratio of medians. Target: under 5%.
"""

from __future__ import annotations

import argparse

# isort: off
# _common first: it sets OMP_WAIT_POLICY before torch loads OpenMP
from _common import add_common_args, add_network_args, default_width, describe_machine, median, resnet18_summary
from _common import setup, timed
import torch

# isort: on
from csl import data as datasets
from csl.train import Run


def held_out_sizes(text: str) -> list[int | None]:
    """``auto,512`` -> [None, 512]: the trainer's default, then image counts."""
    return [None if item == "auto" else int(item) for item in text.split(",") if item]


def measure(config: dict, data: tuple, repeats: int, device: torch.device) -> dict[str, list[float]]:
    run = Run(config, data=data)
    figures: dict[str, list[float]] = {"epoch": [], "label_free": [], "labels": []}
    print(f"  {len(run.train_data)} training images, {len(run.label_free_data or ())} held out, "
          f"{len(run.eval_train or ())} + {len(run.test_data or ())} for kNN", flush=True)
    for round_ in range(repeats):
        figures["epoch"].append(run.train_epoch()["epoch_time"])
        figures["label_free"].append(timed(device, run.evaluate_label_free))
        figures["labels"].append(timed(device, run.evaluate_labels))
        print(f"  round {round_ + 1}/{repeats}: epoch {figures['epoch'][-1]:.2f} s, label-free "
              f"{figures['label_free'][-1]:.3f} s, kNN + probe {figures['labels'][-1]:.3f} s", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, data=False)
    add_network_args(parser)
    parser.add_argument("--data", default="cifar10-mini", help="csl data spec (default: the trainer's, cifar10-mini)")
    parser.add_argument("--limit", type=int, default=None, help="training images (default: the whole split)")
    parser.add_argument("--test-limit", type=int, default=None, help="kNN queries (default: the whole split)")
    parser.add_argument("--samples", type=held_out_sizes, default=held_out_sizes("auto,512,2048"),
                        help="held-out sizes, comma-separated: auto (the trainer's default) or image counts")
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--width", type=float, default=None, help="ResNet-18 width (default: 1 on GPU, 0.25 CPU)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="epochs (rounds) per held-out size")
    args = parser.parse_args()
    device = setup(args)
    width = default_width(args.width, device)
    print(f"label-free evaluation cost: {describe_machine(device)}")
    print(f"  {args.method}, {resnet18_summary(width)}, batch {args.batch_size}, data {args.data}")
    data = (datasets.load(args.data, split="train", limit=args.limit),
            datasets.load(args.data, split="test", limit=args.test_limit))
    base = {"method": args.method, "encoder": "resnet18", "width": width, "batch_size": args.batch_size,
            "device": str(device), "seed": args.seed, "amp": args.amp, "channels_last": args.channels_last,
            "epochs": args.repeats, "warmup_epochs": 0}
    rows = []
    for size in args.samples:
        print(f"\nlabel_free_samples={'auto' if size is None else size}:", flush=True)
        figures = measure({**base, "label_free_samples": size}, data, args.repeats, device)
        rounds = [lf / ep for lf, ep in zip(figures["label_free"], figures["epoch"], strict=True)]
        rows.append(("auto" if size is None else str(size), median(figures["epoch"]), median(figures["label_free"]),
                     median(figures["labels"]), median(figures["label_free"]) / median(figures["epoch"]), rounds))
    print(f"\n{'held out':>9} {'epoch s':>9} {'label-free s':>13} {'kNN+probe s':>12} {'share':>7}  per round")
    for name, epoch, label_free, labels, share, rounds in rows:
        per_round = " ".join(f"{r:.1%}" for r in rounds)
        print(f"{name:>9} {epoch:9.2f} {label_free:13.3f} {labels:12.3f} {share:7.1%}  {per_round}")


if __name__ == "__main__":
    main()
