"""Our SimCLR training step against lightly's SimCLR as its documentation sets it up, side by side.

    .venv/bin/python benchmarks/bench_peer.py                                  # CPU default: width 0.25
    .venv/bin/python benchmarks/bench_peer.py --width 0.25 --repeats 5         # the CPU target (>= 1.5x)
    .venv/bin/python benchmarks/bench_peer.py --width 0.25 --compile           # ours compiled
    .venv/bin/python benchmarks/bench_peer.py --width 0.25 --amp false         # ours in float32 on an AMX CPU
    .venv/bin/python benchmarks/bench_peer.py --device cuda --width 1 --steps 20 --warmup 5   # GPU target (>= 3x)
    .venv/bin/python benchmarks/bench_peer.py --device cuda --steps 20 --warmup 5 --compile  # ours compiled
    .venv/bin/python benchmarks/bench_peer.py --width 0.25 --encode-views separate  # CPU: views one by one

Needs lightly (``pip install -e '.[bench]'``). Three sides train SimCLR on the same first ``--limit`` images of the
shared CIFAR-10 parquet (decoded once, not timed), 32x32, batch ``--batch-size``, with

- the same network: our ``resnet18`` (CIFAR stem: 3x3 conv, no max-pool) at ``--width``; lightly's backbone is
  that very encoder wrapped to return its pooled vector, and starts from the same weights;
- the same head: lightly's ``SimCLRProjectionHead(512w, 512w, 128w)``, ours ``head=mlp_bn, proj_hidden=512w,
  proj_dim=128w`` (the same layers: Linear, BatchNorm, ReLU, Linear, BatchNorm);
- the same loss and optimiser settings: NT-Xent at temperature 0.5 (``lightly.loss.NTXentLoss`` / ours), Adam
  lr 1e-3, weight decay 1e-6;
- the same augmentation recipe (random resized crop 0.08-1, flip, colour jitter 0.8/0.8/0.8/0.2 at p 0.8,
  grayscale p 0.2, blur with probability ``--blur``, default 0 as lightly's CIFAR example) and normalisation.

The sides:

- ours: ``run.train_step`` with our trainer's defaults: uint8 batches held on the device, batched per-sample
  augmentation on the device, both views in one forward pass, our online linear probe; bf16 autocast where the
  device computes bf16 natively (GPUs, AMX CPUs: ``csl.train.native_bf16``), channels_last, Adam fused on CUDA;
- lightly as documented: its ``SimCLRTransform`` applied per PIL image in a ``DataLoader`` with ``--workers``
  workers, two forward passes (``model(x0)``, ``model(x1)``), ``NTXentLoss``, in float32 and the default memory
  format with ``torch.optim.Adam``, as its examples run. The target ratio is against this side;
- lightly with our network settings: the same loop given ours' autocast, channels_last, fused Adam and, where
  ours encodes the views jointly (``--encode-views``, default joint: SimCLR's batch norm over the 2N views), one
  pass over both views, so both networks do the same arithmetic and the ratio is of the data paths alone.

The lightly encoders are copies of ours; ours' weights are channels_last, and a convolution takes that layout when
its input or its weight has it, so lightly's documented side sets its weights back to the default format (before
2026-12-02 it did not, and "lightly as documented" ran channels_last without saying so).

Each block is ``--warmup`` untimed steps then ``--steps`` timed ones, the same for every side (each side's first
block has ``--initial-warmup`` more); blocks alternate ``--repeats`` times and the figures are medians, with the
ratio of each round's adjacent blocks too (the steadier figure on a busy machine).
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
    add_network_args,
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
    add_network_args(parser)
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

    ours, peers, loader = ours_and_lightly(config, train, test, args, width, device, settings=("documented", "ours"))

    print(f"SimCLR training step, ours vs lightly {__import__('lightly').__version__}: {describe_machine(device)}")
    print(f"  {resnet18_summary(width)}; head {ours.model.extract.head.net[0].in_features}->"
          f"{config['proj_hidden']}->{config['proj_dim']}")
    print(f"  {len(train)} images 32x32, batch {args.batch_size}, blur p={args.blur}, Adam lr {args.lr}, "
          f"tau {args.temperature}; lightly: {args.workers} DataLoader workers")
    print(f"  ours: bf16 autocast {ours.autocast}, channels_last {ours.channels_last}, compiled {args.compile}, "
          f"encode_views {args.encode_views}")
    for name, peer in peers.items():
        views = "one pass over both views" if getattr(peer.model, "joint", False) else "one pass per view"
        print(f"  lightly ({name}): bf16 autocast {peer.autocast}, channels_last {peer.channels_last}, {views}")
    print(f"  blocks of {args.warmup} warm-up + {args.steps} timed steps, {args.repeats} per side, alternating "
          f"(+{args.initial_warmup} warm-up steps in each side's first block)")

    names = {"ours": "ours (run.train_step)", "documented": "lightly (documented)",
             "ours settings": "lightly (our network settings)"}
    blocks = {
        names["ours"]: run_block(ours, cycle_batches(ours.train_data, args.batch_size, ours.generator)),
        names["documented"]: loader_block(loader, peers["documented"].step, device),
        names["ours settings"]: loader_block(loader, peers["ours"].step, device),
    }
    seconds = interleave(blocks, repeats=args.repeats, warmup=args.warmup, steps=args.steps,
                         initial_warmup=args.initial_warmup)
    per_side = {key: rates(seconds[name], args.batch_size) for key, name in names.items()}

    print(f"\nimages/s (median over blocks; width x{width:g}, batch {args.batch_size}, {device.type})")
    for key, name in names.items():
        print(f"  {name + ':':32s} {spread(per_side[key])}")
    for key, what in (("documented", "lightly as documented"),
                      ("ours settings", "lightly with our network settings (the data paths alone)")):
        pairs = paired_ratios(per_side["ours"], per_side[key])
        print(f"  ratio ours / {what}: {median(per_side['ours']) / median(per_side[key]):.2f}x   "
              f"(per round: {', '.join(f'{r:.2f}' for r in pairs)}; median {median(pairs):.2f}x)")
    target = 3.0 if device.type == "cuda" else 1.5
    print(f"  target: >= {target}x against lightly as documented "
          f"({'GPU, full width' if device.type == 'cuda' else 'CPU, width 0.25'})")


if __name__ == "__main__":
    main()
