"""kNN accuracy of our SimCLR, BYOL and MoCo v2 against lightly's, each pair trained the same way.

    .venv/bin/python benchmarks/bench_quality.py                          # CPU default: 3 methods, width 0.25,
                                                                          # 5k/1k images, 2 epochs, seed 0
    .venv/bin/python benchmarks/bench_quality.py --methods moco_v2 --train-limit 512 --test-limit 256 --epochs 1
    .venv/bin/python benchmarks/bench_quality.py --peer-settings ours     # lightly given our bf16/channels_last
    .venv/bin/python benchmarks/bench_quality.py --amp false              # ours in float32 on an AMX CPU

The full comparison, three seeds per method (what "not below lightly beyond seed noise" is judged on):

    .venv/bin/python benchmarks/bench_quality.py --seeds 0,1,2 --epochs 6 --test-limit 10000          # CPU
    .venv/bin/python benchmarks/bench_quality.py --device cuda --width 1 --train-limit 50000 --test-limit 10000 \\
        --batch-size 512 --epochs 50 --workers 8 --seeds 0,1,2                                         # one GPU

Needs lightly (``pip install -e '.[bench]'``). For every method and seed both sides train for ``--epochs`` on the
first ``--train-limit`` images of the shared CIFAR-10 parquet (class-balanced): the same ResNet-18 (CIFAR stem)
at ``--width`` from the same initial weights, heads of the same layers and sizes, the same optimiser and
hyperparameters (lightly's side reads them from our run's config), the same per-step cosine learning-rate
schedule without warm-up, batch ``--batch-size``, blur probability ``--blur`` (default 0, lightly's CIFAR
setting). The recipes (``benchmarks/_common.py``): SimCLR as ``bench_peer.py`` (Adam 1e-3, tau 0.5, head
``--head``, default ``mlp_bn``: lightly's SimCLRProjectionHead layers); BYOL as lightly's documented CIFAR-10 BYOL
(heads 512w-1024w-256w, SGD 0.06 x batch/128, weight decay 5e-4, target momentum 0.996 -> 1 on a cosine); MoCo v2
as our moco_v2 preset (one query -> key loss, queue-only negatives, 8 batch-norm splits with the keys shuffled,
head 512w-512w-128w without batch norm) on MoCo's CIFAR-10 demo recipe (queue 4,096, momentum 0.99, tau 0.1, SGD
0.06 x batch/512, weight decay 5e-4). lightly's sides are its documented models: SimCLRProjectionHead +
NTXentLoss; BYOLProjection/PredictionHead + NegativeCosineSimilarity + update_momentum + cosine_schedule;
MoCoProjectionHead + NTXentLoss(memory_bank_size=(4096, dim)) + update_momentum + batch_shuffle/unshuffle + its
SplitBatchNorm; with SimCLRTransform, BYOLTransform, MoCoV2Transform per PIL image in a DataLoader of ``--workers``
workers. Ours trains with ``run.train_epoch`` (batched augmentation on the device) and our trainer's defaults (bf16
autocast where the device computes bf16 natively, GPUs and AMX CPUs; channels_last); lightly in float32 as
documented (``--peer-settings ours``: with our network settings). The sides alternate epoch by epoch. What still
differs, and cannot be removed, is printed in each method's header.

Evaluation is one function for both: ``csl.evaluate.extract_features`` (the encoder's pooled vector in eval mode,
on un-augmented images normalised with the training set's mean and std by ``run.pipeline.eval_view``), then
``csl.evaluate.knn_accuracy`` (k ``--knn-k``, temperature ``--knn-temperature``) of the first ``--test-limit``
test images against the training images. With several seeds the summary gives each side's mean and spread, the
paired differences and a one-sided paired t-test (scipy.stats.ttest_rel) of "ours below lightly". Short CPU runs
compare the implementations, not the methods: expect accuracies well below published ones.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

# isort: off
# _common first: it sets OMP_WAIT_POLICY before torch loads OpenMP
from _common import (
    PEER_METHODS,
    LightlyTrainer,
    add_common_args,
    add_network_args,
    byol_config,
    close_iterator,
    default_width,
    describe_machine,
    load_pair,
    moco_config,
    ours_and_lightly,
    resnet18_summary,
    setup,
    simclr_config,
    sync,
)
import torch
from scipy import stats

# isort: on
from csl.evaluate import extract_features, knn_accuracy
from csl.extract.heads import HEADS
from csl.optim import lr_factor

# What differs between the two sides beyond their code paths, per method, printed in each header.
DIFFERENCES = {
    "simclr": [
        "projection heads start from different random weights (the encoders from the same)",
    ],
    "byol": [
        "heads start from different random weights (the encoders from the same)",
        "lightly's loss is 2 x mean(-cos) of the two directions (its ImageNet benchmark's factor 2), ours the mean "
        "of 2 - 2cos: the same gradients",
        "target momentum: lightly's cosine_schedule(step, total - 1) before each step, ours the same cosine over "
        "step / total after the previous step; lightly moves parameters only, ours batch-norm statistics too "
        "(the target's, which nothing evaluated reads)",
    ],
    "moco_v2": [
        "heads and the initial queue (random unit keys on both sides) start from different random draws",
        "lightly keeps running batch-norm statistics per split and averages them when evaluating, ours averages "
        "them at every step: the same statistics",
        "lightly draws the key shuffle from torch's global generator, ours from a generator of its own",
    ],
}


def lightly_epoch(peer: LightlyTrainer, loader: torch.utils.data.DataLoader, first_step: int, total_steps: int
                  ) -> tuple[float, float]:
    """One epoch of lightly's loop on our schedule; returns (mean loss, images/s)."""
    peer.model.train()
    sync(peer.device)
    start = time.perf_counter()
    losses = torch.zeros((), device=peer.device)
    iterator = iter(loader)
    try:
        for i, batch in enumerate(iterator):
            peer.set_lr_factor(lr_factor(first_step + i, total_steps, 0))
            losses += peer.step(batch)
    finally:
        close_iterator(iterator)
    loss = float(losses) / len(loader)
    return loss, len(loader) * loader.batch_size / (time.perf_counter() - start)


