"""Our SimCLR training step against lightly's SimCLR as its documentation sets it up, side by side.

    .venv/bin/python benchmarks/bench_peer.py                                  # CPU default: width 0.25
    .venv/bin/python benchmarks/bench_peer.py --width 0.25 --repeats 5         # the CPU target (>= 1.5x)
    .venv/bin/python benchmarks/bench_peer.py --width 0.25 --bf16   # CPU, with the trainer's CUDA bf16 setting
    .venv/bin/python benchmarks/bench_peer.py --device cuda --width 1 --steps 20 --warmup 5   # GPU target (>= 3x)
    .venv/bin/python benchmarks/bench_peer.py --device cuda --steps 20 --warmup 5 --compile  # ours compiled
    .venv/bin/python benchmarks/bench_peer.py --width 0.25 --encode-views separate --compile  # CPU: views one by one

Needs lightly (``pip install -e '.[bench]'``). Both sides train SimCLR on the same first ``--limit`` images of the
shared CIFAR-10 parquet (decoded once, not timed), 32x32, batch ``--batch-size``, with

- the same network: our ``resnet18`` (CIFAR stem: 3x3 conv, no max-pool) at ``--width``; lightly's backbone is
  that very encoder wrapped to return its pooled vector, and starts from the same weights;
- the same head sizes: lightly's ``SimCLRProjectionHead(512w, 512w, 128w)``, ours ``proj_hidden=512w,
  proj_dim=128w`` (lightly's head adds a BatchNorm after its last layer; ours has none);
- the same loss and optimiser settings: NT-Xent at temperature 0.5 (``lightly.loss.NTXentLoss`` / ours), Adam
  lr 1e-3, weight decay 1e-6;
- the same augmentation recipe (random resized crop 0.08-1, flip, colour jitter 0.8/0.8/0.8/0.2 at p 0.8,
  grayscale p 0.2, blur with probability ``--blur``, default 0 as lightly's CIFAR example) and normalisation.

What differs is the data path, and how the views pass through the network. Ours: ``run.train_step`` on uint8 batches
held on the device (batched per-sample augmentation on the device, both views in one forward pass, plus our online
linear probe). lightly: its ``SimCLRTransform`` applied per PIL image in a ``DataLoader`` with ``--workers``
workers, two forward passes (``model(x0)``, ``model(x1)``), ``NTXentLoss``; on CUDA with our trainer's bf16
autocast, channels_last and fused Adam; on the CPU both sides use our trainer's channels_last (on by default), and
``--bf16`` switches bf16 autocast on for both (an experiment: our trainer enables it on CUDA only). On this 2-core
CPU one pass over 2N images costs 15-30% more
per image than two passes over N (fp32; about 2x in bf16), a network effect, not a data-path one. Each block is
``--warmup`` untimed steps then ``--steps`` timed ones, the same for both sides (each side's first block has
``--initial-warmup`` more); blocks alternate ``--repeats`` times and the figures are medians, with the ratio of each
round's adjacent blocks too (the steadier figure on a busy machine).
"""

from __future__ import annotations

import argparse

# isort: off
# _common first: it sets OMP_WAIT_POLICY before torch loads OpenMP
from _common import (
    add_common_args,
    cycle_batches,
    default_width,
    describe_machine,
    interleave,
    load_pair,
    ours_and_lightly,
    loader_block,
    median,
    paired_ratios,
    rates,
    resnet18_summary,
    run_block,
    setup,
    simclr_config,
    spread,
)

# isort: on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--width", type=float, default=None, help="ResNet-18 width (default: 1 on GPU, 0.25 on CPU)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None,
                        help="training images (default: enough for the first block)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per block")
    parser.add_argument("--initial-warmup", type=int, default=2,
                        help="more untimed steps in each side's first block (oneDNN/cuDNN build kernels on first use)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per block")
    parser.add_argument("--repeats", type=int, default=3, help="blocks per side")
    parser.add_argument("--workers", type=int, default=2, help="lightly's DataLoader workers")
    parser.add_argument("--blur", type=float, default=0.0, help="blur probability, both sides")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--channels-last", action="store_true",
                        help="channels_last for both networks (our trainer's default on every device)")
    parser.add_argument("--bf16", action="store_true",
                        help="CPU experiment: bf16 autocast for both networks (our trainer uses it on CUDA only)")
    parser.add_argument("--encode-views", default="joint", choices=("joint", "separate"),
                        help="our encode_views option; 'separate' passes each view alone, as lightly's side does")
    parser.add_argument("--compile", action="store_true",
                        help="our trainer's compile option (model and augmentation); lightly's side stays as documented")
    args = parser.parse_args()

    device = setup(args)
    width = default_width(args.width, device)
    limit = args.limit or (args.warmup + args.initial_warmup + args.steps) * args.batch_size
    train, test = load_pair(args.data, limit, 256)
    config = simclr_config(width=width, batch_size=args.batch_size, device=device, seed=args.seed, blur=args.blur,
                           lr=args.lr, temperature=args.temperature, data=args.data)
    config["compile"] = args.compile
    config["encode_views"] = args.encode_views

    ours, changed, peer, loader = ours_and_lightly(config, train, test, args, width, device)

    print(f"SimCLR training step, ours vs lightly {__import__('lightly').__version__}: {describe_machine(device)}")
    print(f"  {resnet18_summary(width)}; head {ours.model.extract.head.net[0].in_features}->"
          f"{config['proj_hidden']}->{config['proj_dim']}")
    print(f"  {len(train)} images 32x32, batch {args.batch_size}, blur p={args.blur}, Adam lr {args.lr}, "
          f"tau {args.temperature}; lightly: {args.workers} DataLoader workers")
    print(f"  network settings (both sides): bf16 autocast {ours.autocast}, channels_last {ours.channels_last}; "
          f"ours compiled {args.compile}, encode_views {args.encode_views}"
          + (f" (CPU experiment: {', '.join(changed)} switched on)" if changed else ""))
    print(f"  blocks of {args.warmup} warm-up + {args.steps} timed steps, {args.repeats} per side, alternating "
          f"(+{args.initial_warmup} warm-up steps in each side's first block)")

    blocks = {
        "ours (run.train_step)": run_block(ours, cycle_batches(ours.train_data, args.batch_size, ours.generator)),
        "lightly (documented)": loader_block(loader, peer.step, device),
    }
    seconds = interleave(blocks, repeats=args.repeats, warmup=args.warmup, steps=args.steps,
                         initial_warmup=args.initial_warmup)
    ours_rates = rates(seconds["ours (run.train_step)"], args.batch_size)
    peer_rates = rates(seconds["lightly (documented)"], args.batch_size)
    pairs = paired_ratios(ours_rates, peer_rates)

    print(f"\nimages/s (median over blocks; width x{width:g}, batch {args.batch_size}, {device.type})")
    print(f"  ours:    {spread(ours_rates)}")
    print(f"  lightly: {spread(peer_rates)}")
    print(f"  ratio ours/lightly: {median(ours_rates) / median(peer_rates):.2f}x   "
          f"(per round: {', '.join(f'{r:.2f}' for r in pairs)}; median {median(pairs):.2f}x)")
    target = 3.0 if device.type == "cuda" else 1.5
    print(f"  target: >= {target}x ({'GPU, full width' if device.type == 'cuda' else 'CPU, width 0.25'})")


if __name__ == "__main__":
    main()
