"""Trials sharing one GPU: does each slow the others more than the sharing itself explains?

    .venv/bin/python benchmarks/bench_gpu_share.py --device cuda --trials 1,2,4           # GPU: the real question
    .venv/bin/python benchmarks/bench_gpu_share.py --device cpu --width 0.125 --batch-size 64 --steps 2 \
        --warmup 1 --trials 1,2                                                            # a CPU check of the script

A search with ``--gpus-per-trial 0.25`` has Ray run four trials at once on one GPU, each in its own worker process
(Ray only sets ``CUDA_VISIBLE_DEVICES``; the processes share the device by time-slicing). This script does the
same without Ray: for each count n in ``--trials`` it starts n processes, each builds our SimCLR run (ResNet-18 at
``--width``, batch ``--batch-size``) on its own copy of the data, warms up, waits at a barrier so that all run
together, and times ``--steps`` training steps. Sharing alone explains a slowdown of n per trial (each gets 1/n of
the device); ``excess = (solo rate / per-trial rate) / n`` says how much worse than that it is. Below 1, the
trials fill gaps a single trial leaves idle (small kernels, launch overhead) and the GPU does more in total.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# isort: off
# _common first: it sets OMP_WAIT_POLICY before torch loads OpenMP
from _common import DEFAULT_DATA, add_common_args, describe_machine, setup, simclr_config, sync
import torch
import torch.multiprocessing as mp

# isort: on


def trial(rank: int, args: argparse.Namespace, barrier: mp.Barrier, results: mp.Queue, threads: int) -> None:
    """One trial process: build, warm up, wait for the others, time the steps, report images/s."""
    from _common import cycle_batches, load_split  # spawned: import again in the child
    from csl.train import Run

    torch.set_num_threads(threads)
    device = torch.device(args.device)
    train = load_split(args.data, "train", args.limit)
    test = load_split(args.data, "test", 256)
    config = simclr_config(width=args.width, batch_size=args.batch_size, device=device, seed=args.seed + rank,
                           blur=0.0, lr=1e-3, temperature=0.5, data=args.data)
    run = Run(config, data=(train, test))
    batches = cycle_batches(run.train_data, args.batch_size, run.generator)
    for _ in range(args.warmup):
        run.train_step(*next(batches))
    sync(device)
    barrier.wait()
    start = time.perf_counter()
    for _ in range(args.steps):
        run.train_step(*next(batches))
    sync(device)
    results.put((rank, args.steps * args.batch_size / (time.perf_counter() - start)))


def measure(n: int, args: argparse.Namespace) -> list[float]:
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(n), context.Queue()
    threads = max(1, (os.cpu_count() or 1) // n)
    processes = [context.Process(target=trial, args=(rank, args, barrier, results, threads)) for rank in range(n)]
    for p in processes:
        p.start()
    rates = [results.get() for _ in processes]
    for p in processes:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a trial process exited with {p.exitcode}")
    return [rate for _, rate in sorted(rates)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--trials", default="1,2,4", help="comma-separated numbers of trials sharing the device")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=4096, help="training images per trial")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    device = setup(args)
    args.device = str(device)
    args.data = args.data or DEFAULT_DATA
    counts = [int(c) for c in args.trials.split(",")]
    print(f"trials sharing one device: {describe_machine(device)}; SimCLR ResNet-18 width x{args.width:g}, "
          f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, all trials at once")
    print(f"{'trials':>6} {'per trial img/s':>28} {'total img/s':>12} {'slowdown':>9} {'explained':>9} {'excess':>7}")
    solo: float | None = None
    for n in counts:
        rates = measure(n, args)
        per_trial = statistics.median(rates)
        solo = per_trial if solo is None and n == 1 else solo
        slowdown = solo / per_trial if solo else float("nan")
        cells = ", ".join(f"{r:.0f}" for r in rates)
        print(f"{n:>6} {cells:>28} {sum(rates):>12.0f} {slowdown:>9.2f} {n:>9} {slowdown / n:>7.2f}", flush=True)
    if solo is None:
        print("(no solo run in --trials: slowdown needs 1 in the list)")


if __name__ == "__main__":
    main()