def method_config(method: str, args: argparse.Namespace, width: float, device: torch.device, seed: int
                  ) -> dict[str, Any]:
    """Our flat config of ``method``'s recipe (``benchmarks/_common.py``), with this run's options."""
    common = {"width": width, "batch_size": args.batch_size, "device": device, "seed": seed, "blur": args.blur,
              "epochs": args.epochs, "data": args.data}
    if method == "simclr":
        config = simclr_config(**common, lr=args.lr or 1e-3, temperature=args.temperature or 0.5, head=args.head)
    elif method == "byol":
        config = byol_config(**common, lr=args.lr)
    else:
        config = moco_config(**common, lr=args.lr, temperature=args.temperature or 0.1)
    config.update(knn_k=args.knn_k, knn_temperature=args.knn_temperature)
    if args.encode_views is not None:
        config["encode_views"] = args.encode_views
    return config


def compare(method: str, seed: int, train: Any, test: Any, args: argparse.Namespace, width: float,
            device: torch.device) -> dict[str, float]:
    """Train both sides of one method with one seed; print the header and each epoch; return both kNN accuracies."""
    config = method_config(method, args, width, device, seed)
    run_args = argparse.Namespace(**{**vars(args), "seed": seed})
    ours, peers, loader = ours_and_lightly(config, train, test, run_args, width, device,
                                           settings=(args.peer_settings,))
    peer = peers[args.peer_settings]
    if len(loader) != ours.steps_per_epoch:
        raise RuntimeError(f"steps per epoch differ: ours {ours.steps_per_epoch}, lightly {len(loader)}")
    cfg = ours.config
    print(f"\n{method}, seed {seed}: ours vs lightly {__import__('lightly').__version__}: {describe_machine(device)}")
    print(f"  {resnet18_summary(width)}; extract {cfg['extract']} head {cfg['head']}, loss {cfg['loss']}, "
          f"encode_views {cfg['encode_views']}; same initial encoder weights")
    print(f"  {len(train)} training / {len(test)} test images, {args.epochs} epochs of {ours.steps_per_epoch} steps "
          f"(batch {cfg['batch_size']}), {cfg['optimizer']} lr {cfg['lr']:g} cosine, weight decay "
          f"{cfg['weight_decay']:g}, blur p={args.blur}; ours: bf16 autocast {ours.autocast}, channels_last "
          f"{ours.channels_last}; lightly ({args.peer_settings}): bf16 autocast {peer.autocast}, channels_last "
          f"{peer.channels_last}")
    for line in DIFFERENCES[method]:
        print(f"  differs: {line}")

    total_steps = args.epochs * ours.steps_per_epoch
    for epoch in range(args.epochs):
        metrics = ours.train_epoch()
        peer_loss, peer_rate = lightly_epoch(peer, loader, epoch * len(loader), total_steps)
        print(f"  epoch {epoch + 1}/{args.epochs}: ours loss {metrics['ssl_loss']:.4f} "
              f"({metrics['images_per_s']:.0f} img/s)   lightly loss {peer_loss:.4f} ({peer_rate:.0f} img/s)",
              flush=True)
        if not (math.isfinite(metrics["ssl_loss"]) and math.isfinite(peer_loss)):
            raise SystemExit(f"{method}, seed {seed}: a loss diverged")

    batch = max(256, cfg["batch_size"])
    accuracy = {}
    for name, model in (("ours", ours.model), ("lightly", peer.model)):
        train_x, train_y = extract_features(model, ours.pipeline, ours.train_data, batch_size=batch, device=device,
                                            autocast=ours.autocast)
        test_x, test_y = extract_features(model, ours.pipeline, ours.test_data, batch_size=batch, device=device,
                                          autocast=ours.autocast)
        accuracy[name] = knn_accuracy(train_x, train_y, test_x, test_y, k=args.knn_k,
                                      temperature=args.knn_temperature, num_classes=ours.num_classes)
    print(f"  kNN accuracy: ours {100 * accuracy['ours']:6.2f}%   lightly {100 * accuracy['lightly']:6.2f}%   "
          f"difference {100 * (accuracy['ours'] - accuracy['lightly']):+.2f} points", flush=True)
    return accuracy


