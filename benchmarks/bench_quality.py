"""kNN accuracy of our SimCLR against lightly's SimCLR trained the same way: same data, network, epochs, schedule.

    .venv/bin/python benchmarks/bench_quality.py                          # CPU default: width 0.25, 5k/1k, 2 epochs
    .venv/bin/python benchmarks/bench_quality.py --epochs 5 --seed 1
    .venv/bin/python benchmarks/bench_quality.py --peer-settings ours     # lightly given our bf16/channels_last
    .venv/bin/python benchmarks/bench_quality.py --amp false              # ours in float32 on an AMX CPU
    .venv/bin/python benchmarks/bench_quality.py --device cuda --width 1 --train-limit 50000 --test-limit 10000 \\
        --epochs 100

Needs lightly (``pip install -e '.[bench]'``). Both sides train SimCLR for ``--epochs`` on the first
``--train-limit`` images of the shared CIFAR-10 parquet (class-balanced), with the set-up of
``benchmarks/bench_peer.py``: the same ResNet-18 (CIFAR stem) at ``--width`` starting from the same weights, head
512w-512w-128w of the same layers (ours ``mlp_bn``; ``--head mlp`` gives ours the simclr preset's head, without
the last BatchNorm), NT-Xent at temperature 0.5, Adam lr 1e-3 (weight decay 1e-6) on the same cosine schedule without
warm-up, batch ``--batch-size``, blur probability ``--blur`` (default 0, lightly's CIFAR setting). Ours trains
with ``run.train_epoch`` (batched augmentation on the device) and our trainer's defaults (bf16 autocast where the
device computes bf16 natively, GPUs and AMX CPUs; channels_last); lightly with ``SimCLRTransform`` per PIL image
in a DataLoader with ``--workers`` workers and its documented two-pass step, in float32 as documented
(``--peer-settings ours``: with our network settings instead). The sides alternate epoch by epoch. Speed must not
come from cutting corners: this is where our bf16 is held against lightly's float32.

Evaluation is one function for both: ``csl.evaluate.extract_features`` (the encoder's pooled vector in eval mode,
on un-augmented images normalised with the training set's mean and std by ``run.pipeline.eval_view``), then
``csl.evaluate.knn_accuracy`` (k ``--knn-k``, temperature ``--knn-temperature``) of the first ``--test-limit``
test images against the training images. Short CPU runs compare the two implementations, not SimCLR: expect
accuracies well below published ones and a difference of a few points from seed to seed.
"""

from __future__ import annotations

import argparse
import math
import time

# isort: off
# _common first: it sets OMP_WAIT_POLICY before torch loads OpenMP
from _common import (
    LightlyTrainer,
    add_common_args,
    add_network_args,
    close_iterator,
    default_width,
    describe_machine,
    load_pair,
    ours_and_lightly,
    resnet18_summary,
    setup,
    simclr_config,
    sync,
)
import torch

# isort: on
from csl.evaluate import extract_features, knn_accuracy
from csl.extract.heads import HEADS
from csl.optim import lr_factor


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--width", type=float, default=None, help="ResNet-18 width (default: 1 on GPU, 0.25 on CPU)")
    parser.add_argument("--train-limit", type=int, default=5000)
    parser.add_argument("--test-limit", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="lightly's DataLoader workers")
    parser.add_argument("--blur", type=float, default=0.0, help="blur probability, both sides")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--knn-k", type=int, default=200)
    parser.add_argument("--knn-temperature", type=float, default=0.1)
    parser.add_argument("--peer-settings", default="documented", choices=LightlyTrainer.SETTINGS,
                        help="lightly's network settings: as documented (float32) or ours")
    add_network_args(parser)
    parser.add_argument("--encode-views", default="joint", choices=("joint", "separate"),
                        help="our encode_views option ('separate': batch norm sees one view at a time, as lightly's)")
    parser.add_argument("--head", default="mlp_bn", choices=HEADS,
                        help="our projection head (default: lightly's layers)")
    args = parser.parse_args()

    device = setup(args)
    width = default_width(args.width, device)
    train, test = load_pair(args.data, args.train_limit, args.test_limit)
    config = simclr_config(width=width, batch_size=args.batch_size, device=device, seed=args.seed, blur=args.blur,
                           lr=args.lr, temperature=args.temperature, epochs=args.epochs, data=args.data,
                           head=args.head)
    config.update(knn_k=args.knn_k, knn_temperature=args.knn_temperature, encode_views=args.encode_views)
    ours, peers, loader = ours_and_lightly(config, train, test, args, width, device, settings=(args.peer_settings,))
    peer = peers[args.peer_settings]
    if len(loader) != ours.steps_per_epoch:
        raise RuntimeError(f"steps per epoch differ: ours {ours.steps_per_epoch}, lightly {len(loader)}")

    print(f"SimCLR kNN accuracy, ours vs lightly {__import__('lightly').__version__}: {describe_machine(device)}")
    print(f"  {resnet18_summary(width)}; encode_views {args.encode_views}; head {args.head} "
          f"->{config['proj_hidden']}->{config['proj_dim']}; same initial "
          f"encoder weights")
    print(f"  {len(train)} training / {len(test)} test images, {args.epochs} epochs of {ours.steps_per_epoch} steps "
          f"(batch {args.batch_size}), Adam lr {args.lr} cosine, tau {args.temperature}, blur p={args.blur}; "
          f"ours: bf16 autocast {ours.autocast}, channels_last {ours.channels_last}; lightly ({args.peer_settings}): "
          f"bf16 autocast {peer.autocast}, channels_last {peer.channels_last}")

    total_steps = args.epochs * ours.steps_per_epoch
    for epoch in range(args.epochs):
        metrics = ours.train_epoch()
        peer_loss, peer_rate = lightly_epoch(peer, loader, epoch * len(loader), total_steps)
        print(f"  epoch {epoch + 1}/{args.epochs}: ours loss {metrics['loss']:.4f} ({metrics['images_per_s']:.0f} "
              f"img/s)   lightly loss {peer_loss:.4f} ({peer_rate:.0f} img/s)", flush=True)
        if not (math.isfinite(metrics["ssl_loss"]) and math.isfinite(peer_loss)):
            raise SystemExit("a loss diverged")

    batch = max(256, args.batch_size)
    accuracy = {}
    for name, model in (("ours", ours.model), ("lightly", peer.model)):
        train_x, train_y = extract_features(model, ours.pipeline, ours.train_data, batch_size=batch, device=device,
                                            autocast=ours.autocast)
        test_x, test_y = extract_features(model, ours.pipeline, ours.test_data, batch_size=batch, device=device,
                                          autocast=ours.autocast)
        accuracy[name] = knn_accuracy(train_x, train_y, test_x, test_y, k=args.knn_k,
                                      temperature=args.knn_temperature, num_classes=ours.num_classes)

    print(f"\nkNN accuracy (k {args.knn_k}, temperature {args.knn_temperature}) after {args.epochs} epochs, "
          f"width x{width:g}, seed {args.seed}")
    print(f"  ours:    {100 * accuracy['ours']:6.2f}%")
    print(f"  lightly: {100 * accuracy['lightly']:6.2f}%")
    print(f"  difference ours - lightly: {100 * (accuracy['ours'] - accuracy['lightly']):+.2f} points")


if __name__ == "__main__":
    main()
