"""Wall-clock time until SimCLR's kNN accuracy reaches a target, with our trainer on the shared CIFAR-10.

    .venv/bin/python benchmarks/bench_time_to_accuracy.py --device cuda --epochs 100 --target 0.80   # H100: <= 15 min
    .venv/bin/python benchmarks/bench_time_to_accuracy.py --device cpu --width 0.125 --train-limit 2048 \
        --test-limit 512 --epochs 2 --eval-every 1 --batch-size 256                       # a CPU check of the script

The clock starts before the data is decoded and runs through model building, compilation (``--compile``), every
training epoch and every evaluation: the figure is what a user waits for. kNN (k 200, temperature 0.1, the bank
is the whole training set's pooled vectors on un-augmented images) is measured every ``--eval-every`` epochs;
the script prints a line per evaluation and the first time the target is met, and stops there with
``--stop-at-target`` (the learning rate schedule still spans ``--epochs``, as in a run that is not stopped).

The recipe is lightly's CIFAR-10 benchmark for SimCLR (lightly 1.6 ``benchmarks/imagenette``/``cifar10``
scripts: ResNet-18 with a CIFAR stem, batch 512, SGD lr 0.06 x batch/128, momentum 0.9, weight decay 5e-4, cosine
schedule over the epochs without warm-up, NT-Xent at temperature 0.5, projection head 512 -> 512 -> 128 with
lightly's layers (ours ``mlp_bn``: a BatchNorm after the last layer too; ``--head mlp`` for the preset's), colour
jitter strength 0.5, no blur), so the accuracy can be set beside the figures that benchmark publishes. The shared
CIFAR-10 copy is JPEG-compressed; its accuracies run 2-3 points under the original's (``../shared/data/README.md``).
"""

from __future__ import annotations

import argparse
import json
import time

# isort: off
# _common first: it sets OMP_WAIT_POLICY before torch loads OpenMP
from _common import add_common_args, describe_machine, load_pair, resnet18_summary, setup, sync
from csl.encoders._common import scaled
from csl.extract.heads import HEADS
from csl.train import Run

# isort: on


def recipe(args: argparse.Namespace, device: str) -> dict:
    """Our flat config for lightly's CIFAR-10 SimCLR benchmark recipe (see the module docstring)."""
    return {
        "method": "simclr", "encoder": "resnet18", "head": args.head, "width": args.width,
        "batch_size": args.batch_size,
        "proj_hidden": scaled(512, args.width), "proj_dim": scaled(128, args.width), "temperature": args.temperature,
        "optimizer": "sgd", "lr": args.lr if args.lr is not None else 0.06 * args.batch_size / 128,
        "sgd_momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 0, "epochs": args.epochs,
        "jitter_strength": 0.5, "blur_prob": 0.0, "compile": args.compile, "device": device, "seed": args.seed,
        "data": args.data, "probe": False,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--width", type=float, default=1.0, help="ResNet-18 width multiplier")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=100, help="length of the learning-rate schedule")
    parser.add_argument("--lr", type=float, default=None, help="default: 0.06 x batch / 128 (lightly's)")
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--head", default="mlp_bn", choices=HEADS, help="projection head (default: lightly's layers)")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.80)
    parser.add_argument("--stop-at-target", action="store_true")
    parser.add_argument("--budget-min", type=float, default=None, help="stop after this many minutes")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compile time is counted)")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the curve as JSON here")
    args = parser.parse_args()

    start = time.perf_counter()
    device = setup(args)
    train, test = load_pair(args.data, args.train_limit, args.test_limit)
    config = recipe(args, str(device))
    run = Run(config, data=(train, test))
    print(f"time to kNN {args.target:.2f}: {describe_machine(device)}; {resnet18_summary(args.width)}")
    print(f"  {len(train)} train / {len(test)} test images; batch {args.batch_size}, SGD lr {config['lr']:g}, "
          f"{args.epochs} epochs (cosine), tau {args.temperature}, compile {args.compile}, bf16 {run.autocast}, "
          f"channels_last {run.channels_last}; data decoded and model built at {time.perf_counter() - start:.1f} s")
    print(f"{'epoch':>6} {'minutes':>8} {'knn':>6} {'loss':>7} {'img/s':>8}")
    curve: list[dict] = []
    reached: dict | None = None
    while run.epoch < args.epochs:
        metrics = run.train_epoch()
        last = run.epoch == args.epochs
        if run.epoch % args.eval_every and not last:
            continue
        knn = run.evaluate()["knn_acc"]
        sync(device)
        point = {"epoch": run.epoch, "minutes": (time.perf_counter() - start) / 60, "knn_acc": knn,
                 "loss": metrics["ssl_loss"], "images_per_s": metrics["images_per_s"]}
        curve.append(point)
        print(f"{point['epoch']:>6} {point['minutes']:>8.2f} {knn:>6.3f} {point['loss']:>7.3f} "
              f"{point['images_per_s']:>8.0f}", flush=True)
        if reached is None and knn >= args.target:
            reached = point
            if args.stop_at_target:
                break
        if args.budget_min is not None and point["minutes"] >= args.budget_min:
            break
    best = max(curve, key=lambda p: p["knn_acc"])
    print(f"\nbest kNN {best['knn_acc']:.3f} at epoch {best['epoch']} ({best['minutes']:.2f} min)")
    if reached is not None:
        print(f"kNN >= {args.target:.2f} first at epoch {reached['epoch']}: {reached['minutes']:.2f} min wall clock")
    else:
        print(f"kNN {args.target:.2f} not reached in {curve[-1]['minutes']:.2f} min")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": config, "curve": curve, "reached": reached}, f, indent=1)


if __name__ == "__main__":
    main()