def summarise(method: str, results: list[dict[str, float]]) -> str:
    ours = [100 * r["ours"] for r in results]
    peer = [100 * r["lightly"] for r in results]
    differences = [a - b for a, b in zip(ours, peer, strict=True)]
    if len(results) == 1:
        return (f"  {method:<8} ours {ours[0]:6.2f}   lightly {peer[0]:6.2f}   difference {differences[0]:+.2f} "
                f"(one seed: no estimate of seed noise)")
    test = stats.ttest_rel(ours, peer, alternative="less")
    verdict = "below lightly beyond seed noise" if test.pvalue < 0.05 else "not below lightly beyond seed noise"
    return (f"  {method:<8} ours {statistics.mean(ours):6.2f} +- {statistics.stdev(ours):.2f}   lightly "
            f"{statistics.mean(peer):6.2f} +- {statistics.stdev(peer):.2f}   differences "
            f"{', '.join(f'{d:+.2f}' for d in differences)} (mean {statistics.mean(differences):+.2f}); "
            f"paired t-test of ours < lightly p={test.pvalue:.3f}: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--methods", default=",".join(PEER_METHODS),
                        help=f"comma-separated, of {', '.join(PEER_METHODS)} (default: all)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: --seed)")
    parser.add_argument("--width", type=float, default=None, help="ResNet-18 width (default: 1 on GPU, 0.25 on CPU)")
    parser.add_argument("--train-limit", type=int, default=5000)
    parser.add_argument("--test-limit", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="lightly's DataLoader workers")
    parser.add_argument("--blur", type=float, default=0.0, help="blur probability, both sides, both views")
    parser.add_argument("--lr", type=float, default=None, help="default: each method's recipe's")
    parser.add_argument("--temperature", type=float, default=None,
                        help="SimCLR's and MoCo's (default: 0.5 and 0.1, their recipes')")
    parser.add_argument("--knn-k", type=int, default=200)
    parser.add_argument("--knn-temperature", type=float, default=0.1)
    parser.add_argument("--peer-settings", default="documented", choices=LightlyTrainer.SETTINGS,
                        help="lightly's network settings: as documented (float32) or ours")
    add_network_args(parser)
    parser.add_argument("--encode-views", default=None, choices=("joint", "separate"),
                        help="our encode_views option (default: the preset's; 'separate': batch norm sees one view "
                             "at a time, as lightly's)")
    parser.add_argument("--head", default="mlp_bn", choices=HEADS,
                        help="our SimCLR projection head (default: lightly's layers)")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(PEER_METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(PEER_METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]

    device = setup(args)
    width = default_width(args.width, device)
    train, test = load_pair(args.data, args.train_limit, args.test_limit)
    results: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    for seed in seeds:
        for method in methods:
            torch.manual_seed(seed)
            results[method].append(compare(method, seed, train, test, args, width, device))

    print(f"\nkNN accuracy (%, k {args.knn_k}, temperature {args.knn_temperature}) after {args.epochs} epochs, "
          f"width x{width:g}, seeds {', '.join(map(str, seeds))}")
    for method in methods:
        print(summarise(method, results[method]))


if __name__ == "__main__":
    main()
