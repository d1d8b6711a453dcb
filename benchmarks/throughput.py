"""Training throughput of every preset with a ResNet-18, and augmentation-only throughput against torchvision.

    .venv/bin/python benchmarks/throughput.py                        # full width (slow on a CPU: ~10 images/s)
    .venv/bin/python benchmarks/throughput.py --width 0.25 --repeats 3
    .venv/bin/python benchmarks/throughput.py --presets simclr,byol --width 0.25
    .venv/bin/python benchmarks/throughput.py --skip-presets          # augmentation comparison only
    .venv/bin/python benchmarks/throughput.py --device cuda --steps 20 --warmup 5 --repeats 3

1. Full training step, images/s: ``run.train_step`` (batched per-sample augmentation on the device, encoder,
   extraction, similarity, loss, backward, optimiser, EMA, online probe) for each preset (amdim, cpc_v2, simclr,
   byol, moco_v2, yadim) with ``encoder=resnet18`` (CIFAR stem) at ``--width`` (default 1.0, printed on every
   line), 32x32, batch ``--batch-size`` (default 256 for every preset), the rest of each preset unchanged. Each
   preset runs ``--repeats`` blocks of ``--warmup`` untimed and ``--steps`` timed steps; the figure is the median.
   A CPU needs no warm-up (no autotuning; measured: the first step is no slower than the next), so the default
   there is 0 and the full-width default run takes one step per preset.
   On CUDA the trainer's defaults apply (bf16 autocast, channels_last). On the CPU a step that would need more
   memory than is free is reported as such and skipped (cpc_v2 at batch 256 compares ~10^4 x 10^4 patch pairs).
2. Augmentation only, images/s (two views of every image, normalised): our batched SimCLR pipeline (the
   preset's: crop, flip, jitter, grayscale, blur p 0.5) on whole batches on ``--device``, against torchvision v2
   applied image by image in a DataLoader with ``--workers`` workers (``TwoViews`` from
   ``benchmarks/bench_augment.py``, the same definition that benchmark uses), over the first ``--aug-limit``
   images, one epoch per block, blocks alternating; the ratio of medians is printed. Where lightly is installed,
   its SimCLRTransform on PIL images in the same kind of DataLoader (blur p 0.5) is timed alongside, for
   reference: it is the data path ``bench_peer.py`` compares against.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

# isort: off
# _common first: it sets OMP_WAIT_POLICY before torch loads OpenMP
from _common import (
    add_common_args,
    cycle_batches,
    describe_machine,
    interleave,
    is_out_of_memory,
    lightly_loader,
    load_pair,
    load_split,
    median,
    memory_guard,
    paired_ratios,
    rates,
    resnet18_summary,
    run_block,
    setup,
    spread,
    timed,
)
import torch

# isort: on
from bench_augment import TwoViews

from csl.presets import PRESETS
from csl.registry import AUGMENT
from csl.train import Run


def preset_throughput(args: argparse.Namespace, device: torch.device) -> None:
    names = [n.strip() for n in args.presets.split(",")] if args.presets else list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    limit = max(args.limit, (args.warmup + args.steps) * args.batch_size)
    train, test = load_pair(args.data, limit, 256)
    print(f"\n1. full training step, {resnet18_summary(args.width)}, batch {args.batch_size}, 32x32, "
          f"{args.repeats} x ({args.warmup} warm-up + {args.steps} timed) steps per preset")
    results: dict[str, list[float]] = {}
    for name in names:
        config = {"method": name, "encoder": "resnet18", "width": args.width, "batch_size": args.batch_size,
                  "device": str(device), "seed": args.seed, "data": args.data}
        try:
            with memory_guard(device):
                run = Run(config, data=(train, test))
                block = run_block(run, cycle_batches(run.train_data, args.batch_size, run.generator))
                seconds = [block(args.warmup, args.steps) / args.steps for _ in range(args.repeats)]
        except Exception as error:  # noqa: BLE001 - report and go on with the next preset
            if not is_out_of_memory(error):
                raise
            print(f"  {name:<8} width x{args.width:g}: skipped, out of memory ({str(error).splitlines()[0][:90]})")
            continue
        finally:
            run = block = None  # free the model and its activations before the next preset
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results[name] = rates(seconds, args.batch_size)
        print(f"  {name:<8} width x{args.width:g}: {spread(results[name])} images/s   "
              f"({median(seconds):.2f} s/step; augment {config_of(name)})", flush=True)


def config_of(name: str) -> str:
    preset = PRESETS[name]
    return f"{preset['augment']}, extract {preset['extract']}, loss {preset['loss']}"


def augment_throughput(args: argparse.Namespace, device: torch.device) -> None:
    data = load_split(args.data, "train", args.aug_limit)
    mean, std = data.mean_std()
    # jitter 1.0 and blur p 0.5 as lightly's side (at 32 px the pipeline's own defaults are SimCLR's CIFAR ones)
    pipeline = AUGMENT.build("simclr", image_size=32, mean=mean, std=std, jitter_strength=1.0, blur_prob=0.5)
    on_device = data.to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    count = (len(data) // args.batch_size) * args.batch_size

    def ours_epoch(warmup: int, steps: int) -> float:
        def epoch() -> None:
            for images, _ in on_device.batches(args.batch_size, generator):
                pipeline(images, generator)

        for _ in range(warmup):
            epoch()
        return timed(device, lambda: [epoch() for _ in range(steps)])

    loader = torch.utils.data.DataLoader(TwoViews(data.images), batch_size=args.batch_size, shuffle=True,
                                         drop_last=True, num_workers=args.workers,
                                         persistent_workers=args.workers > 0)

    def torchvision_epoch(warmup: int, steps: int) -> float:
        def epoch() -> None:
            for first, _ in loader:
                assert first.shape[-1] == 32

        for _ in range(warmup):
            epoch()
        return timed(torch.device("cpu"), lambda: [epoch() for _ in range(steps)])

    sides = {"ours (batched)": ours_epoch, "torchvision v2 (per image)": torchvision_epoch}
    try:  # lightly's SimCLRTransform on PIL images, the data path bench_peer.py compares against, when installed
        peer_loader = lightly_loader(data, mean=mean, std=std, blur=0.5, batch_size=args.batch_size,
                                     workers=args.workers, device=torch.device("cpu"), seed=args.seed,
                                     persistent=True)

        def lightly_epoch(warmup: int, steps: int) -> float:
            def epoch() -> None:
                for (first, _), _ in peer_loader:
                    assert first.shape[-1] == 32

            for _ in range(warmup):
                epoch()
            return timed(torch.device("cpu"), lambda: [epoch() for _ in range(steps)])

        sides["lightly SimCLRTransform (PIL)"] = lightly_epoch
    except SystemExit:
        pass

    where = f"{device.type}" + ("" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
    print(f"\n2. augmentation only: SimCLR views of {count} images (batch {args.batch_size}), "
          f"{args.aug_repeats} epochs per side after one warm-up epoch, alternating")
    # one warm-up epoch in each side's first block only (workers start, allocations settle), then one per block
    seconds = interleave({k: _with_first_warmup(v) for k, v in sides.items()}, repeats=args.aug_repeats, warmup=0,
                         steps=1, verbose=False)
    ours = rates(seconds["ours (batched)"], count)
    theirs = rates(seconds["torchvision v2 (per image)"], count)
    print(f"  ours, batched on {where}:{'':>8}{spread(ours)} images/s")
    print(f"  torchvision v2, per image, {args.workers} workers: {spread(theirs)} images/s")
    pairs = paired_ratios(ours, theirs)
    print(f"  ratio ours/torchvision: {median(ours) / median(theirs):.1f}x   "
          f"(per round: {', '.join(f'{r:.1f}' for r in pairs)})")
    if "lightly SimCLRTransform (PIL)" in seconds:
        peer = rates(seconds["lightly SimCLRTransform (PIL)"], count)
        print(f"  (lightly SimCLRTransform, per PIL image, {args.workers} workers: {spread(peer)} images/s; "
              f"ours/lightly {median(ours) / median(peer):.1f}x)")


def _with_first_warmup(block: Callable[[int, int], float]) -> Callable[[int, int], float]:
    state = {"warm": False}

    def wrapped(warmup: int, steps: int) -> float:
        if not state["warm"]:
            state["warm"] = True
            return block(1, steps)
        return block(warmup, steps)

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--width", type=float, default=1.0, help="ResNet-18 width multiplier (default 1.0)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--presets", default=None, help="comma-separated presets (default: all six)")
    parser.add_argument("--limit", type=int, default=1024, help="training images for the preset runs")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per block (default: 0 on a CPU, whose first step is no slower; 3 on CUDA)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per block")
    parser.add_argument("--repeats", type=int, default=1, help="blocks per preset")
    parser.add_argument("--skip-presets", action="store_true", help="only the augmentation comparison")
    parser.add_argument("--skip-augment", action="store_true", help="only the preset throughput")
    parser.add_argument("--aug-limit", type=int, default=5000, help="images for the augmentation comparison")
    parser.add_argument("--aug-repeats", type=int, default=3, help="timed epochs per side")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the torchvision side")
    args = parser.parse_args()
    device = setup(args)
    if args.warmup is None:
        args.warmup = 3 if device.type == "cuda" else 0
    print(f"throughput: {describe_machine(device)}; ResNet-18 width x{args.width:g}")
    if not args.skip_augment:
        augment_throughput(args, device)
    if not args.skip_presets:
        preset_throughput(args, device)


if __name__ == "__main__":
    main()
